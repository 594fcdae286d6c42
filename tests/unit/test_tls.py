"""TLS termination without sockets: file checks, SNI choice and in-place reloads.

Handshakes run between two `ssl.SSLObject`s over memory BIOs, so what a real client would see
(the certificate served, the protocol version) is checked without opening a port.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import ssl
from pathlib import Path
from typing import Any

import pytest

from apigate.config.errors import ConfigError
from apigate.config.schema import TLSConfig
from apigate.http.tls import WATCH_INTERVAL_ENV, ServerTLS, validate_tls, watch_interval
from tests.support.certs import CertFiles, TestCA, cert_pem, peer_serial


@pytest.fixture
def ca(tmp_path: Path) -> TestCA:
    return TestCA(tmp_path)


def tls_config(
    default: CertFiles, *extras: tuple[CertFiles, list[str] | None], **kw: Any
) -> TLSConfig:
    return TLSConfig.model_validate(
        {
            "certificate": str(default.cert),
            "key": str(default.key),
            "certificates": [
                {"certificate": str(c.cert), "key": str(c.key), "hosts": hosts}
                for c, hosts in extras
            ],
            **kw,
        }
    )


class Pair:
    """A client and a server SSLObject joined by memory BIOs."""

    def __init__(
        self, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, server_name: str | None
    ) -> None:
        self.c_in, self.c_out, self.s_in, self.s_out = (ssl.MemoryBIO() for _ in range(4))
        self.client = client_ctx.wrap_bio(self.c_in, self.c_out, server_hostname=server_name)
        self.server = server_ctx.wrap_bio(self.s_in, self.s_out, server_side=True)

    def _pump(self) -> None:
        if self.c_out.pending:
            self.s_in.write(self.c_out.read())
        if self.s_out.pending:
            self.c_in.write(self.s_out.read())

    def handshake(self) -> Pair:
        done = {"client": False, "server": False}
        for _ in range(20):
            for side, obj in (("client", self.client), ("server", self.server)):
                if not done[side]:
                    try:
                        obj.do_handshake()
                        done[side] = True
                    except ssl.SSLWantReadError:
                        pass
                self._pump()
            if all(done.values()):
                return self
        raise AssertionError("handshake did not finish")

    def roundtrip(self, data: bytes) -> bytes:
        """Client → server → client: proves the connection still carries data."""
        self.client.write(data)
        self._pump()
        got = self.server.read(65536)
        self.server.write(got.upper())
        self._pump()
        return self.client.read(65536)

    @property
    def serial(self) -> int:
        return peer_serial(self.client)


def connect(
    tls: ServerTLS,
    ca: TestCA,
    server_name: str | None = "test.local",
    **client: Any,
) -> Pair:
    ctx = ca.client_context(**client)
    if server_name is None:
        ctx.check_hostname = False
    return Pair(tls.context, ctx, server_name).handshake()


# ---------------------------------------------------------------------- start-up checks


def test_valid_config_has_no_problems(ca: TestCA) -> None:
    gw = ca.issue("gw", ["test.local"])
    api = ca.issue("api", ["api.example.com"])
    assert validate_tls(tls_config(gw, (api, ["api.example.com"]), (api, None))) == []
    assert validate_tls(None) == []


def test_missing_files_are_named(ca: TestCA, tmp_path: Path) -> None:
    gw = ca.issue("gw", ["test.local"])
    missing = CertFiles(tmp_path / "nope.pem", tmp_path / "nope.key", 0)
    problems = validate_tls(tls_config(missing, (CertFiles(gw.cert, missing.key, 0), None)))
    assert problems == [
        f"listeners.proxy.tls.certificate: cannot read {missing.cert}: no such file or directory",
        f"listeners.proxy.tls.key: cannot read {missing.key}: no such file or directory",
        f"listeners.proxy.tls.certificates[0].key: cannot read {missing.key}: "
        "no such file or directory",
    ]


def test_directory_is_not_a_certificate(ca: TestCA, tmp_path: Path) -> None:
    gw = ca.issue("gw", ["test.local"])
    problems = validate_tls(tls_config(CertFiles(tmp_path, gw.key, 0)))
    assert problems == [f"listeners.proxy.tls.certificate: cannot read {tmp_path}: is a directory"]


def test_permission_denied_is_named(ca: TestCA, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file the gateway may not read is named (the read is refused here, since tests
    often run as root, who can read anything)."""
    import apigate.http.tls as tls_module

    gw = ca.issue("gw", ["test.local"])

    def refuse(path: str, mode: str = "r") -> Any:
        if str(path) == str(gw.key):
            raise PermissionError(13, "Permission denied")
        return open(path, mode)

    monkeypatch.setattr(tls_module, "open", refuse, raising=False)
    problems = validate_tls(tls_config(gw))
    assert problems == [f"listeners.proxy.tls.key: cannot read {gw.key}: permission denied"]


def test_not_pem(ca: TestCA, tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("hello\n")
    problems = validate_tls(tls_config(CertFiles(junk, junk, 0)))
    assert problems == [
        f"listeners.proxy.tls.certificate: {junk}: no PEM certificate in it",
        f"listeners.proxy.tls.key: {junk}: not a PEM private key",
    ]


def test_encrypted_key_is_refused(ca: TestCA) -> None:
    from cryptography.hazmat.primitives import serialization

    gw = ca.issue("gw", ["test.local"])
    key = serialization.load_pem_private_key(gw.key.read_bytes(), None)
    gw.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"pw"),
        )
    )
    [problem] = validate_tls(tls_config(gw))
    assert problem.startswith(f"listeners.proxy.tls.key: {gw.key}: the key is encrypted")


def test_mismatched_key(ca: TestCA) -> None:
    bad = ca.mismatched("bad", ["test.local"])
    assert validate_tls(tls_config(bad)) == [
        f"listeners.proxy.tls.key: {bad.key} does not match the certificate {bad.cert}"
    ]


def test_expired_and_not_yet_valid(ca: TestCA) -> None:
    gw = ca.issue("gw", ["test.local"])
    old = ca.expired("old", ["old.example.com"])
    new = ca.not_yet_valid("new", ["new.example.com"])
    problems = validate_tls(tls_config(gw, (old, None), (new, None)))
    assert len(problems) == 2
    assert problems[0].startswith(
        f"listeners.proxy.tls.certificates[0].certificate: {old.cert} expired on "
    )
    assert problems[0].endswith(" UTC")
    assert problems[1].startswith(
        f"listeners.proxy.tls.certificates[1].certificate: {new.cert} is not valid before "
    )


def test_expired_chain_certificate_is_only_a_warning(
    ca: TestCA, caplog: pytest.LogCaptureFixture
) -> None:
    gw = ca.issue("gw", ["test.local"])
    now = dt.datetime.now(dt.UTC)
    stale = ca.certificate(
        ["old intermediate"],
        ca.key,
        not_before=now - dt.timedelta(days=9),
        not_after=now - dt.timedelta(days=1),
    )
    gw.cert.write_bytes(gw.cert.read_bytes() + cert_pem(stale))
    with caplog.at_level(logging.WARNING, "apigate.tls"):
        assert validate_tls(tls_config(gw)) == []
    assert f"{gw.cert}: chain certificate 1 (CN=old intermediate) is outside" in caplog.text


def test_sni_hosts_must_be_covered(ca: TestCA) -> None:
    gw = ca.issue("gw", ["test.local"])
    wild = ca.issue("wild", ["*.example.com", "example.org"])
    ok = ["*.example.com", "a.example.com", "example.org", "EXAMPLE.ORG"]
    assert validate_tls(tls_config(gw, (wild, ok))) == []
    bad = ["a.b.example.com", "example.com", "other.org"]
    problems = validate_tls(tls_config(gw, (wild, bad)))
    assert problems == [
        f"listeners.proxy.tls.certificates[0].hosts: {wild.cert} does not cover {host!r} "
        "(it covers: *.example.com, example.org)"
        for host in bad
    ]


def test_ip_hosts_are_covered_by_ip_names(ca: TestCA) -> None:
    gw = ca.issue("gw", ["test.local"])
    ip = ca.issue("ip", ["127.0.0.1", "::1"])
    assert validate_tls(tls_config(gw, (ip, ["127.0.0.1", "::1"]))) == []
    [problem] = validate_tls(tls_config(gw, (ip, ["10.0.0.1"])))
    assert "does not cover '10.0.0.1'" in problem


def test_host_listed_twice(ca: TestCA) -> None:
    gw = ca.issue("gw", ["test.local"])
    a = ca.issue("a", ["api.example.com"])
    problems = validate_tls(tls_config(gw, (a, ["api.example.com"]), (a, ["api.example.com"])))
    assert problems == [
        "listeners.proxy.tls.certificates[1].hosts: 'api.example.com' is already listed in "
        "listeners.proxy.tls.certificates[0]"
    ]


def test_server_tls_raises_every_problem(ca: TestCA) -> None:
    old = ca.expired("old", ["test.local"])
    bad = ca.mismatched("bad", ["api.example.com"])
    with pytest.raises(ConfigError) as err:
        ServerTLS(tls_config(old, (bad, None)))
    assert len(err.value.errors) == 2
    assert "expired on" in err.value.errors[0] and str(old.cert) in err.value.errors[0]
    assert "does not match" in err.value.errors[1] and str(bad.key) in err.value.errors[1]


# ---------------------------------------------------------------------- serving


def test_tls12_and_tls13_and_min_version(ca: TestCA) -> None:
    gw = ca.issue("gw", ["test.local"])
    tls = ServerTLS(tls_config(gw))
    v12 = connect(tls, ca, maximum=ssl.TLSVersion.TLSv1_2)
    assert v12.client.version() == "TLSv1.2" and v12.serial == gw.serial
    assert v12.client.selected_alpn_protocol() is None  # the client offered none
    v13 = connect(tls, ca, minimum=ssl.TLSVersion.TLSv1_3)
    assert v13.client.version() == "TLSv1.3" and v13.roundtrip(b"hi") == b"HI"

    strict = ServerTLS(tls_config(gw, min_version="1.3"))
    with pytest.raises(ssl.SSLError):
        connect(strict, ca, maximum=ssl.TLSVersion.TLSv1_2)
    assert connect(strict, ca).client.version() == "TLSv1.3"


def test_sni_exact_wildcard_and_fallback(ca: TestCA) -> None:
    gw = ca.issue("gw", ["test.local"])
    api = ca.issue("api", ["api.example.com"])
    wild = ca.issue("wild", ["*.example.com"])
    named = ca.issue("named", ["named.example.net", "*.named.example.net"])  # hosts from the cert
    tls = ServerTLS(
        tls_config(gw, (wild, ["*.example.com"]), (api, ["api.example.com"]), (named, None))
    )
    assert connect(tls, ca, "test.local").serial == gw.serial
    assert connect(tls, ca, "api.example.com").serial == api.serial  # exact beats wildcard
    assert connect(tls, ca, "API.Example.COM").serial == api.serial
    assert connect(tls, ca, "web.example.com").serial == wild.serial
    assert connect(tls, ca, "named.example.net").serial == named.serial
    assert connect(tls, ca, "x.named.example.net").serial == named.serial
    assert connect(tls, ca, None).serial == gw.serial  # no SNI at all
    # a name nobody serves gets the default certificate (which the client then refuses)
    with pytest.raises(ssl.SSLCertVerificationError):
        connect(tls, ca, "a.b.example.com")
    insecure = ca.client_context()
    insecure.check_hostname = False
    pair = Pair(tls.context, insecure, "a.b.example.com").handshake()
    assert pair.serial == gw.serial
    assert [s["serial"] for s in tls.status()] == [
        format(c.serial, "x") for c in (gw, wild, api, named)
    ]


# ---------------------------------------------------------------------- reloading


def test_reload_keeps_the_context_and_old_connections(ca: TestCA) -> None:
    a = ca.issue("gw", ["test.local"])
    tls = ServerTLS(tls_config(a))
    context = tls.context
    old = connect(tls, ca)
    assert old.serial == a.serial
    b = ca.issue("gw", ["test.local"])  # renewed: same paths, new serial
    assert tls.reload() is True
    assert tls.context is context
    assert connect(tls, ca).serial == b.serial
    assert old.serial == a.serial and old.roundtrip(b"still here") == b"STILL HERE"


def test_rejected_renewal_keeps_serving_the_old_certificate(
    ca: TestCA, caplog: pytest.LogCaptureFixture
) -> None:
    a = ca.issue("gw", ["test.local"])
    tls = ServerTLS(tls_config(a))
    breakages = {
        "does not match": lambda: ca.issue("gw", ["test.local"], mismatched_key=True),
        "expired on": lambda: ca.expired("gw", ["test.local"]),
        "is not valid before": lambda: ca.not_yet_valid("gw", ["test.local"]),
        "not a PEM private key": lambda: a.key.write_text("garbage"),
        "no such file": lambda: a.key.unlink(),
    }
    for problem, breakage in breakages.items():
        breakage()
        caplog.clear()
        with caplog.at_level(logging.ERROR, "apigate.tls"):
            assert tls.reload() is False
        assert "the previous certificate keeps serving" in caplog.text
        assert problem in caplog.text
        # the live context was not touched: handshakes still get the previous certificate
        assert connect(tls, ca).serial == a.serial
        assert connect(tls, ca, None).serial == a.serial


def test_rejected_sni_renewal_keeps_its_previous_certificate(ca: TestCA) -> None:
    gw = ca.issue("gw", ["test.local"])
    api = ca.issue("api", ["api.example.com"])
    tls = ServerTLS(tls_config(gw, (api, ["api.example.com"])))
    ca.issue("api", ["www.example.com"])  # no longer covers the listed host
    assert tls.reload() is False
    assert connect(tls, ca, "api.example.com").serial == api.serial
    api2 = ca.issue("api", ["api.example.com"])
    assert tls.reload() is True
    assert connect(tls, ca, "api.example.com").serial == api2.serial


def test_sni_names_from_certificate_follow_renewal(ca: TestCA) -> None:
    gw = ca.issue("gw", ["test.local"])
    x = ca.issue("x", ["one.example.com"])
    tls = ServerTLS(tls_config(gw, (x, None)))
    assert connect(tls, ca, "one.example.com").serial == x.serial
    x2 = ca.issue("x", ["two.example.com"])
    assert tls.reload() is True
    assert connect(tls, ca, "two.example.com").serial == x2.serial
    insecure = ca.client_context()
    insecure.check_hostname = False
    assert Pair(tls.context, insecure, "one.example.com").handshake().serial == gw.serial


def test_key_type_change_does_not_leave_the_old_certificate_served(ca: TestCA) -> None:
    rsa_cert = ca.issue("gw", ["test.local"], key_type="rsa")
    tls = ServerTLS(tls_config(rsa_cert))
    rsa_only = {"maximum": ssl.TLSVersion.TLSv1_2}

    def client(ciphers: str) -> ssl.SSLContext:
        ctx = ca.client_context(**rsa_only)
        ctx.set_ciphers(ciphers)
        return ctx

    assert Pair(tls.context, client("ECDHE-RSA-AES128-GCM-SHA256"), "test.local").handshake()
    ec_cert = ca.issue("gw", ["test.local"], key_type="ec")
    assert tls.reload() is True
    assert connect(tls, ca).serial == ec_cert.serial
    ecdsa = Pair(tls.context, client("ECDHE-ECDSA-AES128-GCM-SHA256"), "test.local").handshake()
    assert ecdsa.serial == ec_cert.serial
    # an RSA-only client must not be handed the replaced RSA certificate
    with pytest.raises(ssl.SSLError):
        Pair(tls.context, client("ECDHE-RSA-AES128-GCM-SHA256"), "test.local").handshake()
    # and back to RSA: loaded in place again
    rsa2 = ca.issue("gw", ["test.local"], key_type="rsa")
    assert tls.reload() is True
    rsa_pair = Pair(tls.context, client("ECDHE-RSA-AES128-GCM-SHA256"), "test.local").handshake()
    assert rsa_pair.serial == rsa2.serial
    assert connect(tls, ca).serial == rsa2.serial


def test_poll_waits_for_files_to_settle_and_does_not_retry_failures(
    ca: TestCA, caplog: pytest.LogCaptureFixture
) -> None:
    a = ca.issue("gw", ["test.local"])
    tls = ServerTLS(tls_config(a))
    tls.poll()
    assert connect(tls, ca).serial == a.serial
    b = ca.issue("gw", ["test.local"])
    tls.poll()  # changed: wait one tick in case the key is still being written
    assert connect(tls, ca).serial == a.serial
    tls.poll()
    assert connect(tls, ca).serial == b.serial
    # half a renewal (new certificate, old key) is rejected once, then not retried
    ca.issue("gw", ["test.local"], key_path=a.key.with_name("elsewhere.key"))
    with caplog.at_level(logging.ERROR, "apigate.tls"):
        for _ in range(5):
            tls.poll()
    assert caplog.text.count("reload rejected") == 1
    assert connect(tls, ca).serial == b.serial
    c = ca.issue("gw", ["test.local"])  # the renewal completes
    tls.poll()
    tls.poll()
    assert connect(tls, ca).serial == c.serial


def test_update_applies_a_new_tls_section_or_keeps_the_old(ca: TestCA) -> None:
    gw = ca.issue("gw", ["test.local"])
    api = ca.issue("api", ["api.example.com"])
    tls = ServerTLS(tls_config(gw))
    context = tls.context
    tls.update(tls_config(gw, (api, None), min_version="1.3"))
    assert tls.context is context
    assert connect(tls, ca, "api.example.com").serial == api.serial
    with pytest.raises(ssl.SSLError):
        connect(tls, ca, maximum=ssl.TLSVersion.TLSv1_2)
    bad = ca.mismatched("bad", ["bad.example.com"])
    tls.update(tls_config(gw, (bad, None)))
    assert connect(tls, ca, "api.example.com").serial == api.serial
    tls.update(None)  # TLS cannot be turned off without a restart
    assert connect(tls, ca).serial == gw.serial


def test_watch_interval_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(WATCH_INTERVAL_ENV, raising=False)
    assert watch_interval() == 5.0
    monkeypatch.setenv(WATCH_INTERVAL_ENV, "0.2")
    assert watch_interval() == 0.2
    monkeypatch.setenv(WATCH_INTERVAL_ENV, "soon")
    assert watch_interval() == 5.0
    monkeypatch.setenv(WATCH_INTERVAL_ENV, "0")
    assert watch_interval() == 0.0


async def test_watcher_reloads_changed_files(ca: TestCA) -> None:
    a = ca.issue("gw", ["test.local"])
    tls = ServerTLS(tls_config(a))
    tls.watch(0.02)
    try:
        b = ca.issue("gw", ["test.local"])
        for _ in range(100):
            await asyncio.sleep(0.02)
            if tls.status()[0]["serial"] == format(b.serial, "x"):
                break
        assert connect(tls, ca).serial == b.serial
    finally:
        await tls.close()
