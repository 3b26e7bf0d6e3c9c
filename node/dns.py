"""The daemon's DNS responder for the `.ntm` zone (docs/PROTOCOL.md §10.4).

`<node-id>.ntm` and `<alias>.ntm` answer AAAA (the peer's overlay IPv6) and A (the IPv4 address
this node gave it). Other names under .ntm: NXDOMAIN. Names outside .ntm: REFUSED (this is not
a recursive resolver). Only this node's own applications are answered (`from_this_node`): the
responder listens on the TUN addresses, which a LAN neighbour (routing to them through us) or a
peer (through its tunnel) can reach too, and it must not show them the alias book. Wire format
by dnspython; `answer()` and `from_this_node()` are pure, `DnsServer` is the UDP adapter.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from ipaddress import IPv4Address, IPv6Address
from typing import Callable, Collection

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from daemon.service import LogLimiter
from ntm.addr import unmapped
from ntm.clock import SYSTEM, Clock

log = logging.getLogger("ntm.node")

ZONE = dns.name.from_text("ntm.")
#: TTL of answers: addresses derived from node IDs never change; short anyway, so a removed
#: alias stops answering soon.
ANSWER_TTL = 60
#: Largest query accepted; a question for one name is far smaller.
MAX_QUERY = 512

Resolve = Callable[[str], "tuple[IPv6Address, IPv4Address] | None"]


def from_this_node(source: str, own: Collection[str]) -> bool:
    """A query from this node's own applications: sent from loopback, or from one of our own
    (overlay) addresses, which is the source the kernel picks when an application here asks the
    TUN address. Nothing from outside can carry those sources: the kernel drops a packet from
    another interface with a local source (martian), and the data plane lets a peer's packets
    into TUN only from that peer's own overlay addresses (§10.3)."""
    try:
        ip = ipaddress.ip_address(unmapped(source.split("%", 1)[0]))
    except ValueError:
        return False
    return ip.is_loopback or str(ip) in own


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
    def __init__(self, resolve: Resolve, own: Collection[str], server: DnsServer) -> None:
        self.resolve = resolve
        self.own = own
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        if not from_this_node(addr[0], self.own):
            self.server.refused += 1  # dropped unanswered: nothing learned, no reflection
            self.server.refusals.note("not from this node")
            return
        try:
            out = answer(data, self.resolve)
        except Exception:  # a bug must not stop the responder; the query just goes unanswered
            log.exception("DNS query failed")
            return
        if out is not None and self.transport is not None:
            self.transport.sendto(out, addr)


class DnsServer:
    """UDP DNS on the given (host, port) pairs."""

    def __init__(self, clock: Clock = SYSTEM) -> None:
        self.transports: list[asyncio.DatagramTransport] = []
        self.bound: list[tuple[str, int]] = []  # where it answers
        self.refused = 0  # queries not from this node, dropped
        self.refusals = LogLimiter(log, "DNS queries", 10.0, clock)

    @classmethod
    async def start(
        cls,
        binds: list[tuple[str, int]],
        resolve: Resolve,
        own: Collection[str],
        optional: list[tuple[str, int]] = (),
        clock: Clock = SYSTEM,
    ) -> DnsServer:
        """Answer on `binds` (and on `optional` ones that can be bound: a warning for the others)
        queries from loopback or from `own` (this node's overlay addresses)."""
        loop = asyncio.get_running_loop()
        server = cls(clock)
        try:
            for host, port in [*binds, *optional]:
                try:
                    t, _ = await loop.create_datagram_endpoint(
                        lambda: _Proto(resolve, own, server), local_addr=(host, port)
                    )
                except OSError as exc:
                    if (host, port) not in optional:
                        raise
                    log.warning("DNS not on %s:%d: %s", host, port, exc.strerror or exc)
                    continue
                server.transports.append(t)
                server.bound.append((host, port))
        except OSError:
            server.close()
            raise
        return server

    def close(self) -> None:
        for t in self.transports:
            t.close()
