"""The daemon's DNS responder for the `.ntm` zone (docs/PROTOCOL.md §10.4).

`<node-id>.ntm` and `<alias>.ntm` answer AAAA (the peer's overlay IPv6) and A (the IPv4 address
this node gave it). Other names under .ntm: NXDOMAIN. Names outside .ntm: REFUSED (this is not
a recursive resolver). Wire format by dnspython; `answer()` is pure, `DnsServer` is the UDP
adapter.
"""

from __future__ import annotations

import asyncio
import logging
from ipaddress import IPv4Address, IPv6Address
from typing import Callable

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

log = logging.getLogger("ntm.node")

ZONE = dns.name.from_text("ntm.")
#: TTL of answers: addresses derived from node IDs never change; short anyway, so a removed
#: alias stops answering soon.
ANSWER_TTL = 60
#: Largest query accepted; a question for one name is far smaller.
MAX_QUERY = 512

Resolve = Callable[[str], "tuple[IPv6Address, IPv4Address] | None"]


def answer(query: bytes, resolve: Resolve) -> bytes | None:
    """The response to one DNS query, or None for what is not worth answering (not a query)."""
    if len(query) > MAX_QUERY:
        return None
    try:
        q = dns.message.from_wire(query)
    except (dns.exception.DNSException, ValueError):
        return None
    if q.flags & dns.flags.QR:
        return None
    r = dns.message.make_response(q)
    r.flags |= dns.flags.AA
    r.flags &= ~dns.flags.RA
    if len(q.question) != 1 or q.opcode() != 0:
        r.set_rcode(dns.rcode.REFUSED)
        return r.to_wire()
    question = q.question[0]
    qname = question.name
    if not qname.is_subdomain(ZONE) or question.rdclass != dns.rdataclass.IN:
        r.set_rcode(dns.rcode.REFUSED)
        return r.to_wire()
    label = qname.relativize(ZONE).to_text().lower()
    found = resolve(label) if label != "@" and "." not in label else None
    if found is None:
        r.set_rcode(dns.rcode.NXDOMAIN)
        return r.to_wire()
    v6, v4 = found
    if question.rdtype in (dns.rdatatype.AAAA, dns.rdatatype.ANY):
        r.answer.append(dns.rrset.from_text(qname, ANSWER_TTL, "IN", "AAAA", str(v6)))
    if question.rdtype in (dns.rdatatype.A, dns.rdatatype.ANY):
        r.answer.append(dns.rrset.from_text(qname, ANSWER_TTL, "IN", "A", str(v4)))
    return r.to_wire()  # other types: NOERROR with no answer (the name exists)


class _Proto(asyncio.DatagramProtocol):
    def __init__(self, resolve: Resolve) -> None:
        self.resolve = resolve
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        try:
            out = answer(data, self.resolve)
        except Exception:  # a bug must not stop the responder; the query just goes unanswered
            log.exception("DNS query failed")
            return
        if out is not None and self.transport is not None:
            self.transport.sendto(out, addr)


class DnsServer:
    """UDP DNS on the given (host, port) pairs."""

    def __init__(self, transports: list[asyncio.DatagramTransport]) -> None:
        self.transports = transports

    @classmethod
    async def start(cls, binds: list[tuple[str, int]], resolve: Resolve) -> DnsServer:
        loop = asyncio.get_running_loop()
        transports = []
        try:
            for host, port in binds:
                t, _ = await loop.create_datagram_endpoint(lambda: _Proto(resolve), local_addr=(host, port))
                transports.append(t)
        except OSError:
            for t in transports:
                t.close()
            raise
        return cls(transports)

    def close(self) -> None:
        for t in self.transports:
            t.close()
