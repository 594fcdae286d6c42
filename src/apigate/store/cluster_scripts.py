"""The Redis keys, channel, deadlines and Lua scripts of the cluster state (see
`apigate.store.cluster` for how they are used)."""

from __future__ import annotations

import json
from typing import Any

from apigate.store.redis import Script

PREFIX = "apigate:cluster:"
CHANNEL = PREFIX + "events"
INSTANCES = PREFIX + "instances"
EXPIRY = PREFIX + "expiry"
OVERLAY = PREFIX + "config:overlay"
BASE = PREFIX + "config:base"
VERSION = PREFIX + "config:version"
EPOCH = PREFIX + "epoch"
GONE = PREFIX + "gone"  # tombstones: deregistered instances, until their TTL would have run out

RESYNC_INTERVAL = 5.0  # seconds between full reads of the shared state
RECONNECT_DELAY = 1.0  # after the channel was lost
CONFIG_TIMEOUT = 1.0  # an admin change waits this long for Redis, then 503
REGISTRY_TIMEOUT = 0.5  # a registration waits this long, then counts as not yet shared
SYNC_TIMEOUT = 2.0  # a resync's reads

# ------------------------------------------------------------------ scripts
# KEYS: instances, expiry, gone. ARGV: field, document, ttl seconds, channel, announcement,
# "fresh" (a registration or heartbeat as it is taken: clears a tombstone) or "restore" (one
# written late: after an outage, or back into a Redis that lost its state). A restore neither
# overrides a deregistration made meanwhile (a tombstone) nor a different entry already there
# (a newer registration through another node), and only ever extends an expiry.
REGISTER = Script(
    """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
if ARGV[6] == 'restore' then
  local gone = redis.call('ZSCORE', KEYS[3], ARGV[1])
  if gone and tonumber(gone) > now then return 0 end
  local there = redis.call('HGET', KEYS[1], ARGV[1])
  if there and there ~= ARGV[2] then return 0 end
  local expires = redis.call('ZSCORE', KEYS[2], ARGV[1])
  if there and expires and tonumber(expires) >= now + tonumber(ARGV[3]) then return 0 end
else
  redis.call('ZREM', KEYS[3], ARGV[1])
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[1])
redis.call('PUBLISH', ARGV[4], ARGV[5])
return 1
"""
)

# KEYS: instances, expiry, gone. ARGV: field, channel, announcement, tombstone seconds.
DEREGISTER = Script(
    """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[3], now + tonumber(ARGV[4]), ARGV[1])
local gone = redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('PUBLISH', ARGV[2], ARGV[3])
return gone
"""
)

# KEYS: instances, expiry, gone, version, epoch. Removes lapsed entries and tombstones, then
# answers [epoch or false, version, [tombstoned field, ...], field, document, seconds left,
# field, document, seconds left, ...].
SNAPSHOT = Script(
    """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
for _, field in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)) do
  redis.call('HDEL', KEYS[1], field)
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
local out = {redis.call('GET', KEYS[5]), redis.call('GET', KEYS[4]) or '0',
             redis.call('ZRANGE', KEYS[3], 0, -1)}
local live = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
for i = 1, #live, 2 do
  local doc = redis.call('HGET', KEYS[1], live[i])
  if doc then
    out[#out + 1] = live[i]
    out[#out + 1] = doc
    out[#out + 1] = tostring(tonumber(live[i + 1]) - now)
  end
end
return out
"""
)

# A config write, only over the state it was computed on: KEYS overlay, base, version, epoch.
# ARGV: expected epoch, expected version, channel, node (JSON string), then "put", field,
# document or "base", document. Answers {"ok", version}, {"conflict"} or {"no_epoch"}.
CONFIG_WRITE = Script(
    """
local epoch = redis.call('GET', KEYS[4])
if not epoch then return {'no_epoch'} end
if epoch ~= ARGV[1] or (redis.call('GET', KEYS[3]) or '0') ~= ARGV[2] then
  return {'conflict'}
end
if ARGV[5] == 'put' then
  redis.call('HSET', KEYS[1], ARGV[6], ARGV[7])
else
  redis.call('SET', KEYS[2], ARGV[6])
  redis.call('DEL', KEYS[1])
end
local version = redis.call('INCR', KEYS[3])
redis.call('PUBLISH', ARGV[3],
  '{"op":"config","node":' .. ARGV[4] .. ',"version":' .. version .. '}')
return {'ok', version}
"""
)

# KEYS: base, overlay, version, epoch. Answers [base or false, version, epoch or false,
# field, document, ...].
CONFIG_READ = Script(
    """
local out = {redis.call('GET', KEYS[1]), redis.call('GET', KEYS[3]) or '0',
             redis.call('GET', KEYS[4])}
for _, item in ipairs(redis.call('HGETALL', KEYS[2])) do out[#out + 1] = item end
return out
"""
)

# (Re)create the cluster state from this node: KEYS epoch, base, overlay, version.
# ARGV: new epoch, this node's version, its base or '', channel, node (JSON), field, doc, ...
# Written when Redis has no state (fresh, restarted empty, flushed) or an older one than this
# node has read (restored from an old save; seeded by a node that knew less): versions only
# ever come from Redis, so a node ahead of it means Redis lost changes. The node that knows
# the most recent config wins whatever the order the nodes come back in.
# Answers {epoch in force, 1 if this call (re)created it}.
SEED = Script(
    """
local epoch = redis.call('GET', KEYS[1])
if epoch and tonumber(ARGV[2]) <= tonumber(redis.call('GET', KEYS[4]) or '0') then
  return {epoch, 0}
end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SET', KEYS[4], ARGV[2])
redis.call('DEL', KEYS[2], KEYS[3])
if ARGV[3] ~= '' then redis.call('SET', KEYS[2], ARGV[3]) end
for i = 6, #ARGV, 2 do redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1]) end
redis.call('PUBLISH', ARGV[4],
  '{"op":"config","node":' .. ARGV[5] .. ',"version":' .. ARGV[2] .. '}')
return {ARGV[1], 1}
"""
)


def text(value: Any) -> str:
    """A reply item as text (redis-py answers bytes)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def field(*parts: str) -> str:
    """A hash field naming (service, instance) or (kind, name): JSON, so no name can clash."""
    return json.dumps(parts, separators=(",", ":"))
