"""A small shared async Redis client: per-call timeouts, Lua scripts, outage bookkeeping.

Redis being slow or down must never hang a request (ARCHITECTURE.md), so:

- every call runs under its caller's timeout (a rate limiter passes 50 ms); redis-py drops a
  connection whose command was cancelled, so no reply is ever misattributed;
- redis-py retries a call once, at once, only when its connection fails (ConnectionError):
  a restarted Redis leaves every pooled connection closed, and without that retry each of
  them would fail one call (a rate-limited request decided by `on_store_error`, an admin
  change refused) and mark the store down again; a Redis really down refuses the second
  connect as fast as the first. Timeouts are not retried: the caller decides what a failure
  means (allow or deny);
- a refused or reset connection, or three timeouts in a row (one slow answer on a busy host
  is not an outage; script calls that shared a round trip time out as one), mark the store
  *down*: `available()` then answers False without any I/O, except for one probe every
  `retry_after` seconds, so an outage costs an attribute check per request, not a timeout; the
  first success marks it up again;
- an outage is logged once when it starts and once when it ends, never per request;
- an error reply (a script failing on one key, a command on a key of the wrong type, a
  replica refusing a write) fails that call only: Redis answered, so it is no outage.

Scripts run with EVALSHA and fall back to EVAL when the server does not know the script yet
(NOSCRIPT: a restarted or flushed Redis), which also loads it for the next EVALSHA. Script calls
made in the same event-loop iteration share one round trip (one pipeline; see
`apigate.store.redis_batch`), and their deadlines share one timer instead of a timeout context
each.

`shared_redis(env.shared, url)` gives every feature of a process the same client (one pool),
kept across config reloads.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import logging
import time
from collections.abc import Sequence
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from apigate.redaction import redact_url
from apigate.store.redis_batch import ScriptBatcher, StoreUnavailable, unavailable

__all__ = ["RedisStore", "Script", "StoreUnavailable", "shared_redis"]

log = logging.getLogger("apigate.store.redis")

TIMEOUTS_TO_TRIP = 3  # consecutive timeouts that make an outage

# No CLIENT SETINFO commands on each new connection (redis-py >= 7.1 spells it driver_info=None,
# older versions lib_name=None).
_NO_CLIENT_SETINFO: dict[str, Any] = (
    {"driver_info": None}
    if "driver_info" in inspect.signature(AbstractConnection.__init__).parameters
    else {"lib_name": None, "lib_version": None}
)


class Script:
    """A Lua script and its SHA1, computed once (EVALSHA sends 40 bytes, not the source)."""

    __slots__ = ("sha", "source")

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    def __repr__(self) -> str:
        return f"<Script {self.sha[:10]}>"


class RedisStore:
    def __init__(
        self,
        url: str,
        *,
        timeout: float = 0.05,
        retry_after: float = 0.5,
        max_connections: int = 64,
        max_batch: int = 256,
    ) -> None:
        self.url = url
        self.timeout = timeout
        self.retry_after = retry_after
        self.pool = BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=None,  # waiting for a pooled connection is bounded by the call's timeout
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
            socket_connect_timeout=max(timeout, 1.0),
            # No socket timeout: every call already has its own deadline (`asyncio.timeout` in
            # `call`, the batch timer for scripts), and redis-py's would cost a timeout context
            # per reply read and a `wait_for` task per write: ~6 µs per batched script call,
            # ~15 µs for a lone one (measured against a local Redis).
            socket_timeout=None,
            **_NO_CLIENT_SETINFO,
        )
        self.client = Redis(connection_pool=self.pool)
        self.scripts = ScriptBatcher(
            self.client,
            on_failure=self._failed,
            on_success=self._succeeded,
            max_batch=max_batch,
        )
        self.down_since: float | None = None
        self.outages = 0
        self._timeouts = 0
        self._retry_at = 0.0

    @property
    def db(self) -> int:
        """The database number the URL names (`redis://h/1`, `?db=1`; 0 by default), as
        redis-py reads it."""
        return int(self.pool.connection_kwargs.get("db") or 0)

    # ------------------------------------------------------------------ health
    @property
    def is_down(self) -> bool:
        return self.down_since is not None

    def available(self) -> bool:
        """False while down, except for one probe per `retry_after` (no I/O either way)."""
        if self.down_since is None:
            return True
        now = time.monotonic()
        if now >= self._retry_at:
            self._retry_at = now + self.retry_after
            return True
        return False

    def _failed(self, exc: BaseException) -> None:
        now = time.monotonic()
        self._retry_at = now + self.retry_after
        if self.down_since is None:
            if isinstance(exc, TimeoutError | RedisTimeoutError):
                self._timeouts += 1
                if self._timeouts < TIMEOUTS_TO_TRIP:
                    return
            self.down_since = now
            self.outages += 1
            reason = str(exc) or type(exc).__name__
            log.warning(
                "redis store unavailable: %s",
                reason,
                extra={"event": "store_down", "store": redact_url(self.url)},
            )

    def _succeeded(self) -> None:
        self._timeouts = 0
        if self.down_since is not None:
            lasted = time.monotonic() - self.down_since
            self.down_since = None
            log.info(
                "redis store recovered after %.1fs",
                lasted,
                extra={"event": "store_up", "store": redact_url(self.url)},
            )

    # ------------------------------------------------------------------ calls
    async def run_script(
        self,
        script: Script,
        keys: Sequence[str | bytes],
        args: Sequence[str | bytes | int],
        timeout: float | None = None,
    ) -> Any:
        """EVALSHA (EVAL on NOSCRIPT) under `timeout`, batched with the other script calls of
        this loop iteration; raises StoreUnavailable on any failure."""
        return await self.scripts.submit(
            script, keys, args, timeout if timeout is not None else self.timeout
        )

    async def call(self, *command: str | bytes | int, timeout: float | None = None) -> Any:
        """One raw command (PING, GET, ...) under `timeout`."""
        try:
            async with asyncio.timeout(timeout if timeout is not None else self.timeout):
                result = await self.client.execute_command(*command)  # type: ignore[no-untyped-call]
        except ResponseError as reply:  # WRONGTYPE, OOM, READONLY...: Redis answered
            self._succeeded()  # the call failed, the store is up (it used to be marked down)
            raise unavailable(reply) from reply
        except Exception as exc:
            self._failed(exc)
            raise unavailable(exc) from exc
        self._succeeded()
        return result

    async def close(self) -> None:
        await self.scripts.close()
        await self.client.aclose()
        await self.pool.disconnect()

    def __repr__(self) -> str:
        state = "down" if self.down_since is not None else "up"
        return f"<RedisStore {redact_url(self.url)} {state} timeout={self.timeout}s>"


def shared_redis(shared: dict[str, Any], url: str, *, timeout: float = 0.05) -> RedisStore:
    """The process-wide client for `url` (created on first use, kept across reloads)."""
    key = f"redis:{url}"
    store = shared.get(key)
    if not isinstance(store, RedisStore):
        store = shared[key] = RedisStore(url, timeout=timeout)
    return store
