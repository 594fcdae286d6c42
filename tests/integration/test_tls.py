"""TLS termination end to end: a real `apigate run` process, real TLS clients, a real upstream.

Certificates come from a throwaway CA made at test time (`tests.support.certs`). Clients are
Python's `ssl` (TLS 1.2 and 1.3 pinned) and, when installed, curl.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import ssl
import sys
from pathlib import Path
from typing import Any

import httptools
import pytest
import yaml

from tests.support.certs import CertFiles, TestCA, peer_serial
from tests.support.gateway import GatewayProcess, base_config
from tests.support.upstream import Upstream

TLS12 = {"maximum": ssl.TLSVersion.TLSv1_2}
TLS13 = {"minimum": ssl.TLSVersion.TLSv1_3}


def tls_config(upstream_url: str, default: CertFiles, **tls: Any) -> dict[str, Any]:
    cfg = base_config(
        services={"up": {"targets": [upstream_url]}},
        routes=[{"name": "all", "match": {"paths": ["/"]}, "service": "up"}],
    )
    cfg["listeners"]["proxy"]["tls"] = {
        "certificate": str(default.cert),
        "key": str(default.key),
        **tls,
    }
    return cfg


class TLSClient:
    """Sequential HTTP/1.1 requests over one TLS connection (keep-alive)."""

    def __init__(self, port: int, ca: TestCA, server_name: str = "test.local", **versions: Any):
        self.port = port
        self.ctx = ca.client_context(**versions)
        self.server_name = server_name
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def __aenter__(self) -> TLSClient:
        self.reader, self.writer = await asyncio.wait_for(
            asyncio.open_connection(
                "127.0.0.1", self.port, ssl=self.ctx, server_hostname=self.server_name
            ),
            5,
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.writer is not None:
            self.writer.close()

    @property
    def ssl_object(self) -> ssl.SSLObject:
        assert self.writer is not None
        obj = self.writer.get_extra_info("ssl_object")
        assert isinstance(obj, ssl.SSLObject)
        return obj

    @property
    def serial(self) -> int:
        return peer_serial(self.ssl_object)

    async def get(self, path: str = "/echo") -> tuple[int, dict[str, str], bytes]:
        assert self.reader is not None and self.writer is not None
        self.writer.write(f"GET {path} HTTP/1.1\r\nHost: {self.server_name}\r\n\r\n".encode())
        headers: dict[str, str] = {}
        body = bytearray()
        done = asyncio.Event()

        class Sink:
            def on_header(self, name: bytes, value: bytes) -> None:
                headers[name.decode().lower()] = value.decode("latin-1")

            def on_body(self, chunk: bytes) -> None:
                body.extend(chunk)

            def on_message_complete(self) -> None:
                done.set()

        parser = httptools.HttpResponseParser(Sink())
        while not done.is_set():
            chunk = await asyncio.wait_for(self.reader.read(65536), 5)
            if not chunk:
                raise ConnectionError("the gateway closed the TLS connection")
            parser.feed_data(chunk)
        return parser.get_status_code(), headers, bytes(body)


async def handshake_serial(port: int, ca: TestCA, server_name: str = "test.local") -> int:
    async with TLSClient(port, ca, server_name) as client:
        return client.serial


# ---------------------------------------------------------------------- start-up errors


async def test_bad_certificates_stop_start_up_with_exit_code_2(tmp_path: Path) -> None:
    ca = TestCA(tmp_path)
    expired = ca.expired("expired", ["test.local"])
    mismatched = ca.mismatched("mismatched", ["api.example.com"])
    early = ca.not_yet_valid("early", ["early.example.com"])
    narrow = ca.issue("narrow", ["www.example.com"])
    cfg = tls_config(
        "http://127.0.0.1:9",
        expired,
        certificates=[
            {"certificate": str(mismatched.cert), "key": str(mismatched.key)},
            {"certificate": str(tmp_path / "missing.pem"), "key": str(narrow.key)},
            {"certificate": str(early.cert), "key": str(early.key)},
            {"certificate": str(narrow.cert), "key": str(narrow.key), "hosts": ["api.example.org"]},
        ],
    )
    path = tmp_path / "apigate.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "apigate",
        "run",
        "-c",
        str(path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 15)
    stderr = err.decode()
    assert proc.returncode == 2, stderr
    assert b"listening" not in out
    assert stderr.startswith(f"{path}: invalid\n")
    where = "listeners.proxy.tls"
    for line in (
        f"{where}.certificate: {expired.cert} expired on ",
        f"{where}.certificates[0].key: {mismatched.key} does not match the certificate "
        f"{mismatched.cert}",
        f"{where}.certificates[1].certificate: cannot read {tmp_path / 'missing.pem'}: "
        "no such file or directory",
        f"{where}.certificates[2].certificate: {early.cert} is not valid before ",
        f"{where}.certificates[3].hosts: {narrow.cert} does not cover 'api.example.org' "
        "(it covers: www.example.com)",
    ):
        assert line in stderr, stderr
    assert "Traceback" not in stderr


# ---------------------------------------------------------------------- serving


async def test_tls12_and_tls13_keep_alive_sni_and_forwarded_proto(tmp_path: Path) -> None:
    ca = TestCA(tmp_path)
    gw_cert = ca.issue("gw", ["test.local"])
    api = ca.issue("api", ["api.example.com"])
    wild = ca.issue("wild", ["*.example.com"])
    sni = [
        {"certificate": str(api.cert), "key": str(api.key), "hosts": ["api.example.com"]},
        {"certificate": str(wild.cert), "key": str(wild.key)},  # hosts: the certificate's
    ]
    async with (
        Upstream() as up,
        GatewayProcess(tls_config(up.url, gw_cert, certificates=sni)) as gw,
    ):
        for versions, expected in ((TLS12, "TLSv1.2"), (TLS13, "TLSv1.3")):
            async with TLSClient(gw.port, ca, **versions) as client:
                assert client.ssl_object.version() == expected
                assert client.serial == gw_cert.serial
                before = len(up.received)
                for i in range(3):  # one TLS connection, several requests
                    status, headers, body = await client.get(f"/echo?n={i}")
                    assert status == 200, body
                    assert headers.get("connection", "").lower() != "close"
                    assert json.loads(body)["query"] == f"n={i}"
                got = up.received[before:]
                assert len(got) == 3
                assert all(r.header("x-forwarded-proto") == "https" for r in got)
                assert got[0].header("x-forwarded-host") == "test.local"

        assert await handshake_serial(gw.port, ca, "api.example.com") == api.serial
        assert await handshake_serial(gw.port, ca, "web.example.com") == wild.serial
        async with TLSClient(gw.port, ca, "shop.example.com") as client:
            status, _, _ = await client.get()
            assert status == 200 and client.serial == wild.serial
        # a name no certificate is listed for gets the default one
        insecure = ca.client_context()
        insecure.check_hostname = False
        _, writer = await asyncio.open_connection(
            "127.0.0.1", gw.port, ssl=insecure, server_hostname="other.test"
        )
        assert peer_serial(writer.get_extra_info("ssl_object")) == gw_cert.serial
        writer.close()

        # plain HTTP on the TLS port is not served
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(1024), 5)
        assert not answer.startswith(b"HTTP/1.1 200")
        writer.close()


async def _curl(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        "curl",
        "-sS",
        "-v",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 15)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
async def test_curl_over_tls12_and_tls13(tmp_path: Path) -> None:
    ca = TestCA(tmp_path)
    cert = ca.issue("gw", ["test.local"])
    async with Upstream() as up, GatewayProcess(tls_config(up.url, cert)) as gw:
        url = f"https://test.local:{gw.port}/echo"
        common = ["--cacert", str(ca.cert_path), "--resolve", f"test.local:{gw.port}:127.0.0.1"]
        for flags, version in (
            (["--tlsv1.2", "--tls-max", "1.2"], "TLSv1.2"),
            (["--tlsv1.3"], "TLSv1.3"),
        ):
            code, out, err = await _curl(*common, *flags, url, url)  # two requests
            assert code == 0, err
            assert f"SSL connection using {version}" in err, err
            assert "Re-using existing connection" in err, err  # keep-alive over TLS
            docs = [json.loads(line) for line in out.replace("}{", "}\n{").splitlines()]
            assert len(docs) == 2
        assert all(r.header("x-forwarded-proto") == "https" for r in up.received)


async def test_min_version_13_refuses_tls12_and_stalled_handshakes_are_cut(
    tmp_path: Path,
) -> None:
    ca = TestCA(tmp_path)
    cert = ca.issue("gw", ["test.local"])
    async with Upstream() as up:
        cfg = tls_config(up.url, cert, min_version="1.3")
        cfg["limits"] = {"header_timeout": "500ms"}
        async with GatewayProcess(cfg) as gw:
            await _min_version_13_checks(gw, ca)


async def _min_version_13_checks(gw: GatewayProcess, ca: TestCA) -> None:
    """TLS 1.2 refused, TLS 1.3 served, a stalled handshake cut after `header_timeout`."""
    with pytest.raises((ssl.SSLError, ConnectionError)):
        async with TLSClient(gw.port, ca, **TLS12):
            pass
    async with TLSClient(gw.port, ca, **TLS13) as client:
        assert client.ssl_object.version() == "TLSv1.3"
        assert (await client.get())[0] == 200
    if shutil.which("curl"):
        code, _, err = await _curl(
            "--cacert",
            str(ca.cert_path),
            "--resolve",
            f"test.local:{gw.port}:127.0.0.1",
            "--tlsv1.2",
            "--tls-max",
            "1.2",
            f"https://test.local:{gw.port}/echo",
        )
        assert code == 35, err  # CURLE_SSL_CONNECT_ERROR

    # a client that opens a connection and never finishes the handshake is dropped
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    started = loop.time()
    writer.write(b"\x16\x03\x01")  # the start of a ClientHello, then nothing
    assert await asyncio.wait_for(reader.read(1024), 5) == b""
    assert loop.time() - started < 3
    writer.close()


# ---------------------------------------------------------------------- renewal


async def test_renewed_files_are_picked_up_without_restart(tmp_path: Path) -> None:
    ca = TestCA(tmp_path)
    a = ca.issue("gw", ["test.local"])
    env = {"APIGATE_TLS_WATCH_INTERVAL": "0.2"}
    async with (
        Upstream() as up,
        GatewayProcess(tls_config(up.url, a), env=env) as gw,
        TLSClient(gw.port, ca) as old,
    ):
        assert (await old.get())[0] == 200 and old.serial == a.serial
        pid = gw.pid

        b = ca.issue("gw", ["test.local"])  # renewed in place: same paths, new serial
        assert b.serial != a.serial
        await gw.wait_for_log("certificate reloaded", within=5)
        assert await handshake_serial(gw.port, ca) == b.serial
        assert (await old.get())[0] == 200  # the kept-alive connection still works
        assert old.serial == a.serial

        # a broken renewal is rejected and the current certificate keeps serving
        ca.expired("gw", ["test.local"])
        line = await gw.wait_for_log("reload rejected", within=5)
        assert "expired on" in line and str(a.cert) in line
        assert await handshake_serial(gw.port, ca) == b.serial
        assert (await old.get())[0] == 200
        assert gw.pid == pid and gw.proc is not None and gw.proc.returncode is None


async def test_sighup_reloads_default_and_sni_certificates(tmp_path: Path) -> None:
    ca = TestCA(tmp_path)
    a = ca.issue("gw", ["test.local"])
    api = ca.issue("api", ["api.example.com"])
    sni = [{"certificate": str(api.cert), "key": str(api.key)}]
    env = {"APIGATE_TLS_WATCH_INTERVAL": "0"}  # no watcher: only the signal reloads
    async with (
        Upstream() as up,
        GatewayProcess(tls_config(up.url, a, certificates=sni), env=env) as gw,
        TLSClient(gw.port, ca) as old,
    ):
        assert (await old.get())[0] == 200
        b = ca.issue("gw", ["test.local"])
        api2 = ca.issue("api", ["api.example.com"])
        await asyncio.sleep(0.3)
        assert await handshake_serial(gw.port, ca) == a.serial  # nothing watches the files

        gw.signal(signal.SIGHUP)
        await gw.wait_for_log("config reloaded", within=5)
        assert await handshake_serial(gw.port, ca) == b.serial
        assert await handshake_serial(gw.port, ca, "api.example.com") == api2.serial
        assert (await old.get())[0] == 200 and old.serial == a.serial


@pytest.mark.parametrize("command", ["validate", "check"])
async def test_validate_and_check_report_certificate_problems(tmp_path: Path, command: str) -> None:
    ca = TestCA(tmp_path)
    expired = ca.expired("expired", ["test.local"])
    path = tmp_path / "apigate.yaml"
    path.write_text(yaml.safe_dump(tls_config("http://127.0.0.1:9", expired)))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "apigate",
        command,
        "-c",
        str(path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 2
    assert f"listeners.proxy.tls.certificate: {expired.cert} expired on" in err.decode()
