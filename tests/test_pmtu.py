"""Path MTU probing (ntm/pmtu.py) on a simulated path: a FakeClock-style loop, probes that pass
when they fit the path's MTU (and are not lost), acknowledgements one round trip later."""

from __future__ import annotations

import random

from ntm.pmtu import (
    BASE_MTU,
    CONFIRM_S,
    CONTROL,
    MAX_PROBES,
    MAX_VOID_ROUNDS,
    MIN_PROBE_ROUND_S,
    PROBE_ROUND_RTTS,
    PROBE_ROUND_S,
    PathMtu,
    Phase,
)

STEP_S = 0.005
RTT_S = 0.05


class FakePath:
    """A path of MTU `mtu` that loses probes with probability `loss` and carries data (tx grows)."""

    def __init__(self, mtu: int, loss: float = 0.0, seed: int = 1, rtt: float = RTT_S) -> None:
        self.mtu = mtu
        self.rtt = rtt
        self.loss = loss
        self.rng = random.Random(seed)
        self.now = 0.0
        self.tx = 0
        self.in_flight: list[tuple[float, int]] = []
        self.sent: list[int] = []

    def run(self, pm: PathMtu, seconds: float, data: bool = True) -> list[int]:
        """Advance; returns the MTU in use after each step."""
        seen = []
        end = self.now + seconds
        while self.now < end:
            if data:
                self.tx += 1
            for pid, size in pm.poll(self.now, self.tx):
                self.sent.append(size)
                if (size == CONTROL or size <= self.mtu) and self.rng.random() >= self.loss:
                    self.in_flight.append((self.now + self.rtt, pid))
            for due, pid in [f for f in self.in_flight if f[0] <= self.now]:
                self.in_flight.remove((due, pid))
                pm.ack(pid, self.now)
            seen.append(pm.mtu)
            self.now += STEP_S
        return seen


def test_clean_path_settles_at_its_mtu_in_one_round_trip():
    path = FakePath(1500)
    pm = PathMtu(0.0)
    path.run(pm, 0.2)
    assert pm.mtu == 1500 and pm.phase is Phase.DONE
    assert pm.settled_s is not None and pm.settled_s <= 2 * RTT_S


def test_smaller_paths_are_found_exactly_without_icmp():
    """Hostile condition: ICMP filtered, so the only evidence is which padded probes come back."""
    for mtu in (1492, 1400, 1280):
        path = FakePath(mtu)
        pm = PathMtu(0.0)
        seen = path.run(pm, 0.1 + PROBE_ROUND_S * (MAX_PROBES + 1))
        assert pm.mtu == mtu and pm.phase is Phase.DONE, mtu
        assert pm.settled_s is not None and pm.settled_s <= PROBE_ROUND_S + 2 * STEP_S
        assert min(seen) == mtu  # never below the path's MTU on the way


def test_probe_loss_never_ends_below_the_path_mtu():
    """Hostile condition: 30% of probes and acks lost. A lost probe may settle the first round one
    size low, but the retries find the real MTU; lost probes never count as a smaller path while
    the control probe is lost too."""
    for seed in range(20):
        path = FakePath(1400, loss=0.3, seed=seed)
        pm = PathMtu(0.0)
        path.run(pm, PROBE_ROUND_S * (MAX_PROBES + 4))
        assert pm.mtu == 1400, seed


def test_lying_icmp_costs_one_search_not_a_smaller_mtu():
    """Hostile condition: an ICMP "fragmentation needed" (or a local route) claims 1300, even 600,
    on a path that carries 1500: the probes decide. Until the search's first round answers, the
    kernel's value is used (the kernel fragments our larger sends anyway), never below the base:
    here one round trip, as the 1500 probe comes back."""
    path = FakePath(1500)
    pm = PathMtu(0.0)
    path.run(pm, 0.2)
    for lie in (1300, 600):
        pm.hint(lie, path.now)
        assert pm.phase is Phase.SEARCH
        seen = path.run(pm, 1.0)
        assert pm.mtu == 1500 and min(seen) == max(lie, BASE_MTU)
        assert sum(m < 1500 for m in seen) * STEP_S <= RTT_S + 2 * STEP_S
    searches = pm.searches
    pm.hint(600, path.now)  # the kernel keeps saying it: nothing new, no new search
    assert pm.searches == searches


def test_a_true_icmp_hint_is_probed_and_used():
    path = FakePath(1500)
    pm = PathMtu(0.0)
    path.run(pm, 0.2)
    path.mtu = 1372  # not a common size: the hint makes it a candidate
    pm.hint(1372, path.now)
    path.run(pm, PROBE_ROUND_S + 0.1)
    assert pm.mtu == 1372


def test_a_hint_during_a_search_is_asked_in_its_next_round():
    path = FakePath(1372)
    pm = PathMtu(0.0)
    pm.hint(1372, 0.0)  # before the first round went out: asked in it
    path.run(pm, PROBE_ROUND_S + 0.1)
    assert pm.mtu == 1372


def test_the_kernels_mtu_is_used_from_the_first_packet():
    """A node whose own uplink is small (PPPoE, a VPN) knows it before any probe: its kernel's MTU
    towards the peer is the MTU in use from the handshake on, so a TCP SYN that opens the tunnel
    is clamped to segments that fit (no "too big" round trip, no segments split below 1280).
    Where the kernel's value is stale (a path that grew back), the first round raises it."""
    for start, path_mtu in ((1400, 1400), (1280, 1280), (1400, 1500)):
        path = FakePath(path_mtu)
        pm = PathMtu(0.0, start=start)
        assert pm.mtu == start
        seen = path.run(pm, PROBE_ROUND_S * (MAX_PROBES + 1))
        assert pm.mtu == path_mtu and max(seen[:1]) == start and min(seen) == start, (start, path_mtu)
    assert PathMtu(0.0, start=1600).mtu == 1500 and PathMtu(0.0, start=576).mtu == BASE_MTU
    pm = PathMtu(0.0)  # the kernel refused a send for size (EMSGSIZE) before the first round ended:
    pm.hint(1400, 0.01)  # the next batches are built to fit what it accepts
    assert pm.mtu == 1400 and pm.phase is Phase.SEARCH


def test_probe_round_follows_the_paths_rtt():
    """A shrunk path stalls its traffic for one round: the round is PROBE_ROUND_RTTS round trips
    of the path, within [MIN_PROBE_ROUND_S, PROBE_ROUND_S], so a fast path is found sooner."""
    pm = PathMtu(0.0)
    assert pm.round_s() == PROBE_ROUND_S  # RTT not measured yet
    for rtt, want in ((0.0005, MIN_PROBE_ROUND_S), (0.05, PROBE_ROUND_RTTS * 0.05), (1.0, PROBE_ROUND_S)):
        pm.rtt = rtt
        assert pm.round_s() == want
    path = FakePath(1400)
    pm = PathMtu(0.0)
    pm.rtt = RTT_S
    path.run(pm, 1.0)
    assert pm.mtu == 1400 and pm.settled_s is not None
    assert pm.settled_s <= PROBE_ROUND_RTTS * RTT_S + 2 * STEP_S < PROBE_ROUND_S


def test_answers_later_than_the_round_still_count():
    """Hostile condition: a loaded peer answers after the round ended (its RTT looked shorter than
    it is now). The first round settles low, but the late answers and the retries find the MTU,
    and late answers never count as misses."""
    path = FakePath(1400, rtt=0.15)
    pm = PathMtu(0.0)
    pm.rtt = 0.001  # measured when idle: rounds of MIN_PROBE_ROUND_S
    path.run(pm, 2.0)
    assert pm.mtu == 1400 and pm.phase is Phase.DONE


def test_a_path_silent_for_a_moment_after_a_move_is_still_searched():
    """Hostile condition: right after a move nothing gets through for half a second (a new NAT
    mapping, a link coming up). Short RTT-based rounds must not use up the dead-path budget in
    that time: unanswered rounds fall back to PROBE_ROUND_S, and the search finds the new MTU
    when the path comes back, not only the next confirmation CONFIRM_S later."""
    path = FakePath(1400)
    pm = PathMtu(0.0)
    pm.rtt = 0.001  # rounds of MIN_PROBE_ROUND_S
    path.loss = 1.0
    path.run(pm, 0.6)
    path.loss = 0.0
    path.run(pm, 1.2)
    assert path.now < CONFIRM_S and pm.mtu == 1400


def test_mtu_grows_back_after_a_move():
    """A move to a smaller network and back: each move restarts the search (the endpoint calls
    restart on a new address), and the MTU follows both ways."""
    path = FakePath(1500)
    pm = PathMtu(0.0)
    path.run(pm, 0.2)
    path.mtu = 1400
    pm.restart(path.now)
    path.run(pm, 2.0)
    assert pm.mtu == 1400
    path.mtu = 1500
    pm.restart(path.now)
    path.run(pm, 0.2)
    assert pm.mtu == 1500 and pm.settled_s is not None and pm.settled_s <= 2 * RTT_S


def test_silent_shrink_is_caught_by_confirmation_while_data_flows():
    """Hostile condition: the path shrinks with no ICMP and no address change (a black hole)."""
    path = FakePath(1500)
    pm = PathMtu(0.0)
    path.run(pm, 0.2)
    path.mtu = 1400
    shrunk_at = path.now
    seen = path.run(pm, CONFIRM_S + PROBE_ROUND_S * (MAX_PROBES + 2))
    assert pm.mtu == 1400
    stalled = seen.index(1400) * STEP_S
    assert stalled <= CONFIRM_S + PROBE_ROUND_S * (MAX_PROBES + 1) + 0.1, stalled
    print(f"black hole found after {stalled:.2f} s (shrunk at {shrunk_at:.2f})")


def test_idle_path_sends_no_confirmations():
    path = FakePath(1500)
    pm = PathMtu(0.0)
    path.run(pm, 0.2)
    n = len(path.sent)
    path.run(pm, 5 * CONFIRM_S, data=False)
    assert len(path.sent) - n <= 2  # at most the first confirmation after the search


def test_dead_path_leaves_the_mtu_alone():
    """Nothing comes back at all (the tunnel died): not a small path; the search gives up."""
    path = FakePath(1500)
    pm = PathMtu(0.0)
    path.run(pm, 0.2)
    path.loss = 1.0
    pm.restart(path.now)
    path.run(pm, PROBE_ROUND_S * (MAX_VOID_ROUNDS + 1) + 0.1)
    assert pm.mtu == 1500 and pm.phase is Phase.DONE


def test_never_below_base_and_stale_acks_ignored():
    path = FakePath(1000)  # below what is probed: everything but the control probe lost
    pm = PathMtu(0.0)
    path.run(pm, PROBE_ROUND_S * (MAX_PROBES + 2))
    assert pm.mtu == BASE_MTU
    assert pm.ack(10**6, path.now) is False


# --- the endpoint runs it per path -------------------------------------------------------------
async def test_endpoints_find_each_direction_and_follow_a_move():
    """Two endpoints on an in-memory network that silently drops datagrams over a size (ICMP
    filtered): each side finds its own direction's MTU from PROBE/PROBE_ACK, the inner MTU follows,
    and after a move (paths_changed) the search runs again and finds the new size."""
    import asyncio
    import os

    from node.endpoint import Endpoint
    from ntm import keys
    from tests.fakes import MemoryNetwork

    limit = {"10.0.0.1": 1400, "10.0.0.2": 1500}  # largest IP packet each host can send
    net = MemoryNetwork(drop=lambda src, dst, data: len(data) + 28 > limit[src[0]])
    ka, kb = keys.generate(), keys.generate()
    ea = await Endpoint.create(ka, None, 0, binder=net.binder("10.0.0.1"))
    eb = await Endpoint.create(kb, None, 0, binder=net.binder("10.0.0.2"))
    try:
        path = os.urandom(8)
        pa, pb = keys.public_bytes(ka), keys.public_bytes(kb)
        cb, ca = await asyncio.gather(
            eb.open(path, keys.node_id(pa), pa, role="wait"),
            ea.open(path, keys.node_id(pb), pb, candidates=[eb.local_addr]),
        )
        await asyncio.sleep(PROBE_ROUND_S * (MAX_PROBES + 1) + 0.3)
        assert ea.mtu_status(ca.session)["path_mtu"] == 1400 and ea.inner_mtu(ca.session) == 1400 - 28 - 33
        assert eb.mtu_status(cb.session)["path_mtu"] == 1500
        limit["10.0.0.1"] = 1290  # A moves to a network with MTU 1290
        ea.paths_changed()
        await asyncio.sleep(PROBE_ROUND_S + 0.2)
        assert ea.mtu_status(ca.session)["path_mtu"] == BASE_MTU  # 1290 is no candidate: the base, which fits
    finally:
        await ea.close()
        await eb.close()


# --- wire format (docs/PROTOCOL.md §7 "Path MTU") --------------------------------------------------
PROBE_VECTOR = (
    "091111111111111111000000000000000598a1c262c3be954c685249f145f755e21b0427f6717b346d28df6d2206bf5a"
    "5e8aa2480079124f6f3e4733db74d857"
)
PROBE_ACK_VECTOR = "0a11111111111111110000000000000007e06d131f17175efbfba2190c786151a994b73474629d7f14"


def test_probe_wire_vectors_and_session_answers():
    """The documented vectors (key 00..1f, path 11×8, PROBE counter 5 padded to 64 bytes, its
    PROBE_ACK counter 7, probe id 1) follow the transport layout; a Session's probe has exactly the
    asked length, and its peer answers with a 41-byte PROBE_ACK from which a ProbeAck event comes."""
    import struct

    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from ntm.packet import TransportPacket
    from ntm.tunnel import ProbeAck
    from tests.test_tunnel import ADDR_A, ADDR_B, T0, connect

    key, path = bytes(range(32)), b"\x11" * 8
    for vector, kind, counter, plain in (
        (PROBE_VECTOR, 0x09, 5, (1).to_bytes(8, "big") + bytes(23)),
        (PROBE_ACK_VECTOR, 0x0A, 7, (1).to_bytes(8, "big")),
    ):
        header = struct.pack("!B8sQ", kind, path, counter)
        pkt = header + AESGCM(key).encrypt(bytes(4) + struct.pack("!Q", counter), plain, header)
        assert pkt.hex() == vector
        assert TransportPacket.parse(pkt).type == kind
    a, b, net = connect()
    probe = a.mtu_probe((42).to_bytes(8, "big"), 1372, T0 + 1)
    assert len(probe) == 1372 and probe[0] == 0x09
    assert b.receive(probe, ADDR_A, T0 + 1) == []
    [(ack, dst)] = b.datagrams_to_send()
    assert dst == ADDR_A and len(ack) == 41 and ack[0] == 0x0A
    assert a.receive(ack, ADDR_B, T0 + 1) == [ProbeAck((42).to_bytes(8, "big"))]
    assert len(a.mtu_probe(bytes(8), 0, T0 + 1)) == 41  # the control probe: as short as it gets
