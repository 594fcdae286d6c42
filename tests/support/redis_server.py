"""A real `redis-server` for tests: a temp dir, a free port on 127.0.0.1, no persistence.

    async with RedisServer() as redis:
        redis.url          # redis://127.0.0.1:PORT/0
        await redis.kill() # SIGKILL, as a crash would
        await redis.start()  # again, on the same port (empty: nothing is saved)
        redis.pause(); redis.resume()  # SIGSTOP / SIGCONT: a Redis that hangs

Tests that need it fail (they do not skip) when the binary is missing: CI installs it from the
Debian package `redis-server`.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import tempfile

_CANDIDATES = ("redis-server", "/usr/bin/redis-server", "/usr/local/bin/redis-server")


def redis_binary() -> str:
    for candidate in _CANDIDATES:
        found = shutil.which(candidate)
        if found:
            return found
    raise RuntimeError(
        "redis-server is not installed: these tests need a real Redis "
        "(Debian/Ubuntu: apt-get install -y redis-server)"
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def ping(port: int, timeout: float = 0.5) -> bool:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
    except (TimeoutError, OSError):
        return False
    try:
        writer.write(b"PING\r\n")
        line = await asyncio.wait_for(reader.readline(), timeout)
        return line.startswith(b"+PONG")
    except (TimeoutError, OSError):
        return False
    finally:
        writer.close()


class RedisServer:
    def __init__(self, port: int = 0) -> None:
        self.binary = redis_binary()
        self.port = port or free_port()
        self.proc: asyncio.subprocess.Process | None = None
        self._dir = tempfile.TemporaryDirectory(prefix="apigate-redis-")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self, timeout: float = 10.0) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            self._dir.name,
            "--protected-mode",
            "no",
            "--daemonize",
            "no",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            if self.proc.returncode is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            if await ping(self.port):
                return
            await asyncio.sleep(0.02)
        await self.kill()
        raise RuntimeError(f"redis-server did not answer PING on port {self.port}")

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    async def kill(self) -> None:
        await self._end(signal.SIGKILL)

    async def stop(self) -> None:
        await self._end(signal.SIGTERM)

    async def _end(self, sig: int) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.returncode is not None:
            return
        os.kill(proc.pid, signal.SIGCONT)  # a paused server cannot handle SIGTERM
        proc.send_signal(sig)
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
            await proc.wait()

    async def __aenter__(self) -> RedisServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
        self._dir.cleanup()

    def __repr__(self) -> str:
        state = "running" if self.proc is not None else "stopped"
        return f"<RedisServer {self.url} {state}>"
