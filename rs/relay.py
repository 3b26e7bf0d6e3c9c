"""The relay table, sans-I/O (docs/PROTOCOL.md §8.2): datagrams in, (datagram, address) pairs out.

A path is created by a DC's Relay Direction (`add_path`) with a 32-byte token; the DC gives each
node only its own side's key derived from it (`packet.relay_side_key`). Each node sends
RELAY_BIND (side, a growing counter, a cookie, MAC'd with its side key) from its tunnel socket.
The relay answers a valid, fresh bind with RELAY_BIND_ACK carrying the cookie for the address it
came from, and binds the side to that address (a later one moves it: roaming) only once a bind
from there carries that cookie: the address has proven it receives (return routability), so a
spoofed source never gets traffic, a replayed bind is refused, and one side cannot bind as the
other. Tunnel packets (types in `packet.FORWARDED_TYPES`) arriving from one
bound side's current address go unchanged to the other side's current address. Nothing else is
forwarded, and the relay reads nothing but the clear `type | path ID` prefix of a forwarded
packet: it has no key and needs none.

Addresses are opaque hashable values here (the server normalises them); time is the caller's
monotonic clock in seconds. No sockets, no clock reads.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Hashable

from ntm import packet
from ntm.errors import CodedError, ParseError

Addr = Hashable

# Idle expiry: a path that forwarded nothing (and saw no valid bind) for this long is removed.
# Nodes send a tunnel keepalive every 25 s (docs/PROTOCOL.md §7), so a live path is never idle
# for more than ~25 s; 90 s tolerates two lost keepalives plus jitter before tearing it down.
RELAY_IDLE_S = 90.0
# A path no node has bound this long after it was booked is released: a DC books one as the
# fallback of every direction, and the nodes bind within 1.5 s when they need it (§7); unused
# ones (the direct path worked, or the direction was abuse) must not pile up for RELAY_IDLE_S.
UNBOUND_S = 30.0
# Bound on simultaneous paths: ~100k paths × ~400 bytes of Python objects ≈ 40 MB, which a
# small relay VM holds; beyond that new directions are refused (DCs pick another relay).
MAX_PATHS = 100_000
# Longest lifetime and largest byte budget one path may get, whatever the DC asks: the DC sends
# a fresh Relay Direction to extend a path it still wants.
MAX_LIFETIME_S = 24 * 3600.0
MAX_PATH_BYTES = 64 * 1024**3

DROP_REASONS = (
    "malformed",  # shorter than the prefix or unknown type
    "unknown_path",  # no such path (never added, or already removed)
    "bad_token",  # RELAY_BIND not MAC'd with that side's key
    "replay",  # RELAY_BIND whose counter is not above the side's last one
    "bad_bind",  # RELAY_BIND of the wrong length or side
    "same_address",  # a bind from the address the other side is bound to
    "unexpected_type",  # a type the relay does not forward (e.g. RELAY_BIND_ACK from a node)
    "unknown_sender",  # tunnel packet from an address bound to neither side (spoofed, or stale)
    "peer_unbound",  # sender is bound, the other side not yet
    "byte_cap",  # the path's byte budget is spent (the path is removed)
    "expired",  # the path outlived its lifetime or went idle (the path is removed)
)

#: The forwarded types as bytes: a run's type bytes less these is empty iff all are forwarded.
_FORWARDED = bytes(sorted(packet.FORWARDED_TYPES))
_KNOWN = bytes(sorted(packet.KNOWN_TYPES))


def gso_batches(items: list[tuple[bytes, Addr]]) -> list[tuple[bytes, int, Addr]]:
    """Consecutive datagrams to one destination joined for one GSO send: (batch, segment size,
    destination), all of the segment size but the last, which may be shorter (as UDP GSO wants)."""
    out: list[tuple[bytes, int, Addr]] = []
    parts: list[bytes] = []
    seg, to = 0, None
    for payload, dest in items:
        if parts and dest == to and len(parts[-1]) == seg and len(payload) <= seg:
            parts.append(payload)
            continue
        if parts:
            out.append((b"".join(parts), seg, to))
        parts, seg, to = [payload], len(payload), dest
    if parts:
        out.append((b"".join(parts), seg, to))
    return out


def _side_of(path: RelayPath, addr: Addr) -> int | None:
    """The side of `path` bound to `addr`, or None."""
    if addr == path.addrs[0]:
        return 0
    if addr == path.addrs[1]:
        return 1
    return None


class PathError(CodedError):
    """`add_path` refused: code "conflict" (path ID taken with another token/owner) or "full"."""

    STATUS = {"conflict": 409}
    DEFAULT_STATUS = 503


@dataclass
class RelayPath:
    path_id: bytes
    token: bytes
    expires_at: float
    max_bytes: int
    created: float
    owner: bytes | None = None  # the DC that asked for the path
    nodes: tuple = ()
    last_active: float = 0.0
    addrs: list = field(default_factory=lambda: [None, None])
    side_keys: tuple = (b"", b"")
    counters: list = field(default_factory=lambda: [0, 0])  # last bind counter seen per side
    bytes: list = field(default_factory=lambda: [0, 0])  # forwarded from side i to the other side
    packets: list = field(default_factory=lambda: [0, 0])
    binds: int = 0

    @property
    def total_bytes(self) -> int:
        return self.bytes[0] + self.bytes[1]

    def stats(self) -> dict:
        """Public view (never the token)."""
        return {
            "path": self.path_id.hex(),
            "bound": [a is not None for a in self.addrs],
            "bytes": list(self.bytes),
            "packets": list(self.packets),
            "binds": self.binds,
            "max_bytes": self.max_bytes,
        }


@dataclass(frozen=True)
class Event:
    """Something worth one log line: kind in {"added", "bound", "moved", "removed"}."""

    kind: str
    path_id: bytes
    side: int | None = None
    addr: Addr | None = None
    reason: str | None = None


class RelayTable:
    def __init__(self, max_paths: int = MAX_PATHS, idle_s: float = RELAY_IDLE_S) -> None:
        self.secret = os.urandom(32)  # keys the address cookies: random per relay process
        self.paths: dict[bytes, RelayPath] = {}
        self.max_paths = max_paths
        self.idle_s = idle_s
        self.dropped: Counter[str] = Counter()
        self.removed: Counter[str] = Counter()
        self.forwarded_packets = 0
        self.forwarded_bytes = 0
        self.binds = 0
        self.paths_added = 0
        self.events: deque[Event] = deque(maxlen=10_000)  # drained by the adapter for logging

    # ------------------------------------------------------------------ control plane

    def add_path(
        self,
        path_id: bytes,
        token: bytes,
        expires_at: float,
        max_bytes: int,
        now: float,
        owner: bytes | None = None,
        nodes: tuple = (),
    ) -> tuple[RelayPath, bool]:
        """Create a path; returns (path, created). The same path ID with the same token (and
        owner) again is idempotent: the existing path is returned unchanged except that its
        lifetime and byte budget are raised to the new values if larger (a DC extending it).
        Raises PathError("conflict") for another token/owner, PathError("full") at the bound,
        ValueError for bad arguments."""
        if len(path_id) != packet.PATH_ID_LEN or len(token) != packet.TOKEN_LEN:
            raise ValueError("path ID must be 8 bytes and token 32 bytes")
        if max_bytes <= 0 or expires_at <= now:
            raise ValueError("path must have a positive byte budget and expire in the future")
        expires_at = min(expires_at, now + MAX_LIFETIME_S)
        max_bytes = min(max_bytes, MAX_PATH_BYTES)
        existing = self.paths.get(path_id)
        if existing is not None and not self._gone(existing, now):
            if not hmac.compare_digest(existing.token, token) or existing.owner != owner:
                raise PathError("conflict", f"path {path_id.hex()} exists with another token")
            existing.expires_at = max(existing.expires_at, expires_at)
            existing.max_bytes = max(existing.max_bytes, max_bytes)
            return existing, False
        if existing is not None:
            self._remove(existing, "expired")
        if len(self.paths) >= self.max_paths:
            self.expire(now)
            if len(self.paths) >= self.max_paths:
                raise PathError("full", f"relay table is full ({self.max_paths} paths)")
        path = RelayPath(
            path_id,
            bytes(token),
            expires_at,
            max_bytes,
            now,
            owner,
            tuple(nodes),
            last_active=now,
            side_keys=(packet.relay_side_key(token, 0), packet.relay_side_key(token, 1)),
        )
        self.paths[path_id] = path
        self.paths_added += 1
        self.events.append(Event("added", path_id))
        return path, True

    def expire(self, now: float) -> int:
        """Housekeeping: remove paths past their lifetime or idle; returns how many."""
        gone = [p for p in self.paths.values() if self._gone(p, now)]
        for p in gone:
            self._remove(p, self._why_gone(p, now))
        return len(gone)

    @staticmethod
    def _why_gone(path: RelayPath, now: float) -> str:
        return "lifetime" if now >= path.expires_at else "unbound" if path.binds == 0 else "idle"

    def _gone(self, path: RelayPath, now: float) -> bool:
        return (
            now >= path.expires_at
            or now - path.last_active >= self.idle_s
            or (path.binds == 0 and now - path.created >= UNBOUND_S)
        )

    def _remove(self, path: RelayPath, reason: str) -> None:
        del self.paths[path.path_id]
        self.removed[reason] += 1
        self.events.append(Event("removed", path.path_id, reason=reason))

    # ------------------------------------------------------------------ data plane

    def _drop(self, reason: str) -> list:
        self.dropped[reason] += 1
        return []

    def on_datagram(self, data: bytes, addr: Addr, now: float) -> list[tuple[bytes, Addr]]:
        """One datagram from `addr`: what to send, to where. Never raises on any input bytes."""
        try:
            kind, path_id = packet.peek(data)
        except ParseError:
            return self._drop("malformed")
        path = self.paths.get(path_id)
        if path is None:
            return self._drop("unknown_path")
        if self._gone(path, now):
            self._remove(path, self._why_gone(path, now))
            return self._drop("expired")
        if kind == packet.TYPE_RELAY_BIND:
            return self._bind(path, data, addr, now)
        if kind not in packet.FORWARDED_TYPES:
            return self._drop("unexpected_type")
        side = _side_of(path, addr)
        if side is None:
            return self._drop("unknown_sender")
        dest = path.addrs[1 - side]
        if dest is None:
            return self._drop("peer_unbound")
        if path.total_bytes + len(data) > path.max_bytes:
            self._remove(path, "byte_cap")
            return self._drop("byte_cap")
        self._forwarded(path, side, len(data), 1, now)
        return [(data, dest)]

    def _forwarded(self, path: RelayPath, side: int, size: int, count: int, now: float) -> None:
        """Account `count` datagrams of `size` bytes in all forwarded from `side` of `path`."""
        path.bytes[side] += size
        path.packets[side] += count
        path.last_active = now
        self.forwarded_packets += count
        self.forwarded_bytes += size

    def on_run(self, run: bytes, seg: int, addr: Addr, now: float) -> list[tuple[bytes, int, Addr]]:
        """A GRO run from `addr`: datagrams of `seg` bytes back to back (the last may be shorter).
        Returns (batch, segment size, destination) triples, each batch datagrams of that size back to
        back (the last may be shorter), for one GSO send. Every datagram gets exactly the verdict
        and accounting `on_datagram` would give it in turn; the common case, one path's forwarded
        packets from its bound side within its budget, is decided once for the run."""
        if not 0 < seg < len(run):
            return gso_batches(self.on_datagram(run, addr, now))
        count = -(-len(run) // seg)
        whole = self._whole_run(run, seg, count, addr, now)
        if whole is not None:
            return whole
        out: list[tuple[bytes, Addr]] = []
        for off in range(0, len(run), seg):
            out += self.on_datagram(run[off : off + seg], addr, now)
        return gso_batches(out)

    def _whole_run(self, run: bytes, seg: int, count: int, addr: Addr, now: float) -> list | None:
        """The run's verdict when one holds for all its datagrams: forwarded packets of one live
        path from its bound side to its bound other side within the budget (all forwarded), or
        dropped for a reason all share (a stranger's spray costs one decision per run); else None."""
        if len(run) - (count - 1) * seg < packet.PREFIX_LEN:
            return None
        types = run[0::seg]
        if types.translate(None, _KNOWN):
            return None
        # The path ID of every datagram, one byte position at a time (C loops, not Python ones).
        if any(run[i::seg] != run[i : i + 1] * count for i in range(1, packet.PREFIX_LEN)):
            return None
        path = self.paths.get(run[1 : packet.PREFIX_LEN])
        if path is None:
            self.dropped["unknown_path"] += count
            return []
        if types.translate(None, _FORWARDED) or self._gone(path, now):
            return None
        side = _side_of(path, addr)
        if side is None:
            self.dropped["unknown_sender"] += count
            return []
        dest = path.addrs[1 - side]
        if dest is None:
            self.dropped["peer_unbound"] += count
            return []
        if path.total_bytes + len(run) > path.max_bytes:
            return None
        self._forwarded(path, side, len(run), count, now)
        return [(run, seg, dest)]

    def cookie(self, path_id: bytes, side: int, addr: Addr) -> bytes:
        """What a bind from `addr` must carry to bind there: HMAC(relay secret, path | side | addr)."""
        msg = path_id + bytes([side]) + repr(addr).encode()
        return hmac.new(self.secret, msg, hashlib.sha256).digest()[: packet.COOKIE_LEN]

    def _bind(self, path: RelayPath, data: bytes, addr: Addr, now: float) -> list[tuple[bytes, Addr]]:
        try:
            bind = packet.RelayBind.parse(data)
        except ParseError:
            return self._drop("bad_bind")
        side = bind.side
        if not bind.verify(path.side_keys[side]):
            return self._drop("bad_token")
        if bind.counter <= path.counters[side]:
            return self._drop("replay")
        if path.addrs[1 - side] == addr:
            return self._drop("same_address")
        path.counters[side] = bind.counter
        cookie = self.cookie(path.path_id, side, addr)
        old = path.addrs[side]
        bound = old == addr
        if not bound and hmac.compare_digest(bind.cookie, cookie):  # the address proved it receives
            path.addrs[side] = addr
            self.events.append(Event("bound" if old is None else "moved", path.path_id, side, addr))
            bound = True
        if bound:
            path.binds += 1
            path.last_active = now
            self.binds += 1
        # No bigger than the bind (35 < 50 bytes), and only to a bind made with the side's key.
        return [(packet.RelayBindAck(path.path_id, side, bound, bind.counter, cookie).encode(), addr)]

    # ------------------------------------------------------------------ views

    def pop_events(self) -> list[Event]:
        out = list(self.events)
        self.events.clear()
        return out

    def bound_paths(self) -> int:
        return sum(1 for p in self.paths.values() if p.addrs[0] is not None and p.addrs[1] is not None)
