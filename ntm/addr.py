"""Endpoints as text and as socket addresses: the one place that knows about IPv4-mapped IPv6.

On the wire and in JSON an endpoint is `a.b.c.d:port` or `[v6]:port`. A dual-stack AF_INET6
socket reports IPv4 peers as `::ffff:a.b.c.d` and needs that form to send to them; an AF_INET
socket needs the plain form. Every role converts through these functions.
"""

from __future__ import annotations

import functools
import ipaddress
from urllib.parse import urlsplit
import socket
from typing import Any

Addr = Any  # (host, port[, flowinfo, scope]) tuple as the socket layer gives it


# Endpoints whose parsed and plain forms are kept: a DC parses the same few addresses many times
# per Direction Request (14% of its CPU uncached, issue 30). Bounded: random input only evicts.
ENDPOINTS_KEPT = 8192


def parse_endpoint(text: str) -> tuple[str, int]:
    """`ip:port` or `[ipv6]:port` → (ip, port); ValueError if not an IP literal with a valid port.

    An IPv6 address must be in brackets and brackets hold only IPv6; an IPv4-mapped address is
    returned in its plain IPv4 form."""
    if not isinstance(text, str):
        raise ValueError(f"endpoint {text!r} is not a string")
    return _parse_endpoint(text)


@functools.lru_cache(maxsize=ENDPOINTS_KEPT)
def _parse_endpoint(text: str) -> tuple[str, int]:
    bracketed = text.startswith("[")
    if bracketed:
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"endpoint {text!r} is not ip:port")
    ip = ipaddress.ip_address(host)
    if (ip.version == 6) != bracketed:
        raise ValueError(f"endpoint {text!r}: write IPv6 as [addr]:port, IPv4 without brackets")
    return unmapped(str(ip)), int(port)


@functools.lru_cache(maxsize=ENDPOINTS_KEPT)
def unmapped(ip: str) -> str:
    """The plain form of an address: `::ffff:a.b.c.d` → `a.b.c.d`; others unchanged (canonical)."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if addr.version == 6 and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


def format_endpoint(ip: str, port: int) -> str:
    """(ip, port) → `a.b.c.d:port` or `[v6]:port`, IPv4-mapped addresses in plain IPv4 form."""
    ip = unmapped(ip)
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def display(addr: Addr | None) -> str | None:
    """Human (and JSON) form of a socket address; None stays None."""
    return None if addr is None else format_endpoint(addr[0], addr[1])


def family(endpoint: str) -> int:
    """4 or 6: the IP version of an `ip:port` endpoint (its parsed form: only IPv6 has colons)."""
    return 6 if ":" in parse_endpoint(endpoint)[0] else 4


@functools.lru_cache(maxsize=256)  # the relays' few stream URLs, asked for twice per direction (~13 µs each)
def url_family(url: str) -> int | None:
    """4 or 6 for a URL whose host is an IP address, None for a name (either may do)."""
    try:
        return ipaddress.ip_address(urlsplit(url).hostname or "").version
    except ValueError:
        return None


def for_socket(addr: Addr, sock_family: int) -> Addr:
    """(host, port) in the form a socket of `sock_family` sends to and reports as source: IPv4 as
    `::ffff:a.b.c.d` on AF_INET6 (dual-stack), plain on AF_INET. Flow info is dropped; the scope
    ID is kept only for link-local IPv6, so one peer always gives one key."""
    host, port = addr[0], addr[1]
    try:
        ip = ipaddress.ip_address(str(host).split("%", 1)[0])
    except ValueError:
        return (host, port)
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if sock_family == socket.AF_INET6:
        if ip.version == 4:
            return (f"::ffff:{ip}", port)
        scope = addr[3] if len(addr) > 3 else 0
        if ip.is_link_local and scope:
            return (str(ip), port, 0, scope)
    return (str(ip), port)
