"""Path MTU of one tunnel path, found by probing (docs/PROTOCOL.md §7 "Path MTU"), RFC 8899 style.

ICMP "fragmentation needed" is often filtered, and a path's MTU changes whenever a node moves
(Wi-Fi 1500, PPPoE 1492, LTE and VPNs 1400 or less). So the path is measured with its own
packets: PROBEs padded to a candidate size that the peer acknowledges (PROBE_ACK). A size is
taken as too big only when it went unanswered MAX_PROBES times while a small control probe sent
with it got through, so loss alone never shrinks the MTU and a dead path leaves it alone.

Sans-I/O and clock-free: the endpoint sends what `poll` returns, feeds `ack`, `restart` (path
changed), `hint` (the kernel's ICMP-learned or local route MTU: a reason to look, never believed
unprobed, but used until the probes have spoken) and reads `mtu`:

    pm = PathMtu(now, start=kernel_mtu)     # searching from the start
    for probe_id, size in pm.poll(now, tx_count): send a PROBE making a `size`-byte IP packet
    pm.ack(probe_id, now)                   # a PROBE_ACK arrived
    pm.mtu                                  # the outer IP MTU to fill, never below BASE_MTU

A search probes every common MTU at once (one round trip settles most paths), settles on the
largest acknowledged size when its first round ends (a round lasts PROBE_ROUND_RTTS round trips,
between MIN_PROBE_ROUND_S and PROBE_ROUND_S: a path that shrank stalls about that long),
and keeps asking the sizes above it that were merely unanswered, raising the MTU if they pass.
While data flows, the MTU in use is confirmed every CONFIRM_S (black holes: a path that shrinks
with no ICMP and no address change).
"""

from __future__ import annotations

import enum

#: The smallest path MTU, assumed without probing: IPv6's minimum link MTU (RFC 8200 §5), which
#: IPv4 paths of the Internet meet too; nothing is probed below it.
BASE_MTU = 1280
#: The largest path MTU probed: Ethernet's; jumbo frames rarely survive an Internet path.
MAX_MTU = 1500
#: Sizes probed in one search: the MTUs links commonly have (Ethernet, PPPoE 1492, IPv6-in-IPv4
#: and DS-Lite 1480/1460, VPNs and mobile carriers 1400-1440, tunnels in tunnels down to 1280).
COMMON_MTUS = (1500, 1492, 1480, 1460, 1440, 1420, 1400, 1380, 1360, 1340, 1320, 1300)
#: Size given for the control probe: as short as a probe can be.
CONTROL = 0
#: How long a probe round waits for acknowledgements at most (the RTT unknown or long): several
#: round trips of a mobile path (LTE ~50-100 ms), and the longest a transfer stalls when its path shrinks.
PROBE_ROUND_S = 0.4
#: A round lasts this many of the path's round trips when its RTT is known: the acks of a round
#: sent back to back come within ~1 RTT, the rest is room for a busy receiver's queue.
PROBE_ROUND_RTTS = 4
#: ... but never less than this: a sub-millisecond LAN RTT says nothing about how late a loaded
#: peer's event loop answers (a late answer only costs a retry, never a smaller MTU).
MIN_PROBE_ROUND_S = 0.1
#: Rounds a size may go unanswered (its control probe answered) before it is too big: RFC 8899's
#: MAX_PROBES; one or two lost probes are loss, not a smaller path.
MAX_PROBES = 3
#: Rounds in a row with nothing answered before a search gives up: the path is dead, not small
#: (tunnel liveness deals with that), so the MTU is left as it was.
MAX_VOID_ROUNDS = 5
#: While data flows, the MTU in use is confirmed this often: the bound on how long a path that
#: shrank silently (no ICMP, no address change) loses full-size packets, plus one search.
CONFIRM_S = 3.0


class Phase(enum.Enum):
    SEARCH = "search"  # probing candidate sizes
    CONFIRM = "confirm"  # probing the MTU in use
    DONE = "done"  # nothing to probe until data flows for CONFIRM_S or the path changes


class PathMtu:
    """Probe state of one path. All sizes are outer IP packet sizes (path MTU)."""

    def __init__(self, now: float, max_mtu: int = MAX_MTU, start: int | None = None) -> None:
        """`start`: the kernel's MTU towards the path (the local link's, or ICMP-learned), used until
        the first round settles; without it that is `max_mtu` (optimistic: a SYN is small)."""
        self.max_mtu = max(max_mtu, BASE_MTU)
        self.mtu = self.max_mtu
        self.rtt: float | None = None  # the path's round-trip time, when the tunnel measured it
        self.searches = 0
        self.probes_sent = 0
        self.probes_acked = 0
        self.started_at = now
        self.settled_s: float | None = None  # how long the latest search took to settle
        self.settled_at: float | None = None  # when it settled
        self._next_id = 0
        self._hint: int | None = None
        self._tx_seen = -1
        self._round: dict[int, int] = {}
        self._older: dict[int, int] = {}
        self.restart(now, hint=start)

    # --- inputs ------------------------------------------------------------------------------
    def restart(self, now: float, hint: int | None = None) -> None:
        """The path changed (a move, the peer roamed, another uplink): search it afresh. The MTU in
        use stays until the first round settles, or becomes `hint` (the kernel's MTU towards the
        path) if that is smaller."""
        self.phase = Phase.SEARCH
        self.searches += 1
        self.started_at = now
        self.settled_s = self.settled_at = None
        self._lo, self._hi = BASE_MTU, self.max_mtu + 1
        sizes = {s for s in (*COMMON_MTUS, self.max_mtu, hint or 0) if BASE_MTU < s <= self.max_mtu}
        self._candidates = sorted(sizes, reverse=True)
        self._misses: dict[int, int] = {}
        self._void = 0
        self._settled = False
        self._late = False
        self._round = {}
        self._interim(hint)
        self._new_round(now)

    def _interim(self, kernel_mtu: int | None) -> None:
        """Until the search's first round settles, never use more than the kernel's MTU towards the
        path: our own sends above it are fragmented (GSO batches refused) by the kernel anyway, and
        a TCP SYN clamped to it now needs no "too big" round trip later. The probes then decide,
        so an ICMP that lies costs one round at its value (never below BASE_MTU)."""
        if kernel_mtu is not None and not self._settled and kernel_mtu < self.mtu:
            self.mtu = max(kernel_mtu, BASE_MTU)

    def hint(self, mtu: int | None, now: float) -> None:
        """The kernel's MTU towards the path (ICMP-learned, or the local route's). Below the MTU in
        use and new, it starts a search with it as a candidate, used until that search's first
        round settles: an ICMP that lies costs one search and at most one round at its value, never
        a smaller MTU once the probes have answered."""
        if mtu is None or mtu == self._hint:
            return
        self._hint = mtu
        if self.phase is Phase.SEARCH:
            self._interim(mtu)
            if self._lo < mtu < self._hi and mtu not in self._candidates:
                self._candidates = sorted({*self._candidates, mtu}, reverse=True)  # asked next round
        elif mtu < self.mtu:
            self.restart(now, hint=mtu)

    def ack(self, probe_id: int, now: float) -> bool:
        """A PROBE_ACK for `probe_id`; False if it was not one of ours in this search (stale). An
        answer from an earlier round of the search still proves its size passes."""
        size = self._round.pop(probe_id, None)
        if size is None:
            size = self._older.pop(probe_id, None)
            if size is None:
                return False
            self._answered = True  # the path is alive, only slower than the round:
            self._late = True  # the rest of this search waits PROBE_ROUND_S
            if size != CONTROL:
                self._passed(size, now)
            return True
        self.probes_acked += 1
        self._answered = True
        if size == CONTROL:
            return True
        if self.phase is Phase.CONFIRM:
            self._misses.pop(size, None)
            self._done(now)
            return True
        self._passed(size, now)
        return True

    def _passed(self, size: int, now: float) -> None:
        """A probe of `size` was answered during the search."""
        self._lo = max(self._lo, size)
        self._misses.pop(size, None)
        self._candidates = [c for c in self._candidates if self._lo < c < self._hi]
        if self._settled or not self._candidates:
            self.mtu = self._lo  # raised by a retry that got through, or nothing left to try
            if not self._candidates:
                self._settle(now)
                self._done(now)

    # --- timers --------------------------------------------------------------------------------
    def next_timer(self) -> float | None:
        """When poll() has work: a round to start or end, or a confirmation due."""
        if self.phase is Phase.DONE:
            return self._confirm_at
        return self._round_end if self._round_end is not None else self._due

    def poll(self, now: float, tx_count: int = 0) -> list[tuple[int, int]]:
        """Probes to send now, as (probe ID, size). `tx_count`: the path's data packets sent so far
        (a confirmation is due only if it grew)."""
        if self.phase is Phase.DONE:
            if now < self._confirm_at:
                return []
            if tx_count == self._tx_seen:
                self._confirm_at = now + CONFIRM_S
                return []
            self._tx_seen = tx_count
            self.phase = Phase.CONFIRM
            self._candidates = [self.mtu]
            self._new_round(now)
        if self._round_end is not None and now >= self._round_end:
            self._end_round(now)
            if self.phase is Phase.DONE:
                return []
        if self._round_end is None and now >= self._due:
            return self._send_round(now)
        return []

    # --- rounds --------------------------------------------------------------------------------
    def _new_round(self, now: float) -> None:
        # The previous round's probes of this search: a late answer still counts (one round back).
        self._older = self._round if self.phase is Phase.SEARCH else {}
        self._round = {}
        self._round_end: float | None = None
        self._answered = False
        self._due = now

    def _send_round(self, now: float) -> list[tuple[int, int]]:
        out = []
        for size in (*self._candidates, CONTROL):
            self._next_id += 1
            self._round[self._next_id] = size
            out.append((self._next_id, size))
        self.probes_sent += len(out)
        self._round_end = now + self.round_s()
        return out

    def round_s(self) -> float:
        """How long a round waits for its answers: PROBE_ROUND_RTTS round trips of the path,
        within [MIN_PROBE_ROUND_S, PROBE_ROUND_S]; PROBE_ROUND_S once an answer came late or a
        round went unanswered in this search."""
        if self.rtt is None or self._late:
            return PROBE_ROUND_S
        return min(max(PROBE_ROUND_RTTS * self.rtt, MIN_PROBE_ROUND_S), PROBE_ROUND_S)

    def _end_round(self, now: float) -> None:
        if not self._answered:  # nothing came back: a dead path or heavy loss, not a small one
            self._void += 1
            self._late = True  # full rounds from now on: MAX_VOID_ROUNDS is a time, not a count of short rounds
            if self._void >= MAX_VOID_ROUNDS:
                self._done(now)
            else:
                self._new_round(now)
            return
        self._void = 0
        if CONTROL not in self._round.values():  # the path carried small probes: silence is size
            for size in self._round.values():
                self._misses[size] = self._misses.get(size, 0) + 1
                if self._misses[size] >= MAX_PROBES:
                    self._hi = min(self._hi, size)
        if self.phase is Phase.CONFIRM:
            if self._hi <= self.mtu:  # the MTU in use stopped getting through: the path shrank
                self.restart(now)
            else:
                self._new_round(now)
            return
        self._candidates = [c for c in self._candidates if self._lo < c < self._hi]
        if not self._settled:
            self.mtu = self._lo
            self._settle(now)
        if self._candidates:
            self._new_round(now)
        else:
            self._done(now)

    def _settle(self, now: float) -> None:
        if not self._settled:
            self._settled = True
            self.settled_s = now - self.started_at
            self.settled_at = now

    def _done(self, now: float) -> None:
        self.phase = Phase.DONE
        self._round, self._round_end, self._older = {}, None, {}
        self._confirm_at = now + CONFIRM_S
