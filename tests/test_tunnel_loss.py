"""Tunnel setup under loss (issue 22 item 5; docs/PROTOCOL.md §7): the sans-I/O Session on a
simulated network with a fake clock: two nodes behind EIM NATs with home-router firewalls
(inbound only from where the node has sent), random loss on each uplink, a relay that forwards
between bound sides. The decisions under test: key confirmation that survives loss, the winner
of a simultaneous open answering at once, the relay fallback not firing on a few lost datagrams,
and a direct handshake that completes after the relay's moving the tunnel off the relay.

The lab test (tests/lab/test_lab_loss.py) is the same with real NATs and iptables loss.
"""

from __future__ import annotations

import heapq
import itertools
import os
import random
from dataclasses import dataclass, field

from ntm import keys
from ntm.packet import TYPE_HANDSHAKE_REQUEST, TYPE_PING, TYPE_RELAY_BIND, RelayBind, RelayBindAck
from ntm.tunnel import (
    HANDSHAKE_RETRANSMIT,
    RELAY_FALLBACK_AFTER,
    Data,
    HandshakeDone,
    Phase,
    RelayInfo,
    Session,
    TunnelConfig,
)

K1, K2 = keys.generate(), keys.generate()
LOW, HIGH = sorted((K1, K2), key=lambda k: keys.node_id(keys.public_bytes(k)))  # LOW wins collisions
PATH = os.urandom(8)
TOKEN = os.urandom(32)
PUB = {"a": ("198.51.100.1", 4330), "b": ("203.0.113.2", 4330)}  # each node's NAT mapping
RELAY = ("192.0.2.1", 4340)
LATENCY_S = 0.01  # one way, per hop
T0 = 1000.0


@dataclass
class Node:
    name: str
    session: Session
    loss: float
    opened: set = field(default_factory=set)  # where its NAT lets answers in from
    done_at: float | None = None


class LossyNet:
    """Two punching nodes, their NATs and a relay. `block_direct` drops every direct datagram
    (both ways) until that time: a path that only starts working later."""

    def __init__(
        self,
        a_key,
        b_key,
        loss_a: float,
        loss_b: float = 0.0,
        seed: int = 0,
        *,
        block_direct: float = 0.0,
        config: TunnelConfig | None = None,
        relay: bool = True,
        drop: set[tuple[str, int, int]] | None = None,
        latency: float = LATENCY_S,
        b_later: float = 0.0,
    ) -> None:
        ids = {"a": keys.node_id(keys.public_bytes(a_key)), "b": keys.node_id(keys.public_bytes(b_key))}
        pubs = {"a": keys.public_bytes(a_key), "b": keys.public_bytes(b_key)}
        self.rng = random.Random(seed)
        self.latency = latency
        self.starts = {"a": T0, "b": T0 + b_later}  # b's direction may arrive later than a's
        self.block_direct = T0 + block_direct
        self.nodes: dict[str, Node] = {}
        for me, other, key, loss, side in (("a", "b", a_key, loss_a, 0), ("b", "a", b_key, loss_b, 1)):
            s = Session(
                key,
                ids[other],
                pubs[other],
                PATH,
                role="punch",
                candidates=[PUB[other]],
                relay=RelayInfo(RELAY, TOKEN, side) if relay else None,
                config=config,
                wall=lambda: self.now,
            )
            self.nodes[me] = Node(me, s, loss)
        self.bound: set[str] = set()  # relay sides that sent a bind
        self.queue: list = []
        self.seq = itertools.count()
        self.now = T0
        self.sent: list[tuple[float, str, int, tuple]] = []  # (time, node, type, destination)
        self.drop = drop or set()  # (node, type, n): drop the n-th datagram of that type it sends
        self._counts: dict[tuple[str, int], int] = {}

    def _lost(self, node: Node) -> bool:
        return self.rng.random() < node.loss

    def _send(self, node: Node, data: bytes, dst: tuple) -> None:
        self.sent.append((self.now, node.name, data[0], dst))
        n = self._counts[node.name, data[0]] = self._counts.get((node.name, data[0]), 0) + 1
        if (node.name, data[0], n) in self.drop or self._lost(node):
            return  # lost on the uplink, before the NAT kept a mapping (as the lab's iptables rule)
        node.opened.add(dst)
        other = self.nodes["b" if node.name == "a" else "a"]
        if dst == RELAY:
            side = node.name
            if data[0] == TYPE_RELAY_BIND:
                self.bound.add(side)
            elif other.name in self.bound:
                heapq.heappush(self.queue, (self.now + 2 * self.latency, next(self.seq), other, data, RELAY))
        elif dst == PUB[other.name] and self.now >= self.block_direct:
            heapq.heappush(self.queue, (self.now + self.latency, next(self.seq), other, data, PUB[node.name]))

    def _deliver(self, node: Node, data: bytes, src: tuple) -> None:
        if src not in node.opened or self._lost(node):
            return  # the firewall drops what does not answer our own traffic; or lost on the uplink
        for ev in node.session.receive(data, src, self.now):
            if isinstance(ev, HandshakeDone) and not ev.rekey and node.done_at is None:
                node.done_at = self.now

    def run(self, until: float) -> None:
        """Run both nodes until `until` s after T0 (started on the first call; later calls go on)."""
        end = T0 + until
        while self.now <= end:
            for node in self.nodes.values():
                if node.session.phase is Phase.NEW and self.now >= self.starts[node.name]:
                    node.session.start(self.now)
                for data, dst in node.session.poll(self.now):
                    self._send(node, data, dst)
            while self.queue and self.queue[0][0] <= self.now:
                _, _, node, data, src = heapq.heappop(self.queue)
                self._deliver(node, data, src)
                for d, dst in node.session.datagrams_to_send():
                    self._send(node, d, dst)
            times = [t for t in (n.session.next_timer() for n in self.nodes.values()) if t is not None]
            times += [t for t in self.starts.values() if t > self.now]
            times += [self.queue[0][0]] if self.queue else []
            nxt = min(times, default=end + 1)
            self.now = max(nxt, self.now + 0.001)  # at least 1 ms on: a timer due now already ran

    @property
    def a(self) -> Session:
        return self.nodes["a"].session

    @property
    def b(self) -> Session:
        return self.nodes["b"].session

    def setup_s(self) -> float | None:
        """When both ends could send (the later HandshakeDone), from start."""
        done = [n.done_at for n in self.nodes.values()]
        return None if None in done else max(done) - T0  # type: ignore[type-var]

    def direct(self) -> bool:
        return self.a.peer_addr == PUB["b"] and self.b.peer_addr == PUB["a"] and "relay" not in (self.a.via, self.b.via)

    def fell_back(self) -> bool:
        return self.a.relay_active or self.b.relay_active


def test_without_loss_the_collision_winner_answers_at_once():
    """Hostile condition: the peer's home-router firewall drops our first Request (it arrives
    before the peer has sent anything). Whichever side wins the simultaneous open, the setup
    takes a few one-way delays, not a 250 ms retransmission: the winner resends its Request the
    moment the peer's (collided) Request shows the peer's NAT is open."""
    for a_key, b_key in ((LOW, HIGH), (HIGH, LOW)):
        net = LossyNet(a_key, b_key, 0.0, b_later=2 * LATENCY_S)  # a's first Request meets b's firewall
        net.run(1.0)
        assert net.direct() and not net.fell_back()
        assert net.setup_s() < 8 * LATENCY_S, (a_key is LOW, net.setup_s())


def test_a_collided_request_makes_the_winner_resend_once_and_only_to_the_peer():
    """Adversary: an on-path attacker replays the peer's collided Request many times, from the
    peer's address and from its own, and forges one with a bad mac1. The winner resends its
    newest Request once per Request of its own, only to an address that Request went to; a
    forgery (bad mac1) or a stranger's address gets nothing."""
    ida, idb = (keys.node_id(keys.public_bytes(k)) for k in (LOW, HIGH))
    w = Session(LOW, idb, keys.public_bytes(HIGH), PATH, role="punch", candidates=[PUB["b"]])
    loser = Session(HIGH, ida, keys.public_bytes(LOW), PATH, role="punch", candidates=[PUB["a"]])
    w.start(T0)
    loser.start(T0)
    ((ours, _),) = w.poll(T0)
    ((theirs, _),) = loser.poll(T0)
    forged = theirs[:-1] + bytes([theirs[-1] ^ 1])
    assert w.receive(forged, PUB["b"], T0) == [] and w.datagrams_to_send() == []
    assert w.receive(theirs, ("203.0.113.66", 1), T0) == [] and w.datagrams_to_send() == []  # not where ours went
    for _ in range(5):
        w.receive(theirs, PUB["b"], T0)
    assert w.datagrams_to_send() == [(ours, PUB["b"])]  # the same bytes, once
    ((again, _),) = w.poll(T0 + HANDSHAKE_RETRANSMIT)  # the next round may be resent once more
    w.receive(theirs, PUB["b"], T0 + HANDSHAKE_RETRANSMIT)
    assert w.datagrams_to_send() == [(again, PUB["b"])]
    assert w.stats["drop_handshake_collision"] == 8


def test_a_request_goes_through_the_relay_as_soon_as_it_binds():
    """Hostile condition: the relay drops what arrives before a side is bound (return
    routability takes a cookie round trip), so the first Request through it is always lost.
    When the relay acknowledges the binding, the newest Request goes through it again at once
    (the NAT lab measured one 250 ms retransmission on every relayed setup before)."""
    ida, idb = (keys.node_id(keys.public_bytes(k)) for k in (LOW, HIGH))
    a = Session(LOW, idb, keys.public_bytes(HIGH), PATH, relay=RelayInfo(RELAY, TOKEN, 0))
    a.start(T0)
    out = a.poll(T0)
    (req,) = [d for d, dst in out if d[0] == TYPE_HANDSHAKE_REQUEST and dst == RELAY]
    (bind,) = [RelayBind.parse(d) for d, dst in out if d[0] == TYPE_RELAY_BIND]
    cookie = os.urandom(16)
    a.receive(RelayBindAck(PATH, 0, False, bind.counter, cookie).encode(), RELAY, T0 + 0.01)
    (bind2,) = [RelayBind.parse(d) for d, _ in a.datagrams_to_send()]  # the bind with the cookie
    a.receive(RelayBindAck(PATH, 0, True, bind2.counter, cookie).encode(), RELAY, T0 + 0.02)
    assert a.datagrams_to_send() == [(req, RELAY)]


def test_a_lost_key_confirmation_is_repeated():
    """Hostile condition: the initiator's key confirmation is lost. The responder cannot send
    until a packet on the new keys arrives; the confirmation is repeated every retransmission
    interval until the responder answers, so it never waits for the relay fallback (before, it
    fell back at 1.5 s and often ended on the relay)."""
    net = LossyNet(LOW, HIGH, 0.0, drop={("a", TYPE_PING, 1)})  # LOW (a) initiates; its 1st PING lost
    net.run(3.0)
    assert net.direct() and not net.fell_back()
    assert HANDSHAKE_RETRANSMIT <= net.setup_s() < HANDSHAKE_RETRANSMIT + 6 * LATENCY_S
    pings = [t for t, who, kind, _ in net.sent if who == "a" and kind == TYPE_PING]
    assert len(pings) == 2 and net.a.stats["confirms_sent"] == 2  # answered: no more


def test_a_round_trip_longer_than_the_retransmission_interval():
    """Hostile condition: a 600 ms round trip (satellite, a congested mobile link), so Requests
    are retransmitted before the first Response can arrive and the responder answers several.
    The initiator completes on the first Response (an older attempt); the responder still has
    those keys (ANSWERED_KEPT), so the confirmation decrypts and data flows both ways. Before,
    the responder kept only the newest answer and the tunnel stayed one-sided."""
    for a_key, b_key in ((LOW, HIGH), (HIGH, LOW)):
        net = LossyNet(a_key, b_key, 0.0, latency=0.3, relay=False)
        net.run(3.0)
        assert net.a.established and net.b.established
        assert data_of_both(net)


def data_of_both(net: LossyNet) -> bool:
    """A payload each way on the keys both ends ended with."""
    a, b = net.a, net.b
    got_b = b.receive(a.encrypt(b"to b", net.now), PUB["a"], net.now)
    got_a = a.receive(b.encrypt(b"to a", net.now), PUB["b"], net.now)
    return got_b == [Data(b"to b")] and got_a == [Data(b"to a")]


def test_confirmations_stop_after_their_bound_when_nothing_answers():
    """Hostile condition: the path dies right after the handshake. The initiator repeats its
    key confirmation CONFIRM_ATTEMPTS times, then stops (no endless PINGs into a dead path)."""
    cfg = TunnelConfig()
    drops = {("a", TYPE_PING, n) for n in range(1, 50)}
    net = LossyNet(LOW, HIGH, 0.0, config=cfg, relay=False, drop=drops)
    net.run(10.0)
    assert net.a.stats["confirms_sent"] == cfg.confirm_attempts
    assert not net.b.established


def test_a_direct_handshake_after_the_relay_moves_the_tunnel_off_it():
    """Hostile condition: the direct path only starts working after the relay fallback (a NAT
    that let nothing through at first). The tunnel comes up on the relay, then both ends keep
    trying the direct candidate; the direct handshake that completes later moves both ends off
    the relay (`via` follows), and relay bind refreshes stop."""
    for a_key, b_key in ((LOW, HIGH), (HIGH, LOW)):
        net = LossyNet(a_key, b_key, 0.0, block_direct=3.0)
        net.run(2.9)
        assert net.a.via == net.b.via == "relay" and net.a.peer_addr == net.b.peer_addr == RELAY
        net.block_direct = T0
        net.run(net.now - T0 + 0.5)
        assert net.direct(), (net.a.via, net.a.peer_addr, net.b.via, net.b.peer_addr)
        assert net.a.via.startswith("candidate:") or net.b.via.startswith("candidate:")
        moved = net.now
        net.run(moved - T0 + 30.0)
        assert net.direct() and not [t for t, _, kind, _ in net.sent if kind == TYPE_RELAY_BIND and t > moved]


def test_direct_attempts_on_the_relay_end_with_their_window():
    """Hostile condition: the direct path never works. Attempts to leave the relay stop at
    DIRECT_UPGRADE_FOR (bounded cost), and the unanswered attempts are forgotten, so they do not
    win collisions against the peer's later rekey Requests."""
    cfg = TunnelConfig()
    net = LossyNet(LOW, HIGH, 0.0, block_direct=1e9, config=cfg)
    net.run(cfg.direct_upgrade_for + 5.0)
    assert net.a.via == net.b.via == "relay"
    late = [
        t
        for t, _, kind, dst in net.sent
        if kind == TYPE_HANDSHAKE_REQUEST and dst != RELAY and t >= T0 + cfg.direct_upgrade_for  # the end included
    ]
    assert late == []
    per_node = sum(
        1 for _, who, kind, dst in net.sent if who == "a" and kind == TYPE_HANDSHAKE_REQUEST and dst != RELAY
    )
    assert per_node <= cfg.direct_upgrade_for / cfg.handshake_retransmit + 2
    assert not net.a.initiator.pending and not net.b.initiator.pending


def _runs(loss_a: float, loss_b: float, n: int, settle: float = 3.0) -> tuple[list[float], int, int]:
    setups, direct, fallbacks = [], 0, 0
    for seed in range(n):
        a_key, b_key = (LOW, HIGH) if seed % 2 else (HIGH, LOW)
        net = LossyNet(a_key, b_key, loss_a, loss_b, seed, b_later=random.Random(-seed).uniform(0, 3 * LATENCY_S))
        net.run(settle)
        setups.append(net.setup_s() if net.setup_s() is not None else float("inf"))
        direct += net.direct()
        fallbacks += net.fell_back()
    return sorted(setups), direct, fallbacks


def test_five_percent_loss_never_reaches_the_relay():
    """Adversary: 5% random loss on both uplinks, 200 setups (seeded). None falls back to the
    relay, all end direct, and the slowest stays well under the fallback time."""
    setups, direct, fallbacks = _runs(0.05, 0.05, 200)
    print(f"5%: p50 {setups[100] * 1000:.0f} ms p90 {setups[180] * 1000:.0f} ms max {setups[-1] * 1000:.0f} ms")
    assert fallbacks == 0 and direct == 200
    assert setups[-1] < RELAY_FALLBACK_AFTER


def test_twenty_percent_loss_rarely_reaches_the_relay_and_ends_direct():
    """Adversary: 20% random loss on one node's uplink (either way), 200 setups: at most a
    couple fall back to the relay, every one ends direct, p90 setup within two retransmissions."""
    setups, direct, fallbacks = _runs(0.20, 0.0, 200)
    print(f"20% one uplink: p50 {setups[100] * 1000:.0f} ms p90 {setups[180] * 1000:.0f} ms fallbacks {fallbacks}")
    assert fallbacks <= 2 and direct == 200
    assert setups[180] < 2 * HANDSHAKE_RETRANSMIT + 0.1


def test_twenty_percent_loss_on_both_uplinks_still_ends_direct():
    """Adversary: 20% random loss on both uplinks (a datagram between the nodes is lost 36% of
    the time), 200 setups. Some setups reach the relay fallback (six rounds of four lossy
    crossings), but a later direct handshake moves every one of them off it."""
    setups, direct, fallbacks = _runs(0.20, 0.20, 200)
    print(f"20% both uplinks: p50 {setups[100] * 1000:.0f} ms p90 {setups[180] * 1000:.0f} ms fallbacks {fallbacks}")
    assert fallbacks <= 200 * 0.12 and direct == 200
    assert setups[180] < RELAY_FALLBACK_AFTER
