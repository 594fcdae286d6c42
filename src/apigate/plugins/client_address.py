"""Who the client of a request is, for the plugins that key on it (ip_filter, rate_limit).

The rule: the client is the TCP peer, unless the peer is a trusted proxy. Then it is the
right-most X-Forwarded-For address that is not itself a trusted proxy: each proxy appends the
address it saw, so that entry is the last one a trusted hop wrote, and the entries to its left
were written by the client and prove nothing. (nginx's realip with `real_ip_recursive on`,
Kong's `trusted_ips`.)

The listener keeps a client's X-Forwarded-For (`Request.forwarded_for`) only from peers in
`listeners.proxy.trusted_proxies`: for anyone else it is None, and the peer is the answer with
no parsing at all. Answers are cached per peer and per X-Forwarded-For value (bounded), so a
returning client behind a load balancer costs a dict lookup or two.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Final

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_CACHE_MAX: Final = 10_000


def parse_address(text: str) -> Address | None:
    """An address from a peer name or an X-Forwarded-For entry ("[::1]:80", "1.2.3.4:5")."""
    text = text.strip()
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]  # IPv4 with a port
    text = text.partition("%")[0]  # IPv6 zone id
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


class ClientAddresses:
    """The client address of a request, given the proxies (CIDRs) trusted to report it."""

    __slots__ = ("_resolved", "_trusted", "networks")

    def __init__(self, cidrs: Iterable[str]) -> None:
        self.networks: list[Network] = [ipaddress.ip_network(c, strict=False) for c in cidrs]
        self._trusted: dict[str, bool] = {}  # address text -> in a trusted network
        self._resolved: dict[bytes, str] = {}  # X-Forwarded-For value -> its client

    def __bool__(self) -> bool:
        return bool(self.networks)

    def client(self, peer: str, forwarded_for: bytes | None) -> str:
        """The client of a request from `peer` that forwarded `forwarded_for` (None: none
        kept by the listener)."""
        if forwarded_for is None or not self.trusts(peer):
            return peer
        return self.resolve(forwarded_for)

    def trusts(self, ip: str) -> bool:
        """Whether `ip` (a peer name or an X-Forwarded-For entry) is a trusted proxy."""
        if not self.networks:
            return False
        hit = self._trusted.get(ip)
        if hit is None:
            addr = parse_address(ip)
            hit = addr is not None and any(addr in net for net in self.networks)
            if len(self._trusted) < _CACHE_MAX:
                self._trusted[ip] = hit
        return hit

    def resolve(self, forwarded_for: bytes) -> str:
        """The right-most X-Forwarded-For entry that is not a trusted proxy; an entry that is
        not an address is returned as it is (ip_filter refuses it); "" for an empty list."""
        hit = self._resolved.get(forwarded_for)
        if hit is None:
            hit = self._walk(forwarded_for)
            if len(self._resolved) >= _CACHE_MAX:
                self._resolved.clear()  # the client writes part of the key: keep it bounded
            self._resolved[forwarded_for] = hit
        return hit

    def _walk(self, forwarded_for: bytes) -> str:
        entries = [e.strip() for e in forwarded_for.decode("latin-1").split(",") if e.strip()]
        text = ""
        for entry in reversed(entries):
            addr = parse_address(entry)
            if addr is None:
                return entry  # we cannot tell who this is, nor trust what lies left of it
            text = str(addr)
            if not self.trusts(text):
                return text
        return text  # every hop a trusted proxy: the left-most one

    def __repr__(self) -> str:
        return f"<ClientAddresses trusted={[str(n) for n in self.networks]}>"
