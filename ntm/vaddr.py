"""Virtual addresses: where applications see nodes (docs/PROTOCOL.md §10).

IPv6: one fixed prefix, the node ID's first 96 bits after it. Every node computes every other
node's address the same way, with no coordination, like HIP's ORCHIDs (also 96 bits of hash).

IPv4 has no room for a self-certifying address, so it is local (the NTMobile seeds' "my address
V0, peers V1, V2, ..."): each node picks the addresses under which its own applications see its
peers, and translates the inner source of what arrives (ntm/inner.py). `V4Book` keeps that
choice: one address per peer, never two peers per address, stable across restarts.

    v6_of(node_id)                       -> IPv6Address('fd6e:746d:…')
    book = V4Book(ip_network("100.64.0.0/10")); book.assign(peer_id) -> IPv4Address('100.64.0.2')
"""

from __future__ import annotations

import ipaddress
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Callable

from ntm.errors import NtmError
from ntm.packet import MIN_TRANSPORT_LEN

#: The overlay's IPv6 prefix: a /32 out of fd00::/8 (ULA) spelling "ntm" (0x6e 0x74 0x6d),
#: leaving 96 bits for the node ID: a chosen-target collision costs ~2^96 key generations.
V6_PREFIX = IPv6Network("fd6e:746d::/32")
V6_ID_BYTES = 12  # 128 - 32 bits
#: Default IPv4 pool (RFC 6598 shared space, unused on a LAN): this node is the first address.
V4_NET = IPv4Network("100.64.0.0/10")

#: The outer path MTU assumed for the Internet: Ethernet's 1500.
PATH_MTU = 1500
#: Per-packet overhead of the tunnel on the worst outer family: IPv6 header 40 + UDP 8 + DATA
#: header and tag 33 (type 1, path ID 8, counter 8, AEAD tag 16). A relay adds nothing.
TUNNEL_OVERHEAD = 40 + 8 + MIN_TRANSPORT_LEN
#: IPv6 needs at least this on every link (RFC 8200).
IPV6_MIN_MTU = 1280


class AddressError(NtmError):
    """A virtual address that cannot be given (pool exhausted, collision)."""


def tun_mtu(path_mtu: int = PATH_MTU) -> int:
    """The inner MTU that fits one tunnel packet in `path_mtu` on IPv4 or IPv6: 1419 for 1500."""
    mtu = path_mtu - TUNNEL_OVERHEAD
    if mtu < IPV6_MIN_MTU:
        raise AddressError(f"path MTU {path_mtu} leaves {mtu} bytes inside the tunnel; IPv6 needs {IPV6_MIN_MTU}")
    return mtu


def inner_mtu(path_mtu: int, ipv6: bool) -> int:
    """The longest inner packet one tunnel datagram carries on a path of MTU `path_mtu` whose
    outer header is IPv6 (40 bytes) or IPv4 (20): path MTU - header - UDP 8 - DATA overhead 33."""
    return path_mtu - (40 if ipv6 else 20) - 8 - MIN_TRANSPORT_LEN


def v6_of(node_id: bytes) -> IPv6Address:
    """The node's overlay IPv6 address: V6_PREFIX followed by the node ID's first 96 bits."""
    if len(node_id) != 20:
        raise ValueError("node ID must be 20 bytes")
    return IPv6Address(V6_PREFIX.network_address.packed[:4] + node_id[:V6_ID_BYTES])


def is_overlay_v6(addr: bytes) -> bool:
    """`addr` (16 packed bytes) is inside V6_PREFIX."""
    return addr[:4] == V6_PREFIX.network_address.packed[:4]


# Peers given an address only because a local application looked their name up (not aliased,
# allowed, nor heard from): kept in memory, never persisted, and at most this many, so lookups of
# random IDs neither grow peers.json nor exhaust the IPv4 network (§10.5).
LOOKED_UP_MAX = 1024


class V4Book:
    """This node's IPv4 view of its peers: own address = first host of `net`; peers get the next
    free ones in order. Injective both ways; `load`/`dump` keep it across restarts."""

    def __init__(self, net: IPv4Network = V4_NET, assigned: dict[bytes, IPv4Address] | None = None) -> None:
        if net.num_addresses < 4:
            raise AddressError(f"{net} is too small for a virtual IPv4 network")
        self.net = net
        self.own = net.network_address + 1
        self.by_peer: dict[bytes, IPv4Address] = {}
        self.by_addr: dict[IPv4Address, bytes] = {}
        self._next = int(self.own) + 1
        for peer, addr in (assigned or {}).items():
            self._put(peer, addr)
        # Told of every address assign() gives out to keep (not those loaded): the daemon persists the book.
        self.on_assign: Callable[[bytes, IPv4Address], None] | None = None
        self.looked_up: set[bytes] = set()  # given out by assign(keep=False): not dumped

    def _put(self, peer: bytes, addr: IPv4Address) -> None:
        if addr not in self.net or addr in (self.own, self.net.broadcast_address, self.net.network_address):
            raise AddressError(f"{addr} is not a peer address of {self.net}")
        if addr in self.by_addr and self.by_addr[addr] != peer:
            raise AddressError(f"{addr} is already given to another peer")
        self.by_peer[peer] = addr
        self.by_addr[addr] = peer

    def assign(self, peer: bytes, keep: bool = True) -> IPv4Address:
        """The peer's address in this node's view, giving it the next free one on first use.
        `keep=False` (a name lookup): the address lives in memory only (not dumped, on_assign not
        told), for at most LOOKED_UP_MAX peers (AddressError beyond); a later assign() that
        keeps it makes it permanent."""
        addr = self.by_peer.get(peer)
        if addr is not None:
            if keep and peer in self.looked_up:
                self.looked_up.discard(peer)
                if self.on_assign is not None:
                    self.on_assign(peer, addr)
            return addr
        if not keep and len(self.looked_up) >= LOOKED_UP_MAX:
            raise AddressError(f"{LOOKED_UP_MAX} peers looked up by name and never heard from: no more")
        last = int(self.net.broadcast_address)
        while self._next < last and IPv4Address(self._next) in self.by_addr:
            self._next += 1
        if self._next >= last:
            raise AddressError(f"no free virtual IPv4 address left in {self.net}")
        addr = IPv4Address(self._next)
        self._put(peer, addr)
        if not keep:
            self.looked_up.add(peer)
        elif self.on_assign is not None:
            self.on_assign(peer, addr)
        return addr

    def peer_at(self, addr: IPv4Address) -> bytes | None:
        return self.by_addr.get(addr)

    def dump(self) -> dict[str, str]:
        return {"0x" + p.hex(): str(a) for p, a in self.by_peer.items() if p not in self.looked_up}

    @classmethod
    def load(cls, net: IPv4Network, data: dict[str, str]) -> V4Book:
        """From `dump()` output; AddressError/ValueError on anything inconsistent."""
        return cls(net, {bytes.fromhex(p.removeprefix("0x")): ipaddress.IPv4Address(a) for p, a in data.items()})
