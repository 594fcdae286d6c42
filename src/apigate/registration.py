"""Client library for services that register themselves with apigate.

    async with Registration("http://127.0.0.1:8001", "hello", url="http://10.0.0.5:9001"):
        await serve_forever()

or, in synchronous code, `SyncRegistration(...).start()` / `.stop()`.

It registers at start, heartbeats (the same idempotent PUT) every third of the TTL, and keeps
retrying with capped backoff when the gateway is unreachable — so when a gateway restarts, the
next heartbeat simply registers the instance again. It deregisters on stop, so the gateway drains
the instance instead of waiting for the TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import logging
import os
import socket
import threading
import urllib.parse
from typing import Any

log = logging.getLogger("apigate.registration")


def _default_instance_id(url: str) -> str:
    parsed = urllib.parse.urlsplit(url)
    return f"{socket.gethostname()}-{parsed.port or 80}-{os.getpid()}"


class _Target:
    """Admin API location plus the request bodies, shared by both clients."""

    def __init__(
        self,
        admin_url: str,
        service: str,
        url: str,
        instance_id: str | None,
        ttl: float,
        weight: int,
        metadata: dict[str, Any] | None,
        token: str | None,
    ) -> None:
        parsed = urllib.parse.urlsplit(admin_url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"admin_url must be http(s)://host:port, not {admin_url!r}")
        self.scheme = parsed.scheme
        self.host = parsed.hostname
        self.port = parsed.port or (443 if parsed.scheme == "https" else 80)
        self.service = service
        self.url = url
        self.instance_id = instance_id or _default_instance_id(url)
        self.ttl = ttl
        token = token if token is not None else os.environ.get("APIGATE_ADMIN_TOKEN", "")
        self.headers = {"Content-Type": "application/json"}
        if token:
            self.headers["Authorization"] = f"Bearer {token}"
        self.body = json.dumps(
            {"url": url, "ttl": f"{ttl}s", "weight": weight, "metadata": metadata or {}}
        ).encode()
        quoted = (
            urllib.parse.quote(service, safe=""),
            urllib.parse.quote(self.instance_id, safe=""),
        )
        self.path = "/services/{}/instances/{}".format(*quoted)

    def request_bytes(self, method: str, body: bytes = b"") -> bytes:
        lines = [
            f"{method} {self.path} HTTP/1.1",
            f"Host: {self.host}:{self.port}",
            f"Content-Length: {len(body)}",
            "Connection: close",
        ]
        lines += [f"{k}: {v}" for k, v in self.headers.items()]
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class _Client:
    """What both clients share: where to register, what, and whether it worked."""

    def __init__(
        self,
        admin_url: str,
        service: str,
        *,
        url: str,
        instance_id: str | None = None,
        ttl: float = 10.0,
        weight: int = 1,
        metadata: dict[str, Any] | None = None,
        token: str | None = None,
        timeout: float = 2.0,
    ) -> None:
        self.target = _Target(admin_url, service, url, instance_id, ttl, weight, metadata, token)
        self.timeout = timeout
        self.registered = False

    @property
    def instance_id(self) -> str:
        return self.target.instance_id


class Registration(_Client):
    """Async registration; use as an async context manager or call start()/stop()."""

    _task: asyncio.Task[None] | None = None

    async def _call(self, method: str, body: bytes = b"") -> int:
        t = self.target
        ssl_ctx = True if t.scheme == "https" else None
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(t.host, t.port, ssl=ssl_ctx), self.timeout
        )
        try:
            writer.write(t.request_bytes(method, body))
            await writer.drain()
            status_line = await asyncio.wait_for(reader.readline(), self.timeout)
            parts = status_line.split()
            return int(parts[1]) if len(parts) >= 2 else 0
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def register_once(self) -> bool:
        try:
            status = await self._call("PUT", self.target.body)
        except (TimeoutError, OSError) as exc:
            log.warning("registration with the gateway failed: %s", exc)
            return False
        ok = status in (200, 201)
        if not ok:
            log.warning("gateway refused the registration: HTTP %s", status)
        if ok and not self.registered:
            log.info("registered %s/%s", self.target.service, self.instance_id)
        self.registered = ok
        return ok

    async def start(self) -> bool:
        """Register now (returns whether it worked) and keep heartbeating in the background."""
        ok = await self.register_once()
        self._task = asyncio.create_task(self._heartbeat())
        return ok

    async def _heartbeat(self) -> None:
        backoff = 0.2
        while True:
            if self.registered:
                await asyncio.sleep(self.target.ttl / 3)
            else:  # gateway unreachable or restarting: retry sooner, capped
                await asyncio.sleep(min(backoff, self.target.ttl / 3))
                backoff = min(backoff * 2, 5.0)
            if await self.register_once():
                backoff = 0.2

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        with contextlib.suppress(OSError, asyncio.TimeoutError):
            await self._call("DELETE")
        self.registered = False

    async def __aenter__(self) -> Registration:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


class SyncRegistration(_Client):
    """The same for synchronous services: a daemon thread heartbeats."""

    _thread: threading.Thread | None = None

    def __init__(self, admin_url: str, service: str, **kwargs: Any) -> None:
        super().__init__(admin_url, service, **kwargs)
        self._stop = threading.Event()

    def _call(self, method: str, body: bytes = b"") -> int:
        t = self.target
        conn_cls = (
            http.client.HTTPSConnection if t.scheme == "https" else http.client.HTTPConnection
        )
        conn = conn_cls(t.host, t.port, timeout=self.timeout)
        try:
            conn.request(method, t.path, body=body or None, headers=t.headers)
            return conn.getresponse().status
        finally:
            conn.close()

    def register_once(self) -> bool:
        try:
            self.registered = self._call("PUT", self.target.body) in (200, 201)
        except OSError as exc:
            log.warning("registration with the gateway failed: %s", exc)
            self.registered = False
        return self.registered

    def start(self) -> bool:
        ok = self.register_once()
        self._thread = threading.Thread(
            target=self._heartbeat, name="apigate-heartbeat", daemon=True
        )
        self._thread.start()
        return ok

    def _heartbeat(self) -> None:
        backoff = 0.2
        while True:
            wait = self.target.ttl / 3 if self.registered else min(backoff, self.target.ttl / 3)
            if self._stop.wait(wait):
                return
            backoff = 0.2 if self.register_once() else min(backoff * 2, 5.0)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.timeout + 1)
        with contextlib.suppress(OSError):
            self._call("DELETE")
        self.registered = False

    def __enter__(self) -> SyncRegistration:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
