"""A tiny authoritative DNS server for tests: UDP on 127.0.0.1, port 0, in the test's loop.

    async with DnsServer() as server:
        server.set_a("users.test", "127.0.0.2", ttl=1)
        server.set_srv("_http._tcp.users.test", (0, 10, 8080, "127.0.0.1"))
        ... APIGATE_DNS_NAMESERVER=server.nameserver ...
        server.mode = "drop"          # stop answering: clients time out (serve-stale tests)
        server.mode = "servfail"      # answer SERVFAIL

Answers come from `records` (lower-case name without the final dot -> list of `Record`), read
at every query, so a test changes answers by changing the table. A name not in the table is
NXDOMAIN; a name without records of the asked type is NODATA. `queries` logs (name, type).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Literal

import dns.flags
import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

Mode = Literal["answer", "drop", "servfail"]


@dataclass(frozen=True)
class Record:
    rdtype: str  # "A", "AAAA" or "SRV" (any type dnspython can parse from text works)
    value: str  # "127.0.0.2", "::1", or for SRV "priority weight port target."
    ttl: int = 1


@dataclass
class DnsServer(asyncio.DatagramProtocol):
    records: dict[str, list[Record]] = field(default_factory=dict)
    mode: Mode = "answer"
    queries: list[tuple[str, str]] = field(default_factory=list)
    port: int = 0
    _transport: asyncio.DatagramTransport | None = None

    # ------------------------------------------------------------------ the table
    def set(self, name: str, *records: Record) -> None:
        self.records[_key(name)] = list(records)

    def set_a(self, name: str, *addresses: str, ttl: int = 1) -> None:
        """A or AAAA records (by the address's form) for `name`, replacing what it had."""
        self.set(name, *(Record("AAAA" if ":" in a else "A", a, ttl) for a in addresses))

    def set_srv(self, name: str, *targets: tuple[int, int, int, str], ttl: int = 1) -> None:
        """SRV records (priority, weight, port, target) for `name`."""
        self.set(
            name, *(Record("SRV", f"{p} {w} {port} {_fqdn(t)}", ttl) for p, w, port, t in targets)
        )

    def remove(self, name: str) -> None:
        self.records.pop(_key(name), None)

    @property
    def nameserver(self) -> str:
        """`127.0.0.1:PORT`, the value for APIGATE_DNS_NAMESERVER."""
        return f"127.0.0.1:{self.port}"

    def count(self, name: str, rdtype: str | None = None) -> int:
        return sum(1 for n, t in self.queries if n == _key(name) and rdtype in (None, t))

    # ------------------------------------------------------------------ the protocol
    def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
        try:
            query = dns.message.from_wire(data)
        except Exception:  # not DNS: a real server ignores it too
            return
        for question in query.question:
            self.queries.append(
                (_key(question.name.to_text()), dns.rdatatype.to_text(question.rdtype))
            )
        if self.mode == "drop" or self._transport is None:
            return
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if self.mode == "servfail":
            response.set_rcode(dns.rcode.SERVFAIL)
        else:
            for question in query.question:
                self._answer(response, question)
        self._transport.sendto(response.to_wire(), addr)

    def _answer(self, response: dns.message.Message, question: dns.rrset.RRset) -> None:
        records = self.records.get(_key(question.name.to_text()))
        if records is None:
            response.set_rcode(dns.rcode.NXDOMAIN)
            return
        rdtype = dns.rdatatype.to_text(question.rdtype)
        matching = [r for r in records if r.rdtype == rdtype]
        if matching:
            ttl = min(r.ttl for r in matching)
            response.answer.append(
                dns.rrset.from_text(
                    question.name, ttl, dns.rdataclass.IN, rdtype, *(r.value for r in matching)
                )
            )

    # ------------------------------------------------------------------ lifecycle
    async def __aenter__(self) -> DnsServer:
        loop = asyncio.get_running_loop()
        # (3.11's selector datagram transport does not subclass DatagramTransport: keep the
        # returned object rather than type-checking it in connection_made)
        self._transport, _ = await loop.create_datagram_endpoint(
            lambda: self, local_addr=("127.0.0.1", 0)
        )
        self.port = self._transport.get_extra_info("sockname")[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None


def _key(name: str) -> str:
    return name.lower().rstrip(".")


def _fqdn(name: str) -> str:
    return name if name.endswith(".") else name + "."
