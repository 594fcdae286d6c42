"""TLS termination on the proxy listener: a default certificate plus SNI-selected ones.

`ServerTLS(config)` reads every certificate and key once, checks them (readable, PEM, key
matches, within notBefore/notAfter, covers the `hosts` listed for it) and raises one
`ConfigError` naming each file and problem. `validate_tls(config)` runs the same checks and
returns the problems, for `apigate validate`; `tls_change_problems` is what a reload or an
admin change is refused for: only a changed `tls` section is checked (an unchanged one's
broken files are logged, not a reason to refuse an unrelated change).

Renewal without restart. The listener keeps ONE `SSLContext` for its whole life (the asyncio
server holds it). `reload()` (SIGHUP) and the file watcher (mtime, size and inode of every file,
every `APIGATE_TLS_WATCH_INTERVAL` seconds, default 5) re-read the files, check them like at
start-up, and only then call `load_cert_chain` on that same context: new handshakes get the new
certificate, established connections keep theirs. SNI certificates get a fresh context each
and the host map is rebuilt and swapped in one assignment. A renewed file that fails a check is
rejected with a logged error and the previous certificate keeps serving; it is not retried until
the files change again. A changed file is reloaded once it has stayed the same for one interval,
since renewal tools write the certificate and the key one after the other.

Two OpenSSL details shape the code:
- A failed `load_cert_chain` (say, a key that does not match) leaves the context half-updated,
  so files are checked first and the context loads the exact bytes that were checked (from an
  in-memory file on Linux), never a second read that a renewal may have changed in between.
- A context holds one certificate per key type: loading an ECDSA certificate into a context
  serving an RSA one keeps serving the old RSA one to clients that prefer RSA. When the default
  certificate's key type changes, it is served from a fresh context that the SNI callback
  (called for every handshake, with or without SNI) switches to.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import logging
import os
import ssl
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.x509.oid import NameOID

from apigate.config.errors import ConfigError

if TYPE_CHECKING:
    from apigate.config.schema import TLSConfig

__all__ = ["ServerTLS", "tls_change_problems", "validate_tls", "watch_interval"]

log = logging.getLogger("apigate.tls")

WATCH_INTERVAL_ENV = "APIGATE_TLS_WATCH_INTERVAL"
DEFAULT_WATCH_INTERVAL = 5.0
_MAX_FILE_BYTES = 1 << 20  # a PEM chain or key is a few KiB
_WHERE = "listeners.proxy.tls"

# (device, inode, mtime ns, size) of a file, or None when it cannot be stat'ed.
Stamp = tuple[int, int, int, int] | None


def watch_interval() -> float:
    """Seconds between two looks at the certificate files (0 turns the watcher off)."""
    raw = os.environ.get(WATCH_INTERVAL_ENV, "")
    try:
        value = float(raw) if raw else DEFAULT_WATCH_INTERVAL
    except ValueError:
        log.warning("%s=%r is not a number of seconds; using %s", WATCH_INTERVAL_ENV, raw, 5)
        return DEFAULT_WATCH_INTERVAL
    return max(value, 0.0)


def _stamp(path: str) -> Stamp:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


@dataclass(frozen=True)
class _Entry:
    """One configured certificate: the default one (`sni=False`) or an SNI one."""

    where: str  # its place in the config file, for messages
    certificate: str
    key: str
    sni: bool = False
    hosts: tuple[str, ...] | None = None  # SNI names; None: the names in the certificate

    def stamps(self) -> tuple[Stamp, Stamp]:
        return (_stamp(self.certificate), _stamp(self.key))


def _entries(tls: TLSConfig) -> list[_Entry]:
    out = [_Entry(_WHERE, tls.certificate, tls.key)]
    for i, extra in enumerate(tls.certificates):
        hosts = None if extra.hosts is None else tuple(h.lower() for h in extra.hosts)
        out.append(_Entry(f"{_WHERE}.certificates[{i}]", extra.certificate, extra.key, True, hosts))
    return out


@dataclass(frozen=True)
class _Loaded:
    """The checked contents of one entry's files."""

    entry: _Entry
    cert_pem: bytes
    key_pem: bytes
    leaf: x509.Certificate
    key_kind: str  # OpenSSL keeps one certificate per key type in a context
    names: tuple[str, ...]  # DNS names and IP addresses the certificate covers, lower-case
    stamp: tuple[Stamp, Stamp]

    @property
    def sni_hosts(self) -> tuple[str, ...]:
        hosts = self.entry.hosts
        return self.names if hosts is None else hosts

    def describe(self) -> dict[str, object]:
        return {
            "certificate": self.entry.certificate,
            "serial": format(self.leaf.serial_number, "x"),
            "not_after": self.leaf.not_valid_after_utc.isoformat(),
            "names": list(self.names),
            "hosts": list(self.sni_hosts) if self.entry.sni else None,
        }


def _read(path: str) -> bytes:
    st = os.stat(path)
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(21, "is a directory")
    if not stat.S_ISREG(st.st_mode):
        raise OSError(0, "not a regular file")
    with open(path, "rb") as f:
        data = f.read(_MAX_FILE_BYTES + 1)
    if len(data) > _MAX_FILE_BYTES:
        raise OSError(0, "larger than 1 MiB; not a PEM file")
    return data


def _read_problem(path: str, exc: OSError) -> str:
    reason = (exc.strerror or str(exc)).lower()
    return f"cannot read {path}: {reason}"


def _key_kind(key: object) -> str:
    for kind, cls in (
        ("rsa", rsa.RSAPrivateKey),
        ("ec", ec.EllipticCurvePrivateKey),
        ("ed25519", ed25519.Ed25519PrivateKey),
        ("ed448", ed448.Ed448PrivateKey),
        ("dsa", dsa.DSAPrivateKey),
    ):
        if isinstance(key, cls):
            return kind
    return type(key).__name__


def _names(cert: x509.Certificate) -> tuple[str, ...]:
    """DNS names and IP addresses of the subjectAltName, or the common name without one."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        common = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return tuple(str(a.value).lower() for a in common[:1])
    dns = [name.lower().rstrip(".") for name in san.get_values_for_type(x509.DNSName)]
    ips = [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    return tuple(dict.fromkeys([*dns, *ips]))


def _covers(names: tuple[str, ...], host: str) -> bool:
    """Whether a certificate naming `names` is valid for `host` (or host pattern `*.x.y`)."""
    if host in names:
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return any(_same_ip(name, ip) for name in names)
    label, dot, parent = host.partition(".")
    return bool(dot) and label != "*" and f"*.{parent}" in names


def _same_ip(name: str, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    try:
        return ipaddress.ip_address(name) == ip
    except ValueError:
        return False


def _utc(moment: dt.datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def _check(entry: _Entry, now: dt.datetime) -> tuple[_Loaded | None, list[str]]:
    """Read and check one entry's files: the contents, or the problems ("path: message")."""
    stamp = entry.stamps()
    problems: list[str] = []
    cert_pem = key_pem = b""
    try:
        cert_pem = _read(entry.certificate)
    except OSError as exc:
        problems.append(f"{entry.where}.certificate: {_read_problem(entry.certificate, exc)}")
    try:
        key_pem = _read(entry.key)
    except OSError as exc:
        problems.append(f"{entry.where}.key: {_read_problem(entry.key, exc)}")
    if problems:
        return None, problems

    chain: list[x509.Certificate] = []
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
    except ValueError:
        problems.append(f"{entry.where}.certificate: {entry.certificate}: no PEM certificate in it")
    key = None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        problems.append(
            f"{entry.where}.key: {entry.key}: the key is encrypted; "
            "passphrase-protected keys are not supported"
        )
    except (ValueError, UnsupportedAlgorithm):
        problems.append(f"{entry.where}.key: {entry.key}: not a PEM private key")
    if not chain or key is None:
        return None, problems

    leaf = chain[0]
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if key.public_key().public_bytes(der, spki) != leaf.public_key().public_bytes(der, spki):
        problems.append(
            f"{entry.where}.key: {entry.key} does not match the certificate {entry.certificate}"
        )
    if leaf.not_valid_after_utc <= now:
        problems.append(
            f"{entry.where}.certificate: {entry.certificate} expired on "
            f"{_utc(leaf.not_valid_after_utc)}"
        )
    elif leaf.not_valid_before_utc > now:
        problems.append(
            f"{entry.where}.certificate: {entry.certificate} is not valid before "
            f"{_utc(leaf.not_valid_before_utc)}"
        )
    for i, cert in enumerate(chain[1:], 1):
        # Only a warning: clients that trust a root closer to the leaf skip such a certificate
        # (an old cross-signature, say), and refusing to start over it would be worse.
        if not cert.not_valid_before_utc <= now < cert.not_valid_after_utc:
            log.warning(
                "%s: chain certificate %d (%s) is outside its validity period (%s to %s)",
                entry.certificate,
                i,
                cert.subject.rfc4514_string(),
                _utc(cert.not_valid_before_utc),
                _utc(cert.not_valid_after_utc),
                extra={"event": "tls_chain", "certificate": entry.certificate},
            )
    names = _names(leaf)
    if entry.sni:
        if entry.hosts is None and not names:
            problems.append(f"{entry.where}: {entry.certificate} names no host; list its `hosts`")
        for host in entry.hosts or ():
            if not _covers(names, host):
                covered = ", ".join(names) or "no names"
                problems.append(
                    f"{entry.where}.hosts: {entry.certificate} does not cover {host!r} "
                    f"(it covers: {covered})"
                )
    if problems:
        return None, problems
    return _Loaded(entry, cert_pem, key_pem, leaf, _key_kind(key), names, stamp), []


@contextlib.contextmanager
def _as_files(*blobs: bytes) -> Iterator[list[str]]:
    """Paths holding exactly `blobs`, for `load_cert_chain`, which only reads files.

    Anonymous memory files on Linux (the key never touches a disk); a private temporary
    directory elsewhere.
    """
    if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
        fds: list[int] = []
        try:
            for blob in blobs:
                fd = os.memfd_create("apigate-tls", os.MFD_CLOEXEC)
                fds.append(fd)
                with os.fdopen(os.dup(fd), "wb") as f:
                    f.write(blob)
            yield [f"/proc/self/fd/{fd}" for fd in fds]
        finally:
            for fd in fds:
                os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="apigate-tls-") as tmp:
        paths = []
        for i, blob in enumerate(blobs):
            path = Path(tmp) / str(i)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
            paths.append(str(path))
        yield paths


def _load_into(ctx: ssl.SSLContext, loaded: _Loaded) -> None:
    with _as_files(loaded.cert_pem, loaded.key_pem) as (cert, key):
        ctx.load_cert_chain(cert, key)


def _minimum(tls: TLSConfig) -> ssl.TLSVersion:
    return ssl.TLSVersion.TLSv1_3 if tls.min_version == "1.3" else ssl.TLSVersion.TLSv1_2


def _new_context(minimum: ssl.TLSVersion) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = minimum
    ctx.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def _context_for(loaded: _Loaded, minimum: ssl.TLSVersion) -> tuple[ssl.SSLContext | None, str]:
    """A fresh context serving `loaded`, or the reason OpenSSL refuses it."""
    ctx = _new_context(minimum)
    try:
        _load_into(ctx, loaded)
    except (OSError, ssl.SSLError) as exc:
        entry = loaded.entry
        return None, f"{entry.where}: cannot load {entry.certificate} / {entry.key}: {exc}"
    return ctx, ""


@dataclass
class _Slot:
    """A configured certificate as served: its checked contents and the context serving it."""

    current: _Loaded
    context: ssl.SSLContext
    pending: tuple[Stamp, Stamp] | None = None  # changed files, waiting to settle
    failed: tuple[Stamp, Stamp] | None = None  # rejected files: not retried until they change

    @property
    def entry(self) -> _Entry:
        return self.current.entry


def _prepare(tls: TLSConfig) -> tuple[list[_Slot], list[str]]:
    """Check and load every certificate of `tls`: the slots, or every problem found."""
    now = dt.datetime.now(dt.UTC)
    minimum = _minimum(tls)
    slots: list[_Slot] = []
    problems: list[str] = []
    for entry in _entries(tls):
        loaded, found = _check(entry, now)
        problems += found
        if loaded is None:
            continue
        ctx, problem = _context_for(loaded, minimum)
        if ctx is None:
            problems.append(problem)
            continue
        slots.append(_Slot(loaded, ctx))
    claimed: dict[str, str] = {}
    for entry in _entries(tls):
        for host in entry.hosts or ():
            if claimed.get(host, entry.where) != entry.where:
                problems.append(
                    f"{entry.where}.hosts: {host!r} is already listed in {claimed[host]}"
                )
            claimed.setdefault(host, entry.where)
    return slots, problems


def validate_tls(tls: TLSConfig | None) -> list[str]:
    """Every problem with the proxy listener's TLS files ("path: message"), for `validate`."""
    if tls is None:
        return []
    return _prepare(tls)[1]


def tls_change_problems(tls: TLSConfig | None, in_force: TLSConfig | None) -> list[str]:
    """The TLS problems that refuse a new config (a reload, an admin change) whose
    `listeners.proxy.tls` is `tls`, on a gateway whose config in force has `in_force`.

    A changed section is checked as at start-up. An unchanged one is not refused over what its
    files hold now: the listener keeps serving the certificates it checked when it loaded them
    (the watcher and SIGHUP reject a bad renewal the same way), so one expired or broken file
    on disk must not block every unrelated reload and admin change. It is logged as a warning.
    """
    problems = validate_tls(tls)
    if not problems or tls != in_force:
        return problems
    log.warning(
        "the certificate files of listeners.proxy.tls have problems; the certificates loaded "
        "before keep serving and this config change goes ahead:\n%s",
        "\n".join(problems),
        extra={"event": "tls_files", "ok": False},
    )
    return []


class ServerTLS:
    """The proxy listener's TLS: one long-lived `context`, reloadable certificates."""

    def __init__(self, tls: TLSConfig) -> None:
        slots, problems = _prepare(tls)
        if problems:
            raise ConfigError(problems)
        self.config = tls
        self.context = _new_context(_minimum(tls))
        self.context.sni_callback = self._pick
        self._slots: list[_Slot] = []
        self._by_host: dict[str, ssl.SSLContext] = {}
        # Key types loaded into `context` so far, and the context serving the default
        # certificate instead of it once a renewal changed the key type (see the module doc).
        self._listener_kinds: set[str] = set()
        self._default_context: ssl.SSLContext | None = None
        self._task: asyncio.Task[None] | None = None
        self._install(slots)

    # ------------------------------------------------------------------ serving
    def _pick(self, conn: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext) -> None:
        """SNI callback: runs in every handshake, before the certificate is chosen."""
        ctx = None
        if server_name and self._by_host:
            name = server_name.lower().rstrip(".")
            ctx = self._by_host.get(name)
            if ctx is None:
                dot = name.find(".")
                if dot > 0:
                    ctx = self._by_host.get("*" + name[dot:])
        if ctx is None:
            ctx = self._default_context
        if ctx is not None:
            conn.context = ctx

    def _use_default(self, slot: _Slot) -> None:
        kinds = self._listener_kinds | {slot.current.key_kind}
        if len(kinds) == 1:
            try:
                _load_into(self.context, slot.current)
            except (OSError, ssl.SSLError) as exc:  # checked bytes: not expected
                log.error(
                    "loading the default certificate into the listener failed (%s); "
                    "serving it through the SNI callback",
                    exc,
                    extra={"event": "tls_reload"},
                )
                self._default_context = slot.context
            else:
                self._listener_kinds = kinds
                self._default_context = None
            return
        self._default_context = slot.context

    def _rebuild_map(self) -> None:
        by_host: dict[str, ssl.SSLContext] = {}
        for slot in self._slots[1:]:
            for host in slot.current.sni_hosts:
                by_host.setdefault(host, slot.context)  # the first listed certificate wins
        self._by_host = by_host  # one assignment: a handshake sees the old map or the new

    def _install(self, slots: list[_Slot]) -> None:
        self._use_default(slots[0])
        self._slots = slots
        self._rebuild_map()

    # ------------------------------------------------------------------ reloading
    def _reload_slot(self, slot: _Slot, now: dt.datetime) -> bool:
        entry = slot.entry
        loaded, problems = _check(entry, now)
        ctx = None
        if loaded is not None:
            ctx, problem = _context_for(loaded, _minimum(self.config))
            if ctx is None:
                problems.append(problem)
        if loaded is None or ctx is None:
            slot.failed = loaded.stamp if loaded is not None else entry.stamps()
            log.error(
                "certificate reload rejected; the previous certificate keeps serving: %s",
                "; ".join(problems),
                extra={"event": "tls_reload", "ok": False, "certificate": entry.certificate},
            )
            return False
        slot.current, slot.context, slot.failed = loaded, ctx, None
        if not entry.sni:
            self._use_default(slot)
        log.info(
            "certificate reloaded: %s serial %x valid until %s",
            entry.certificate,
            loaded.leaf.serial_number,
            _utc(loaded.leaf.not_valid_after_utc),
            extra={"event": "tls_reload", "ok": True, "certificate": entry.certificate},
        )
        return True

    def reload(self) -> bool:
        """Re-read every certificate now (SIGHUP). False when any was rejected."""
        now = dt.datetime.now(dt.UTC)
        ok = True
        for slot in self._slots:
            slot.pending = None
            ok = self._reload_slot(slot, now) and ok
        self._rebuild_map()
        return ok

    def poll(self) -> None:
        """Reload the certificates whose files changed and then stayed the same for a tick."""
        now = dt.datetime.now(dt.UTC)
        changed = False
        for slot in self._slots:
            stamps = slot.entry.stamps()
            if stamps in (slot.current.stamp, slot.failed):
                slot.pending = None
            elif stamps != slot.pending:
                slot.pending = stamps
            else:
                slot.pending = None
                changed = self._reload_slot(slot, now) or changed
        if changed:
            self._rebuild_map()

    def update(self, tls: TLSConfig | None) -> None:
        """Apply a reloaded config's `listeners.proxy.tls`; the old one stays on any problem."""
        if tls == self.config:
            return
        if tls is None:
            log.warning(
                "listeners.proxy.tls was removed: TLS stays on until a restart",
                extra={"event": "tls_reload", "ok": False},
            )
            return
        slots, problems = _prepare(tls)
        if problems:
            log.error(
                "new listeners.proxy.tls rejected; the previous certificates keep serving:\n%s",
                "\n".join(problems),
                extra={"event": "tls_reload", "ok": False},
            )
            return
        self.context.minimum_version = _minimum(tls)
        self.config = tls
        self._install(slots)
        log.info("listeners.proxy.tls applied", extra={"event": "tls_reload", "ok": True})

    # ------------------------------------------------------------------ watching
    def watch(self, interval: float | None = None) -> None:
        """Poll the files every `interval` seconds (default: `watch_interval()`)."""
        seconds = watch_interval() if interval is None else interval
        if seconds > 0 and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._watch(seconds))

    async def _watch(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                self.poll()
            except Exception:  # the watcher must outlive any surprise
                log.exception("certificate watcher failed", extra={"event": "tls_reload"})

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def status(self) -> list[dict[str, object]]:
        """What each configured certificate serves now (for the admin API or logs)."""
        return [slot.current.describe() for slot in self._slots]
