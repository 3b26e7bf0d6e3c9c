"""UDP keepalive from a node's tunnel socket to its DC ("keep NAT table", docs/PROTOCOL.md §5).

It keeps the node's NAT mapping open and tells the DC the node's public (NAT-mapped) address.
Only the session holder knows the 32-byte token, and `seq` strictly increases, so a third party can
neither forge a keepalive nor replay one from another address to move the node. The reply carries
a MAC under the same token, so nobody off the path can tell the node it moved.

    request  = 0x20 | node (20) | seq (8, big-endian) | HMAC-SHA256(token, first 29 bytes)[:16]
    reply    = 0x21 | seq (8) | family (1: 4 or 6) | port (2) | ip (4 or 16)   (what the DC observed)
               | HMAC-SHA256(token, all before)[:16]

A standby probe (0x22, same layout and MAC, its own sequence) asks only "where do you see me
from?" for a node's second uplink: the DC answers with a 0x23 reply (same layout as 0x21) and
records nothing, so the node's known address stays its primary uplink's (node/uplinks.py).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import struct

from ntm.addr import unmapped
from ntm.errors import ParseError

KEEPALIVE = 0x20
KEEPALIVE_REPLY = 0x21
STANDBY_PROBE = 0x22
STANDBY_REPLY = 0x23
_REQUESTS = (KEEPALIVE, STANDBY_PROBE)
TOKEN_LEN = 32
MAC_LEN = 16
REQUEST_LEN = 1 + 20 + 8 + MAC_LEN
# 25 s: below the common 30 s UDP timeout of NAT routers, as WireGuard's persistent keepalive.
KEEPALIVE_INTERVAL_S = 25.0


def _mac(token: bytes, head: bytes) -> bytes:
    return hmac.new(token, head, hashlib.sha256).digest()[:MAC_LEN]


def encode_request(node: bytes, seq: int, token: bytes, kind: int = KEEPALIVE) -> bytes:
    """A keepalive (or, kind STANDBY_PROBE, a standby probe): the MAC covers the kind too."""
    head = bytes([kind]) + node + struct.pack(">Q", seq)
    return head + _mac(token, head)


def parse_request(data: bytes) -> tuple[bytes, int, bytes, bytes]:
    """(node, seq, head, mac) of a keepalive or standby probe (`data[0]` says which); ParseError
    if it is neither."""
    if len(data) != REQUEST_LEN or data[0] not in _REQUESTS:
        raise ParseError("not a keepalive")
    head = data[: REQUEST_LEN - MAC_LEN]
    return data[1:21], struct.unpack(">Q", data[21:29])[0], head, data[29:]


def mac_ok(token: bytes, head: bytes, mac: bytes) -> bool:
    return hmac.compare_digest(_mac(token, head), mac)


def encode_reply(seq: int, ip: str, port: int, token: bytes, kind: int = KEEPALIVE_REPLY) -> bytes:
    """A reply of `kind` (KEEPALIVE_REPLY or STANDBY_REPLY), MAC'd under the session's token (the
    MAC covers the kind: a reply is never a request, nor a probe's reply a keepalive's)."""
    addr = ipaddress.ip_address(unmapped(ip))
    head = struct.pack(">BQBH", kind, seq, addr.version, port) + addr.packed
    return head + _mac(token, head)


def parse_reply(data: bytes, token: bytes, kind: int = KEEPALIVE_REPLY) -> tuple[int, str, int]:
    """(seq, observed ip, observed port) of a reply of `kind` MAC'd under `token`; ParseError
    otherwise (malformed, or forged: a wrong MAC)."""
    if len(data) < 12 or data[0] != kind:
        raise ParseError("not a keepalive reply")
    _, seq, family, port = struct.unpack(">BQBH", data[:12])
    size = {4: 4, 6: 16}.get(family)
    if size is None or len(data) != 12 + size + MAC_LEN:
        raise ParseError("bad keepalive reply address")
    if not mac_ok(token, data[:-MAC_LEN], data[-MAC_LEN:]):
        raise ParseError("keepalive reply with a wrong MAC")
    return seq, str(ipaddress.ip_address(data[12:-MAC_LEN])), port
