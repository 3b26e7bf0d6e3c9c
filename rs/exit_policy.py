"""The RS exit's decisions, without I/O (docs/PROTOCOL.md §10.13): who may be booked, and what
one booked node may send through the exit.

A relay run with `ntm-rs --exit` NATs booked nodes' traffic to ordinary servers. It never is an
open proxy: a node gets a tunnel to the exit only through a booking an active DC signed for it,
the operator's allow policy decides which nodes a DC may book, and every booked node is held to
caps (bytes per second, bytes per booking, concurrent flows).

    policy = ExitPolicy.parse(["0xabc…", "0xdef…"])   # or ["all-registered"]; [] = nobody
    policy.check(node)                                 # ExitRefused("not_allowed") if not admitted
    meter = Meter(caps, now)
    reason = meter.charge(packet, now)                 # None: forward; else the drop reason
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from ipaddress import IPv4Network

from ntm import keys
from ntm.errors import CodedError
from ntm.messages import ExitBooking
from ntm.overlay import Overlay
from ntm.ratelimit import TokenBucket
from ntm.routes import RouteTable
from ntm.vaddr import V4Book

#: `--exit-allow` word admitting every node an active DC books (a public exit for the
#: federation's users; the DCs only book nodes registered on chain with a live session).
ALL_REGISTERED = "all-registered"
#: Default bytes per second one node may pass through the exit, both directions together: a
#: fair share of a 1 Gbit/s relay among ~10 busy users; the operator raises it with --exit-rate.
EXIT_RATE_BPS = 12_500_000
#: Bursts of one second at that rate: a TCP window's worth passes at line rate.
EXIT_BURST_S = 1.0
#: Default bytes one booking may carry (both directions): the DC books again when it runs out.
EXIT_MAX_BYTES = 4 * 1024**3
#: Default concurrent flows per node: a browser opens ~100; a port scan through the exit is cut.
EXIT_MAX_FLOWS = 256
#: A flow that carried nothing this long no longer counts (the kernel's conntrack keeps UDP 120 s).
FLOW_IDLE_S = 120.0
#: Nodes booked at once (memory bound: one meter each, and their paths' sessions).
EXIT_MAX_NODES = 4096
#: Paths one node keeps (a new booking after each move); beyond, its oldest path is closed: a node
#: whose DC books for it again and again holds at most this many sessions here.
EXIT_PATHS_PER_NODE = 8

_PORTS = struct.Struct("!HH")
PROTO_TCP, PROTO_UDP = 6, 17


class ExitRefused(CodedError):
    """A booking the RS exit does not take (`code`: not_allowed, untrusted_dc, replayed, conflict,
    full, malformed)."""

    STATUS = {"not_allowed": 403, "untrusted_dc": 403, "replayed": 403, "conflict": 409, "full": 503}
    DEFAULT_STATUS = 400


@dataclass(frozen=True)
class ExitPolicy:
    """Which nodes a DC may book at this exit: the listed ones, or (`everyone`) any node an
    active DC books. The default is nobody: an operator names who uses the exit."""

    allowed: frozenset[bytes] = frozenset()
    everyone: bool = False

    @classmethod
    def parse(cls, items: list[str]) -> ExitPolicy:
        """From `--exit-allow` values (node IDs, comma-separated or repeated, or all-registered);
        ValueError naming the bad item."""
        words = [w.strip() for item in items for w in item.split(",") if w.strip()]
        if ALL_REGISTERED in words:
            if len(words) > 1:
                raise ValueError(f"{ALL_REGISTERED} admits every node: list no node IDs with it")
            return cls(everyone=True)
        return cls(frozenset(keys.parse_node_id(w) for w in words))

    def check(self, node: bytes) -> None:
        if not (self.everyone or node in self.allowed):
            raise ExitRefused(
                "not_allowed", f"{keys.checksum(node)} may not use this relay's exit (not on its --exit-allow list)"
            )

    def describe(self) -> str:
        return ALL_REGISTERED if self.everyone else f"{len(self.allowed)} listed node(s)"


@dataclass(frozen=True)
class Caps:
    """What one booked node may pass through the exit."""

    rate_bps: int = EXIT_RATE_BPS
    max_bytes: int = EXIT_MAX_BYTES
    max_flows: int = EXIT_MAX_FLOWS


def flow_of(pkt: bytes) -> tuple | None:
    """A node's outbound flow: (version, protocol, destination, source port, destination port);
    ports are 0 for other protocols and fragments. None if `pkt` is no IP packet."""
    if not pkt:
        return None
    version = pkt[0] >> 4
    if version == 4 and len(pkt) >= 20:
        ihl = (pkt[0] & 0x0F) * 4
        proto, dst, first = pkt[9], pkt[16:20], (struct.unpack_from("!H", pkt, 6)[0] & 0x1FFF) == 0
    elif version == 6 and len(pkt) >= 40:
        ihl, proto, dst, first = 40, pkt[6], pkt[24:40], True
    else:
        return None
    ports = (0, 0)
    if first and proto in (PROTO_TCP, PROTO_UDP) and len(pkt) >= ihl + 4:
        ports = _PORTS.unpack_from(pkt, ihl)
    return version, proto, dst, *ports


@dataclass
class Meter:
    """One booked node's use of the exit against its caps. Outbound packets open flows; every
    byte, both ways, spends the rate bucket and the booking's budget."""

    caps: Caps
    now: float
    used: int = 0
    flows: dict[tuple, float] = field(default_factory=dict)  # flow → last packet (monotonic)
    bucket: TokenBucket = field(init=False)

    def __post_init__(self) -> None:
        self.bucket = TokenBucket(self.caps.rate_bps, self.caps.rate_bps * EXIT_BURST_S, self.now)

    def extend(self, max_bytes: int) -> None:
        """A new booking for the same node: its budget starts afresh (what was used stays used)."""
        self.caps = Caps(self.caps.rate_bps, self.used + max_bytes, self.caps.max_flows)

    def _expire(self, now: float) -> None:
        for f in [f for f, t in self.flows.items() if now - t > FLOW_IDLE_S]:
            del self.flows[f]

    def charge(self, pkt: bytes, now: float, outbound: bool = True) -> str | None:
        """None if `pkt` may pass (and it is counted), else why not: `byte_cap` (the booking's
        budget is spent), `flow_cap` (a new flow beyond max_flows), `rate` (over bytes/s)."""
        n = len(pkt)
        if self.used + n > self.caps.max_bytes:
            return "byte_cap"
        flow = flow_of(pkt) if outbound else None
        if flow is not None and flow not in self.flows and len(self.flows) >= self.caps.max_flows:
            self._expire(now)
            if len(self.flows) >= self.caps.max_flows:
                return "flow_cap"
        if not self.bucket.take(now, n):
            return "rate"
        if flow is not None:
            self.flows[flow] = now
        self.used += n
        return None


#: The exit's own IPv4 view of its booked nodes (§10.2: the receiver translates inner IPv4
#: sources): one stable address per node, masqueraded to the relay host's address on the way out.
EXIT_V4_NET = IPv4Network("100.100.0.0/16")


def exit_overlay(exit_id: bytes) -> Overlay:
    """The exit node's packet rules (§10.10) for the RS exit: an inner IPv4 source becomes the
    node's own address in EXIT_V4_NET, an IPv6 source must be the node's overlay address
    (`rx_spoofed_source` otherwise), any destination outside EXIT_V4_NET is forwarded."""
    return Overlay(exit_id, V4Book(EXIT_V4_NET), RouteTable([], exit_offered=True, local=EXIT_V4_NET))


@dataclass
class Booked:
    """A node the DCs booked at this exit: its key, its meter, its paths, until when."""

    node: bytes
    pubkey: bytes
    meter: Meter
    expires_at: float  # monotonic
    paths: list[bytes] = field(default_factory=list)  # oldest first


class ExitTable:
    """The booked nodes and their paths. A node keeps one meter (and so one inner address and its
    flows) across its bookings: after a move the node books a new path and its connections go on."""

    def __init__(self, policy: ExitPolicy, caps: Caps = Caps(), max_nodes: int = EXIT_MAX_NODES) -> None:
        self.policy, self.caps, self.max_nodes = policy, caps, max_nodes
        self.nodes: dict[bytes, Booked] = {}
        self.by_path: dict[bytes, bytes] = {}

    def book(self, b: ExitBooking, now_ms: int, now: float) -> tuple[Booked, bool, list[bytes]]:
        """Admit booking `b` (already checked as signed by an active DC); (the node's entry,
        whether the path is new, the node's old paths closed to make room: EXIT_PATHS_PER_NODE).
        ExitRefused, changing nothing, if the policy or room forbids it."""
        node, path = keys.parse_node_id(b.node), bytes.fromhex(b.path)
        self.policy.check(node)
        try:
            pub = bytes.fromhex(b.node_pubkey)
            if keys.node_id(pub) != node:
                raise ValueError("node_pubkey is not the key of node")
        except ValueError as exc:
            raise ExitRefused("malformed", f"malformed exit booking: {exc}") from None
        if b.expires_ms <= now_ms:
            raise ExitRefused("malformed", "malformed exit booking: expires_ms is in the past")
        owner = self.by_path.get(path)
        if owner is not None and owner != node:
            raise ExitRefused("conflict", f"path {path.hex()} is booked for another node")
        booked = self.nodes.get(node)
        budget = min(b.max_bytes, self.caps.max_bytes)
        if booked is None:
            if len(self.nodes) >= self.max_nodes:
                raise ExitRefused("full", f"the exit serves {self.max_nodes} nodes already")
            caps = Caps(self.caps.rate_bps, budget, self.caps.max_flows)
            booked = self.nodes[node] = Booked(node, pub, Meter(caps, now), now)
        elif owner is None:
            booked.meter.extend(budget)
        booked.expires_at = max(booked.expires_at, now + (b.expires_ms - now_ms) / 1000)
        evicted = []
        if owner is None:
            booked.paths.append(path)
            self.by_path[path] = node
            while len(booked.paths) > EXIT_PATHS_PER_NODE:
                evicted.append(booked.paths.pop(0))
                del self.by_path[evicted[-1]]
        return booked, owner is None, evicted

    def expire(self, now: float) -> list[bytes]:
        """Forget the nodes whose bookings ran out; the paths to close."""
        gone = [n for n, b in self.nodes.items() if b.expires_at <= now]
        paths = []
        for n in gone:
            for p in self.nodes.pop(n).paths:
                self.by_path.pop(p, None)
                paths.append(p)
        return paths
