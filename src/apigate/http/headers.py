"""Header rules shared by both directions: hop-by-hop removal, forwarding headers, request ids.

Header names arrive as the peer spelled them; we compare lower-cased names against frozen sets
built here once. Values are bytes end to end: nothing is decoded unless a feature needs it.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Collection, Iterable
from typing import Final

from mypy_extensions import i64

# RFC 9110 §7.6.1 plus the de-facto ones every proxy drops (Go's httputil list).
# Content-Length is not hop-by-hop but we always re-frame bodies ourselves, so it is handled
# separately by the framing code.
HOP_BY_HOP: Final[frozenset[bytes]] = frozenset(
    {
        b"connection",
        b"proxy-connection",
        b"keep-alive",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)

# Request headers the gateway sets itself: a client's copy is dropped (or, for a trusted peer,
# extended) so that an upstream can trust what it reads.
FORWARDING: Final[frozenset[bytes]] = frozenset(
    {
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"x-forwarded-port",
        b"x-forwarded-prefix",
        b"forwarded",
        b"x-real-ip",
    }
)

# Request headers that say who the caller is, as Kong's auth plugins send them upstream: the
# gateway sets the consumer's (ProxyExchange, once an auth plugin identified one) and a client's
# own are always dropped, trusted peer or not, so that an upstream can believe them.
IDENTITY: Final[frozenset[bytes]] = frozenset(
    {
        b"x-consumer-id",
        b"x-consumer-username",
        b"x-consumer-custom-id",
        b"x-consumer-groups",
        b"x-credential-identifier",
        b"x-anonymous-consumer",
    }
)

VIA_VALUE: Final = b"1.1 apigate"
# RFC 9110 §7.6.3: a proxy sends Via in each message it forwards (as Kong's `Via: kong/...`)
VIA_LINE: Final = b"Via: " + VIA_VALUE + b"\r\n"


class FieldKinds:
    """A parser's table of the field names it treats specially: lower-case name -> kind (a
    small int; 0 for every other name), looked up in whatever letter case a name arrives.

    httptools hands each field's name over as a new bytes object, so a dict lookup hashed it
    first (~35 ns a field, most of them nothing special). Compiled, `kind` compares bytes
    instead: only with the special names of the same length and first letter (one bucket of
    a flat table, usually empty), the usual spelling first ("Content-Length"), then letter by
    letter. A name of another length or first letter (Date, Server, User-Agent, ...) costs
    one index.
    """

    __slots__ = ("_buckets", "_longest")

    def __init__(self, kinds: dict[bytes, int]) -> None:
        self._longest = max(len(name) for name in kinds)
        buckets: list[list[tuple[bytes, bytes, int]]] = [
            [] for _ in range(_bucket(self._longest, 0x1F) + 1)
        ]
        for lname, kind in sorted(kinds.items()):
            title = b"-".join([part.capitalize() for part in lname.split(b"-")])
            buckets[_bucket(len(lname), lname[0])].append((title, lname, kind))
        self._buckets = [tuple(entries) for entries in buckets]

    def kind(self, name: bytes) -> int:
        n = len(name)
        if n == 0 or n > self._longest:
            return 0
        for title, lname, kind in self._buckets[_bucket(n, name[0])]:
            if name == title or is_name(name, lname):
                return kind
        return 0

    def kind_at(self, buf: bytes, start: i64, end: i64) -> int:
        """The kind of the name `buf[start:end]`, read where it is (no bytes object made)."""
        n = end - start
        if n <= 0 or n > self._longest:
            return 0
        for _title, lname, kind in self._buckets[_bucket(n, buf[start])]:
            if name_at(buf, start, lname):
                return kind
        return 0


def _bucket(length: int, first: int) -> int:
    """FieldKinds' table index of a name: its length and its first byte's low five bits (a
    letter's, whatever its case; another byte may share a letter's bucket, and is then told
    apart by the comparison)."""
    return length * 32 + (first & 0x1F)


def is_name(name: bytes, lname: bytes) -> bool:
    """Whether the field name `name` is `lname` (lower case) in any letter case: compiled, a
    loop over the bytes, where `name.lower() == lname` was a generic call and a new object."""
    return len(name) == len(lname) and name_at(name, 0, lname)


def name_at(buf: bytes, start: i64, lname: bytes) -> bool:
    """Whether `buf` holds the field name `lname` (lower case) at `start`, in any letter
    case (`buf` is long enough: the caller has measured the name)."""
    n: i64 = len(lname)
    for i in range(n):
        c = buf[start + i]
        expected = lname[i]
        if c != expected and not (97 <= expected <= 122 and c | 0x20 == expected):
            return False
    return True


def content_length_line(length: int) -> bytes:
    """The Content-Length field line: made in advance for the usual lengths of API messages
    (compiled, formatting one cost ~0.05 µs a head; the table is ~50 KB)."""
    if 0 <= length < len(_CONTENT_LENGTH_LINES):
        return _CONTENT_LENGTH_LINES[length]
    return b"Content-Length: %d\r\n" % length


_CONTENT_LENGTH_LINES: Final = [b"Content-Length: %d\r\n" % n for n in range(1024)]


def parse_length(value: bytes) -> int:
    """A Content-Length value, which llhttp has accepted: digits only (duplicates and signs
    are refused there). A digit loop, because `int(value)` cost ~0.25 µs per message; anything
    else goes to `int`, which decides (and raises) as before."""
    n = 0
    for i in range(len(value)):
        c = value[i]
        if c < 48 or c > 57:
            return int(value)
        n = n * 10 + (c - 48)
    return n if len(value) else int(value)


_REQUEST_ID_OK: Final = re.compile(rb"[A-Za-z0-9._:\-]{1,128}\Z")


_TOKEN: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def is_token(value: str) -> bool:
    """An RFC 9110 §5.6.2 token: what a method or a header field name may be (config checks
    of header names and methods all go through here)."""
    return _TOKEN.fullmatch(value) is not None


def valid_request_id(value: bytes) -> bool:
    return _REQUEST_ID_OK.match(value) is not None


# A Host field value: uri-host [":" port] (RFC 9110 §7.2, RFC 3986 §3.2.2-3.2.3). uri-host is an
# IP-literal ("[" IPv6address or IPvFuture "]") or a reg-name (an IPv4 address is one, as the
# grammar goes); port is up to 65535, possibly empty after the colon. Percent-encoding may only
# spell UTF-8 octets of a name (RFC 3986 §3.2.2), so an encoded control byte ("%00") is refused.
# The brackets' content is checked for hex digits, ":" and "." here and as an IPv6 address in
# valid_host: a few requests carry one, and the full IPv6 grammar as a regex is unreadable.
# (runs of name characters between the %XX: an alternation per character was twice as slow)
_NAME_CHARS: Final = rb"[A-Za-z0-9\-._~!$&'()*+,;=]*"
_PCT_NOT_CONTROL: Final = rb"%(?:[2-6][0-9A-Fa-f]|7[0-9A-Ea-e]|[89A-Fa-f][0-9A-Fa-f])"
_REG_NAME: Final = _NAME_CHARS + rb"(?:" + _PCT_NOT_CONTROL + _NAME_CHARS + rb")*"
_PORT: Final = (
    rb"(?:[0-9]{0,4}|[0-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])"
)
_HOST_OK: Final = re.compile(
    rb"(?:\[(?:([0-9A-Fa-f:.]+)|v[0-9A-Fa-f]+\.[A-Za-z0-9\-._~!$&'()*+,;=:]+)\]|"
    + _REG_NAME
    + rb")(?::"
    + _PORT
    + rb")?"
)


def underscore_spellings(names: Collection[bytes]) -> set[bytes]:
    """Every spelling of `names` (lower case) with "_" for one or more of their "-": WSGI,
    CGI, PHP and Rails read `X_Forwarded_For` as the same variable (HTTP_X_FORWARDED_FOR) as
    `X-Forwarded-For`, so a client could pass for someone else, or past a route matching on
    a field, through them."""
    spellings: set[bytes] = set()
    for name in names:
        parts = name.split(b"-")
        for mask in range(1, 1 << (len(parts) - 1)):
            joined = parts[0]
            for i, part in enumerate(parts[1:]):
                joined += (b"_" if mask >> i & 1 else b"-") + part
            spellings.add(joined)
    return spellings


def valid_host(value: bytes) -> bool:
    """Whether a Host field value is uri-host [":" port]: RFC 9112 §3.2 wants a 400 for any
    other, and the value is routed on and forwarded (X-Forwarded-Host, Forwarded).

    Cost: one precompiled fullmatch, ~0.7 µs (about twice the byte-set check it replaced);
    the connection calls it only when a request's Host differs from the previous one's, so a
    keep-alive client pays it once.
    """
    match = _HOST_OK.fullmatch(value)
    # (the grammar allows an empty reg-name, an http URI not; nor an empty label, as nginx)
    if match is None or not value or b".." in value:
        return False
    ipv6 = match.group(1)
    if ipv6 is None:
        return True
    try:
        ipaddress.IPv6Address(ipv6.decode("ascii"))
    except ValueError:
        return False
    return True


def host_name(host: str) -> str:
    """A Host value's uri-host, without its port: `example.com` of `example.com:8443`,
    `[::1]` of `[::1]:8080` (the brackets stay: an IPv6 literal's colons are no port).
    What routes match on, and what X-Forwarded-Host says (nginx's `$host`, which Kong sends)."""
    colon = host.rfind(":")
    if colon == -1 or host.endswith("]"):
        return host
    return host[:colon]


class RequestIds:
    """Unique, cheap request ids: a random per-process prefix plus a counter.

    uuid4() costs ~2 µs and a syscall for randomness; this costs a concatenation. The prefix
    has a fixed length (12 hex digits), so the counter needs no padding; it is written in
    decimal because compiled, `str(int)` is a native conversion where `hex()` is a call.
    """

    __slots__ = ("_n", "_prefix")

    def __init__(self) -> None:
        self._prefix = os.urandom(6).hex()
        self._n = 0

    def next(self) -> str:
        self._n += 1
        return f"{self._prefix}{self._n}"  # (compiled: one build, where + made a copy)


def connection_tokens(values: Iterable[bytes]) -> set[bytes]:
    """Lower-cased tokens of the Connection header(s)."""
    out: set[bytes] = set()
    for value in values:
        for token in value.split(b","):
            token = token.strip().lower()
            if token:
                out.add(token)
    return out


class TrustedProxies:
    """CIDR list of peers whose X-Forwarded-* headers we extend instead of overwrite."""

    __slots__ = ("_cache", "_networks")

    def __init__(self, cidrs: Iterable[str] = ()) -> None:
        self._networks = [ipaddress.ip_network(c, strict=False) for c in cidrs]
        self._cache: dict[str, bool] = {}

    def __bool__(self) -> bool:
        return bool(self._networks)

    def __contains__(self, ip: str) -> bool:
        hit = self._cache.get(ip)
        if hit is None:
            try:
                addr = ipaddress.ip_address(ip)
            except ValueError:
                return False
            hit = any(addr in net for net in self._networks)
            if len(self._cache) < 10_000:
                self._cache[ip] = hit
        return hit


def forwarded_for_node(ip: str) -> str:
    """RFC 7239 node syntax: IPv6 addresses are quoted and bracketed."""
    return f'"[{ip}]"' if ":" in ip else ip


def forwarding_lines(
    client_ip: str,
    forwarded_for: bytes | None,
    scheme: str,
    host: str,
    port: int = 0,
    kept: frozenset[bytes] = frozenset(),
) -> bytes:
    """The X-Forwarded-For/-Proto/-Host/-Port and Forwarded lines of an upstream request head.

    A trusted peer's X-Forwarded-For (`forwarded_for`) is extended with the client address,
    and its Forwarded elements are followed by ours (RFC 7239 lists); its X-Forwarded-Proto,
    -Host and -Port, which the request carries on (`kept`, lower-case names), stand instead of
    ours: one value each, the one that describes the client's side (Kong and Envoy do the
    same; two values, `https, http`, read as plain HTTP by many frameworks). Anyone else's
    were dropped by the parser. Ours are Kong's: X-Forwarded-Host is the `host` without its
    port (nginx's `$host`: with it, the two fields could name two ports, the Host's and the
    listener's behind a port mapping, and readers of the pair differ on which wins),
    X-Forwarded-Port the listener's `port` (`$server_port`; 0: a unix socket, no line), and
    Forwarded's `host=` the Host as received (RFC 7239 §5.3). The
    same for every request of a connection that keeps its Host (and has nothing of a trusted
    peer's), so the connection keeps the last one (ClientConnection.parser_headers_done); an
    aggregate's parts get them too.
    """
    ip = client_ip.encode()
    xff = ip if forwarded_for is None else forwarded_for + b", " + ip
    proto = scheme.encode()
    node = forwarded_for_node(client_ip).encode()
    lines = [b"X-Forwarded-For: %s\r\n" % xff]
    if b"x-forwarded-proto" not in kept:
        lines.append(b"X-Forwarded-Proto: %s\r\n" % proto)
    if not host:  # an HTTP/1.0 request without Host: no host to pass on (it went as "")
        lines.append(b"Forwarded: for=%s;proto=%s\r\n" % (node, proto))
    else:
        if b"x-forwarded-host" not in kept:
            lines.append(b"X-Forwarded-Host: %s\r\n" % host_name(host).encode("latin-1"))
        lines.append(
            b'Forwarded: for=%s;host="%s";proto=%s\r\n' % (node, host.encode("latin-1"), proto)
        )
    if port and b"x-forwarded-port" not in kept:
        lines.append(b"X-Forwarded-Port: %d\r\n" % port)
    return b"".join(lines)


class HeaderList:
    """Case-insensitive access to a `headers` list of (name, value) bytes pairs.

    Shared by the request head and the upstream response head; plugins use it, the hot path
    does not (it reads the list directly).
    """

    __slots__ = ()

    def _field_list(self) -> list[tuple[bytes, bytes]]:
        """The `headers` list. (A method: the response head makes its list when first asked,
        and compiled, a subclass's property cannot stand for an attribute declared here.)"""
        raise NotImplementedError

    def header(self, lname: str) -> str | None:
        """First value of a header by lower-case name (a linear scan)."""
        target = lname.encode("latin-1")
        for name, value in self._field_list():
            if is_name(name, target):
                return value.decode("latin-1")
        return None

    def header_values(self, lname: str) -> list[str]:
        target = lname.encode("latin-1")
        return [v.decode("latin-1") for n, v in self._field_list() if is_name(n, target)]

    def set_header(self, name: str, value: str) -> None:
        self.remove_header(name)
        self._field_list().append((name.encode("latin-1"), value.encode("latin-1")))

    def remove_header(self, name: str) -> None:
        target = name.lower().encode("latin-1")
        fields = self._field_list()
        fields[:] = [(n, v) for n, v in fields if n.lower() != target]
