"""The Redis keys, channel, deadlines and Lua scripts of the cluster state (see
`apigate.store.cluster` for how they are used)."""

from __future__ import annotations

import json
from typing import Any

from apigate.store.redis import Script

PREFIX = "apigate:cluster:"
INSTANCES = PREFIX + "instances"
EXPIRY = PREFIX + "expiry"
OVERLAY = PREFIX + "config:overlay"
ORDER = PREFIX + "config:order"  # overlay fields scored by creation sequence
SEQUENCE = PREFIX + "config:sequence"  # the last creation sequence given
BASE = PREFIX + "config:base"
VERSION = PREFIX + "config:version"
EPOCH = PREFIX + "epoch"
SEEDED = PREFIX + "config:seeded"  # the version the epoch began at
PARENT = PREFIX + "config:parent"  # "epoch:version" of the state the epoch began from
RUN = PREFIX + "config:run"  # run_id of the Redis process that last wrote the config
GONE = PREFIX + "gone"  # tombstones: deregistered instances, until their TTL would have run out
# every config script takes these keys, in this order
CONFIG_KEYS = [BASE, OVERLAY, ORDER, SEQUENCE, VERSION, EPOCH, SEEDED, RUN, PARENT]


def channel(db: int) -> str:
    """The announcements of the cluster kept in Redis database `db`. Keys are per database
    but pub/sub channels are server-wide: two clusters on `redis://h/0` and `redis://h/1`
    would otherwise take each other's registrations and config changes."""
    return f"{PREFIX}events:{db}"


RESYNC_INTERVAL = 5.0  # seconds between full reads of the shared state
RECONNECT_DELAY = 1.0  # after the channel was lost
CONFIG_TIMEOUT = 1.0  # an admin change waits this long for Redis, then 503
REGISTRY_TIMEOUT = 0.5  # a registration waits this long, then counts as not yet shared
SYNC_TIMEOUT = 2.0  # a resync's reads

# ------------------------------------------------------------------ scripts
# KEYS: instances, expiry, gone. ARGV: field, document, ttl seconds, channel, announcement, and
# "fresh" (a registration or heartbeat as it is taken: clears a tombstone), "late" (one this
# node took while Redis could not: written once it can) or "restore" (this node's registration
# written back into a Redis that lost its state). Neither a late write nor a restore overrides
# a deregistration made meanwhile (a tombstone), and both only ever extend an expiry. A late
# registration replaces a different entry when it expires later (with the same TTL: it was
# made later; a heartbeat that moved the instance, say); a restore never does (the entry there
# is a newer registration through another node).
REGISTER = Script(
    """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
if ARGV[6] ~= 'fresh' then
  local gone = redis.call('ZSCORE', KEYS[3], ARGV[1])
  if gone and tonumber(gone) > now then return 0 end
  local there = redis.call('HGET', KEYS[1], ARGV[1])
  if there and there ~= ARGV[2] and ARGV[6] == 'restore' then return 0 end
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

# KEYS: instances, expiry, gone. ARGV: field, channel, announcement, tombstone seconds,
# "known" (an instance the deregistering node holds: always tombstoned and announced) or
# "unheard" (one it has not heard of: only when Redis has it, else nothing is written or
# announced). Answers the HDEL count: 1 if Redis had the entry.
DEREGISTER = Script(
    """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local gone = redis.call('HDEL', KEYS[1], ARGV[1])
if gone == 0 and ARGV[5] == 'unheard' then return 0 end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[3], now + tonumber(ARGV[4]), ARGV[1])
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

# ------------------------------------------------------------------ config scripts
# The config is one history per *epoch*: versions count its changes, so they compare only
# within one epoch. A new epoch begins when the state is (re)created from a node (SEED) and
# when the first change reaches a Redis process that did not write the state it holds (loaded
# at a restart, a promoted replica): the state may be older than some node knows, and what is
# written on top of it from then on is another history than the one those nodes followed.
# (Which process wrote last is its run_id, kept in RUN. INFO is in ACL's @dangerous: for a
# Redis user that may not run it, nothing tells a restarted Redis, and a change written over
# an old save keeps its epoch, as before there was this check.) Every config script takes
# CONFIG_KEYS: base, overlay, order, sequence, version, epoch, seeded, run, parent.
_RUN_ID = """
local function run_id()
  local info = redis.pcall('INFO', 'server')
  if type(info) ~= 'string' then return false end
  return string.match(info, 'run_id:(%x+)') or false
end
"""

# A config write, only over the state it was computed on. ARGV: expected epoch, expected
# version, channel, node (JSON string), an epoch to begin if this Redis process has not
# written the config yet, then "put", field, document or "base", document. An overlay entry
# gets the next creation sequence when it is new or created again after its deletion (null):
# what `ConfigStore.put` does, so that every node merges the overlay in the same order.
# Answers {"ok", version, epoch}, {"conflict"} or {"no_epoch"}.
CONFIG_WRITE = Script(
    _RUN_ID
    + """
local epoch = redis.call('GET', KEYS[6])
if not epoch then return {'no_epoch'} end
if epoch ~= ARGV[1] or (redis.call('GET', KEYS[5]) or '0') ~= ARGV[2] then
  return {'conflict'}
end
local run = run_id()
if run and redis.call('GET', KEYS[8]) ~= run then
  redis.call('SET', KEYS[9], epoch .. ':' .. ARGV[2])
  epoch = ARGV[5]
  redis.call('SET', KEYS[6], epoch)
  redis.call('SET', KEYS[7], ARGV[2])
  redis.call('SET', KEYS[8], run)
end
if ARGV[6] == 'put' then
  local old = redis.call('HGET', KEYS[2], ARGV[7])
  if not old or (old == 'null' and ARGV[8] ~= 'null') then
    redis.call('ZADD', KEYS[3], redis.call('INCR', KEYS[4]), ARGV[7])
  end
  redis.call('HSET', KEYS[2], ARGV[7], ARGV[8])
else
  redis.call('SET', KEYS[1], ARGV[7])
  redis.call('DEL', KEYS[2], KEYS[3])
end
local version = redis.call('INCR', KEYS[5])
redis.call('PUBLISH', ARGV[3], '{"op":"config","node":' .. ARGV[4] .. ',"epoch":"' .. epoch
  .. '","version":' .. version .. '}')
return {'ok', version, epoch}
"""
)

# Answers [base or false, version, epoch or false, field, document, ...], the overlay in
# creation order. (Fields without one were written by an apigate that kept none: they are
# older than every field with one, so they come first, by name, the same on every node.)
CONFIG_READ = Script(
    """
local out = {redis.call('GET', KEYS[1]), redis.call('GET', KEYS[5]) or '0',
             redis.call('GET', KEYS[6])}
local ordered = redis.call('ZRANGE', KEYS[3], 0, -1)
local seen = {}
for _, field in ipairs(ordered) do seen[field] = true end
local older = {}
for _, field in ipairs(redis.call('HKEYS', KEYS[2])) do
  if not seen[field] then older[#older + 1] = field end
end
table.sort(older)
for _, fields in ipairs({older, ordered}) do
  for _, field in ipairs(fields) do
    local doc = redis.call('HGET', KEYS[2], field)
    if doc then
      out[#out + 1] = field
      out[#out + 1] = doc
    end
  end
end
return out
"""
)


# (Re)create the cluster state from this node. ARGV: new epoch, this node's version, the
# epoch it was read in or '', its base or '', channel, node (JSON), field, doc, ... (the
# overlay in creation order). Written when Redis has no state (fresh, restarted empty,
# flushed), or when it holds an older state than this node read and nothing Redis
# acknowledged would be lost:
# - the same epoch at an older version: a save restored, with nothing written since (the
#   first write would have begun another epoch);
# - another epoch that holds only what the node that seeded it knew (no change taken since
#   its seed) at an older version: a node that knew less came back first, so the most
#   recent knowledge wins whatever the order the nodes come back in.
# Never over another epoch's own changes: the node takes that state instead (its own
# config of the history Redis lost is dropped, see ClusterSync._join).
# Answers {epoch in force, 1 if this call (re)created it, version, version it began at,
# "epoch:version" it began from}.
SEED = Script(
    _RUN_ID
    + """
local epoch = redis.call('GET', KEYS[6])
if epoch then
  local version = tonumber(redis.call('GET', KEYS[5]) or '0')
  local seeded = tonumber(redis.call('GET', KEYS[7]) or '0')
  local mine = tonumber(ARGV[2])
  if not (mine > version and (epoch == ARGV[3] or version == seeded)) then
    return {epoch, 0, version, seeded, redis.call('GET', KEYS[9]) or ''}
  end
end
redis.call('SET', KEYS[6], ARGV[1])
redis.call('SET', KEYS[5], ARGV[2])
redis.call('SET', KEYS[7], ARGV[2])
redis.call('SET', KEYS[9], ARGV[3] .. ':' .. ARGV[2])
local run = run_id()
if run then redis.call('SET', KEYS[8], run) else redis.call('DEL', KEYS[8]) end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
if ARGV[4] ~= '' then redis.call('SET', KEYS[1], ARGV[4]) end
local sequence = 0
for i = 7, #ARGV, 2 do
  sequence = sequence + 1
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
  redis.call('ZADD', KEYS[3], sequence, ARGV[i])
end
redis.call('SET', KEYS[4], sequence)
redis.call('PUBLISH', ARGV[5], '{"op":"config","node":' .. ARGV[6] .. ',"epoch":"' .. ARGV[1]
  .. '","version":' .. ARGV[2] .. '}')
return {ARGV[1], 1, tonumber(ARGV[2]), tonumber(ARGV[2]), ARGV[3] .. ':' .. ARGV[2]}
"""
)


def text(value: Any) -> str:
    """A reply item as text (redis-py answers bytes)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def field(*parts: str) -> str:
    """A hash field naming (service, instance) or (kind, name): JSON, so no name can clash."""
    return json.dumps(parts, separators=(",", ":"))
