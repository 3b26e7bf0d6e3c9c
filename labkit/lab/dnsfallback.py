"""Run inside a lab namespace: the two DNS servers of the split-DNS fallback test.

    dnsfallback.py upstream --listen IP     the "previous" nameserver: every name has A 192.0.2.7,
                                            but there is no .ntm top-level domain (NXDOMAIN)
    dnsfallback.py daemon                   the node daemon's DNS responder (node/dns.py) on
                                            node/splitdns.py's loopback address; bob.ntm answers
Each prints "READY" once it listens, then serves until killed.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

import dns.message  # noqa: E402
import dns.name  # noqa: E402
import dns.rcode  # noqa: E402
import dns.rdatatype  # noqa: E402
import dns.rrset  # noqa: E402

from node.dns import DnsServer  # noqa: E402
from node.splitdns import LOOPBACK_DNS  # noqa: E402

UPSTREAM_ANSWER = "192.0.2.7"
NTM = dns.name.from_text("ntm.")
BOB = (IPv6Address("fd6e:746d::b0b"), IPv4Address("100.64.0.2"))


def upstream(listen: str) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((listen, 53))
    print("READY", flush=True)
    while True:
        data, addr = sock.recvfrom(4096)
        q = dns.message.from_wire(data)
        r = dns.message.make_response(q)
        question = q.question[0]
        if question.name.is_subdomain(NTM):
            r.set_rcode(dns.rcode.NXDOMAIN)
        elif question.rdtype == dns.rdatatype.A:
            r.answer.append(dns.rrset.from_text(question.name, 60, "IN", "A", UPSTREAM_ANSWER))
        sock.sendto(r.to_wire(), addr)


async def daemon() -> None:
    await DnsServer.start([LOOPBACK_DNS], lambda label: BOB if label == "bob" else None, set())
    print("READY", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("role", choices=("upstream", "daemon"))
    ap.add_argument("--listen", default="127.0.0.54")
    args = ap.parse_args()
    if args.role == "upstream":
        upstream(args.listen)
    else:
        asyncio.run(daemon())


if __name__ == "__main__":
    main()
