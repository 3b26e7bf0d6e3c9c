"""Make-before-break over more than one uplink (docs/PROTOCOL.md §8.3 "Standby paths"): the pure
decisions, no I/O; times are monotonic seconds passed in (tests drive them with a FakeClock).

A node's uplinks are its interfaces with a default route; the primary is the one with the lowest
metric (the kernel sends through it), the others are standby uplinks. For each standby uplink the
node learns its public mapping from its DC (a standby probe sent out of that interface, answered
without changing what the DC records), and for each direct tunnel it keeps a path through that
uplink warm:

  * every round it announces its standby mappings to the peer in a STANDBY packet on the tunnel
    ("mine"), and sends a STANDBY out of each standby uplink to the peer's address, which opens
    the node's own NAT towards the peer;
  * the peer sends a STANDBY to each announced address: at most UNVERIFIED_TRIES times while it has
    not heard from that address (each asking for an echo round at once), then every round for as
    long as authenticated STANDBYs keep arriving from it ("heard", told back to the node). The
    peer's home-router NAT now lets the node's packets from that address in.

When the primary uplink goes, the kernel routes through the next one at once: the node's next
packet leaves through a mapping the peer's NAT already accepts, the peer roams to it on that first
authenticated packet, and the daemon pings every peer at once as well. Nothing waits for loss.
Standby traffic is one small packet per uplink, tunnel and round each way (the keepalive rate),
sent only to addresses the DC observed (ours) or that an authenticated packet came from (the
peer's); an address a peer merely announced gets UNVERIFIED_TRIES packets in all.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field

from ntm.addr import format_endpoint, parse_endpoint
from ntm.errors import ParseError

# Standby addresses announced or heard per tunnel: a phone has two or three uplinks; more is a
# peer trying to make us send to strangers.
MAX_ADDRS = 4
# STANDBYs sent to an announced address nothing authenticated has come from yet: enough for the
# simultaneous open of two home-router NATs (the first may arrive before the node's NAT is open),
# small enough that a lying peer gets a few 50-byte packets sent to a stranger, ever.
UNVERIFIED_TRIES = 3
# Echo rounds (a standby round at once, asked for by a peer probing an unverified address) at
# most this often: it makes a new standby path ready in one RTT, not one round, and cannot be
# turned into a packet pump.
ECHO_MIN_GAP_S = 0.5
# A standby address the peer stopped hearing from for this many rounds is dropped (the uplink
# went away; its NAT mapping will time out).
EXPIRE_ROUNDS = 3
# The payload's flag: "I sent this to an address of yours I have not heard from: answer now".
FLAG_ECHO = 0x01
_ADDR_HEAD = struct.Struct("!BH")  # family (4 or 6), port


# --- the STANDBY payload: flags (1) | n (1) | n × addr | m (1) | m × addr, addr = family | port | ip
def _pack_addrs(addrs: list[str]) -> bytes:
    out = bytes([len(addrs)])
    for ep in addrs:
        host, port = parse_endpoint(ep)
        ip = ipaddress.ip_address(host)
        out += _ADDR_HEAD.pack(ip.version, port) + ip.packed
    return out


def encode_payload(flags: int, mine: list[str], heard: list[str]) -> bytes:
    """`mine`: the sender's standby mappings (keep them warm); `heard`: the receiver's standby
    addresses the sender has heard from (so the receiver knows its standby path is ready)."""
    return bytes([flags]) + _pack_addrs(mine[:MAX_ADDRS]) + _pack_addrs(heard[:MAX_ADDRS])


def _unpack_addrs(data: bytes, at: int) -> tuple[list[str], int]:
    if at >= len(data):
        raise ParseError("standby payload truncated")
    n, at = data[at], at + 1
    if n > MAX_ADDRS:
        raise ParseError(f"standby payload lists {n} addresses, at most {MAX_ADDRS}")
    out = []
    for _ in range(n):
        if at + _ADDR_HEAD.size > len(data):
            raise ParseError("standby payload truncated")
        family, port = _ADDR_HEAD.unpack_from(data, at)
        size = {4: 4, 6: 16}.get(family)
        at += _ADDR_HEAD.size
        if size is None or at + size > len(data) or port == 0:
            raise ParseError("bad address in standby payload")
        out.append(format_endpoint(str(ipaddress.ip_address(data[at : at + size])), port))
        at += size
    return out, at


def parse_payload(data: bytes) -> tuple[int, list[str], list[str]]:
    """(flags, mine, heard) of a STANDBY payload; ParseError if malformed."""
    if not data:
        raise ParseError("empty standby payload")
    mine, at = _unpack_addrs(data, 1)
    heard, at = _unpack_addrs(data, at)
    if at != len(data):
        raise ParseError("trailing bytes in standby payload")
    return data[0], mine, heard


# --- decisions ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Uplink:
    """An interface with a default route; the kernel prefers the lowest metric."""

    ifname: str
    ifindex: int
    metric: int


@dataclass(frozen=True)
class ProbeDc:
    """Send a standby probe to the DC out of this interface (learn its mapping)."""

    ifindex: int


@dataclass(frozen=True)
class SendStandby:
    """Seal a STANDBY with `payload` on tunnel path `path` and send it to `to` ("ip:port"), out of
    interface `ifindex` (None: wherever the kernel routes it, i.e. the primary uplink)."""

    path: bytes
    to: str
    ifindex: int | None
    payload: bytes


@dataclass(frozen=True)
class PrimaryChanged:
    """The kernel now sends through another uplink: tell every peer at once."""

    old: str | None  # None: there was no uplink
    new: str


Action = ProbeDc | SendStandby | PrimaryChanged


@dataclass
class _Mine:
    """A standby uplink of ours: its public mapping as the DC saw it."""

    uplink: Uplink
    mapping: str | None = None
    probed_at: float = float("-inf")


@dataclass
class _Theirs:
    """An address the peer announced (or an authenticated STANDBY came from)."""

    tries: int = 0
    heard_at: float | None = None
    sent_at: float = float("-inf")


@dataclass
class _Tunnel:
    peer_addr: str
    round_at: float = float("-inf")  # our last standby round (announce + out of each standby uplink)
    echo_at: float = float("-inf")
    theirs: dict[str, _Theirs] = field(default_factory=dict)
    heard_mine: set[str] = field(default_factory=set)  # our mappings the peer says it hears


class Standby:
    """The standby paths of one node: its uplinks and, per direct tunnel (by path ID), both sides
    of the exchange. The adapter (node/standby.py) feeds it and does the actions it returns."""

    def __init__(self, interval_s: float) -> None:
        self.interval = interval_s  # one round per keepalive interval: below the NATs' UDP timeout
        self.primary: Uplink | None = None
        self._reported: Uplink | None = None  # the last primary the node was told about
        self._seen = False  # the first view of the uplinks is the starting point, not a change
        self.mine: dict[int, _Mine] = {}  # standby uplinks by ifindex
        self.tunnels: dict[bytes, _Tunnel] = {}

    # --- our uplinks ----------------------------------------------------------------------------
    def set_uplinks(self, uplinks: list[Uplink]) -> list[Action]:
        """The current uplinks (from the routing table). A new primary is reported at once; having
        none is not (nothing can be told to anyone then, and a DC session restarted into no route
        would only pile up failures: an uplink replaced in one go shows no uplink for a moment)."""
        ordered = sorted(uplinks, key=lambda u: (u.metric, u.ifindex))
        primary = ordered[0] if ordered else None
        actions: list[Action] = []
        if primary is not None and primary != self._reported:
            if self._reported is not None or self._seen:
                actions.append(PrimaryChanged(self._reported.ifname if self._reported else None, primary.ifname))
            self._reported = primary
        self._seen = True
        self.primary = primary
        keep = {u.ifindex: u for u in ordered[1:]}
        for i in list(self.mine):
            if i not in keep or self.mine[i].uplink != keep[i]:
                del self.mine[i]
        for i, u in keep.items():
            self.mine.setdefault(i, _Mine(u))
        return actions

    def on_probe_reply(self, ifindex: int, observed: str, now: float) -> None:
        """The DC saw our standby probe out of `ifindex` come from `observed`."""
        m = self.mine.get(ifindex)
        if m is not None:
            m.mapping = observed
            m.probed_at = now

    def mappings(self) -> list[str]:
        return [m.mapping for m in self.mine.values() if m.mapping is not None][:MAX_ADDRS]

    # --- tunnels ----------------------------------------------------------------------------------
    def set_tunnels(self, direct: dict[bytes, str]) -> None:
        """The established direct tunnels now: path ID → the peer's current address."""
        for path in list(self.tunnels):
            if path not in direct:
                del self.tunnels[path]
        for path, addr in direct.items():
            t = self.tunnels.setdefault(path, _Tunnel(addr))
            t.peer_addr = addr
            t.theirs.pop(addr, None)  # the peer's current address is not a standby one

    def on_standby(self, path: bytes, source: str, payload: bytes, now: float) -> list[Action]:
        """An authenticated STANDBY on `path` from `source`. Malformed payloads are ignored (the
        sender holds the tunnel keys: a bug, not an attack, but it changes nothing)."""
        t = self.tunnels.get(path)
        if t is None:
            return []
        try:
            flags, mine, heard = parse_payload(payload)
        except ParseError:
            return []
        if source != t.peer_addr and (source in t.theirs or len(t.theirs) < MAX_ADDRS):
            th = t.theirs.setdefault(source, _Theirs())
            if th.heard_at is None:
                th.sent_at = float("-inf")  # tell the peer at once that its standby path is ready
            th.heard_at = now  # an authenticated packet came from it: it reaches the peer
        for ep in mine:
            if ep != t.peer_addr and ep not in t.theirs and len(t.theirs) < MAX_ADDRS:
                t.theirs[ep] = _Theirs()
        t.heard_mine = set(heard)
        if flags & FLAG_ECHO and now - t.echo_at >= ECHO_MIN_GAP_S and self.mine:
            t.echo_at = now
            return self._round(path, t, now)
        return []

    def tick(self, now: float) -> list[Action]:
        """What is due: DC probes for standby uplinks, our rounds, and STANDBYs to the peer's
        standby addresses."""
        actions: list[Action] = []
        for i, m in self.mine.items():
            if now - m.probed_at >= self.interval:
                m.probed_at = now  # a lost reply is retried next round
                actions.append(ProbeDc(i))
        for path, t in self.tunnels.items():
            if self.mappings() and now - t.round_at >= self.interval:
                actions += self._round(path, t, now)
            actions += self._to_theirs(path, t, now)
        return actions

    def _round(self, path: bytes, t: _Tunnel, now: float) -> list[Action]:
        """Out of each standby uplink to the peer (opens our NAT; proves the address to the peer),
        then the announcement on the current path."""
        t.round_at = now
        mine = self.mappings()
        heard = self._heard(t, now)
        payload = encode_payload(0, mine, heard)
        out: list[Action] = [
            SendStandby(path, t.peer_addr, i, payload) for i, m in self.mine.items() if m.mapping is not None
        ]
        out.append(SendStandby(path, t.peer_addr, None, payload))
        return out

    def _heard(self, t: _Tunnel, now: float) -> list[str]:
        return [
            ep
            for ep, th in t.theirs.items()
            if th.heard_at is not None and now - th.heard_at <= EXPIRE_ROUNDS * self.interval
        ]

    def _to_theirs(self, path: bytes, t: _Tunnel, now: float) -> list[Action]:
        out: list[Action] = []
        heard = self._heard(t, now)
        for ep in list(t.theirs):
            th = t.theirs[ep]
            if ep in heard:
                flags = 0
            elif th.heard_at is not None:  # heard once, silent since: that uplink is gone
                del t.theirs[ep]
                continue
            elif th.tries >= UNVERIFIED_TRIES:
                continue
            else:
                flags = FLAG_ECHO
            if now - th.sent_at < self.interval:
                continue
            if flags & FLAG_ECHO:
                th.tries += 1
            th.sent_at = now
            out.append(SendStandby(path, ep, None, encode_payload(flags, self.mappings(), heard)))
        return out

    # --- status -----------------------------------------------------------------------------------
    def status(self, path: bytes, now: float) -> dict:
        """For `ntm status`: our standby uplinks on this tunnel and whether the peer hears them
        (ready: a switch loses nothing), and the peer's standby addresses we keep warm."""
        t = self.tunnels.get(path)
        if t is None:
            return {}
        mine = [
            {"uplink": m.uplink.ifname, "mapping": m.mapping, "heard": m.mapping in t.heard_mine}
            for m in self.mine.values()
        ]
        return {
            "uplinks": mine,
            "ready": bool(mine) and all(u["heard"] for u in mine),
            "peer_standby": self._heard(t, now),
        }
