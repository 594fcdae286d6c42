"""Start a real `apigate run` process on port 0 for integration and conformance tests."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import yaml

from apigate.config.loader import load_config
from apigate.extensions import attach_extensions
from apigate.server import Gateway

_LISTENING = re.compile(r"apigate \d+ listening on (\S+):(\d+)")
_ADMIN = re.compile(r"apigate admin listening on (\S+):(\d+)")


@asynccontextmanager
async def running_gateway(config: dict[str, Any], tmp_path: Path) -> AsyncIterator[Gateway]:
    """A gateway in this event loop, as `apigate run` builds it (extensions attached: the
    registry, metrics, the dashboard): for tests that read its state or its own clock."""
    path = tmp_path / "apigate.yaml"
    path.write_text(yaml.safe_dump(config))
    gw = Gateway(load_config(path), config_path=path)
    await attach_extensions(gw)
    await gw.start()
    try:
        yield gw
    finally:
        await gw.shutdown(0)


def base_config(**overrides: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "version": 1,
        "listeners": {"proxy": {"address": "127.0.0.1:0"}, "admin": None},
        "services": {},
        "routes": [],
    }
    cfg.update(overrides)
    return cfg


class GatewayProcess:
    """`async with GatewayProcess(config_dict) as gw:` then `gw.port`, `gw.url`."""

    def __init__(
        self,
        config: dict[str, Any],
        *,
        args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        self.config = config
        self.args = args
        self.env = env
        self.proc: asyncio.subprocess.Process | None = None
        self.port = 0
        self.admin_port = 0
        self.host = "127.0.0.1"
        self._dir = tempfile.TemporaryDirectory(prefix="apigate-test-")
        self.config_path = Path(self._dir.name) / "apigate.yaml"
        self.stderr_lines: list[str] = []
        self.stdout_lines: list[str] = []
        self._readers: list[asyncio.Task[None]] = []

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def write_config(self, config: dict[str, Any]) -> None:
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(config))
        os.replace(tmp, self.config_path)

    async def __aenter__(self) -> GatewayProcess:
        self.write_config(self.config)
        env = dict(os.environ)
        env.update(self.env or {})
        env["PYTHONUNBUFFERED"] = "1"
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "apigate",
            "run",
            "-c",
            str(self.config_path),
            *self.args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._readers.append(asyncio.create_task(self._pump(self.proc.stderr, self.stderr_lines)))
        try:
            await asyncio.wait_for(self._wait_listening(), 15)
        except BaseException:
            await self.stop()
            raise RuntimeError("gateway did not start:\n" + "\n".join(self.stderr_lines)) from None
        return self

    async def _wait_listening(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while True:
            line = await self.proc.stdout.readline()
            if not line:
                raise RuntimeError("gateway exited")
            text = line.decode(errors="replace")
            self.stdout_lines.append(text)
            admin = _ADMIN.search(text)
            if admin:
                self.admin_port = int(admin.group(2))
            m = _LISTENING.search(text)
            if m:
                self.host, self.port = m.group(1), int(m.group(2))
                self._readers.append(
                    asyncio.create_task(self._pump(self.proc.stdout, self.stdout_lines))
                )
                return

    @staticmethod
    async def _pump(stream: asyncio.StreamReader, sink: list[str]) -> None:
        while True:
            line = await stream.readline()
            if not line:
                return
            sink.append(line.decode(errors="replace").rstrip("\n"))

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def rss_kib(self) -> int:
        """The gateway process's resident memory (VmRSS) in KiB, from /proc."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS line")

    async def wait_for_log(self, needle: str, within: float = 10.0) -> str:
        """The first stderr/stdout line containing `needle`, waiting up to `within` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while True:
            for line in [*self.stderr_lines, *self.stdout_lines]:
                if needle in line:
                    return line
            if loop.time() > deadline:
                raise AssertionError(f"no log line with {needle!r} in:\n" + self.logs())
            await asyncio.sleep(0.02)

    def logs(self) -> str:
        return "\n".join([*self.stdout_lines, *self.stderr_lines])

    async def wait(self, timeout: float = 10) -> int:
        assert self.proc is not None
        return await asyncio.wait_for(self.proc.wait(), timeout)

    async def stop(self) -> None:
        proc = self.proc
        if proc is not None and proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        for task in self._readers:
            task.cancel()
        self._readers.clear()
        self._dir.cleanup()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


async def raw_request(
    port: int, data: bytes, *, read_timeout: float = 5.0, until_close: bool = False
) -> bytes:
    """Send raw bytes; return what came back (one response, or everything until close)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    out = b""
    try:
        while True:
            chunk = await asyncio.wait_for(reader.read(65536), read_timeout)
            if not chunk:
                break
            out += chunk
            if not until_close and _complete(out):
                break
    except TimeoutError:
        pass
    finally:
        writer.close()
    return out


def _complete(data: bytes) -> bool:
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    m = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
    if m:
        return len(body) >= int(m.group(1))
    if re.search(rb"(?i)\r\ntransfer-encoding:\s*chunked", head):
        return body.endswith(b"0\r\n\r\n")
    return False
