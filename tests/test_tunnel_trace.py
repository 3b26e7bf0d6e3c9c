"""A golden trace of the tunnel Session: one deterministic scenario through every path of
ntm/tunnel.py (handshake, data, ping, every drop reason, roaming, rekey by time and by count,
grace periods, key expiry, keepalives, relay fallback and binds, punch collisions, close), with
everything observable recorded at each step: datagrams sent (digest, type, size, destination),
events, stats, phase, named deadlines, peer address, RTT, key counters and replay windows.

Randomness and both clocks are injected, so the trace is byte-for-byte reproducible and any
change of behaviour shows up as a diff against tests/data/tunnel_trace.json. The behaviour itself
is asserted by test_tunnel.py and test_mutation_kills.py; this test makes sure nothing else moves
(it is what lets mutation testing see the counters and timers). After an intended change,
regenerate with NTM_UPDATE_TRACE=1 and review the diff like code.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

import pytest

from ntm import keys
from ntm.packet import (
    TYPE_HANDSHAKE_REQUEST,
    TYPE_PING,
    TYPE_PONG,
    TYPE_RELAY_BIND,
    RelayBind,
    RelayBindAck,
    TransportPacket,
)
from ntm.tunnel import RelayInfo, Session, TunnelConfig, TunnelError

GOLDEN = Path(__file__).parent / "data" / "tunnel_trace.json"
KA, KB = keys.private_key(b"\x0a" * 32), keys.private_key(b"\x0b" * 32)
PA, PB = keys.public_bytes(KA), keys.public_bytes(KB)
IDA, IDB = keys.node_id(PA), keys.node_id(PB)
PATH, OTHER_PATH = bytes(range(8)), bytes(range(8, 16))
A, A2, B, RELAY, EVIL = (
    ("198.18.1.1", 1),
    ("198.18.1.9", 9),
    ("198.18.2.2", 2),
    ("198.18.0.100", 4340),
    ("203.0.113.6", 6),
)
TOKEN = b"\x0c" * 32
T0 = 1000.0
CFG = TunnelConfig(
    replay_window=64,
    rekey_after_time=30.0,
    rekey_responder_extra=5.0,
    reject_after_time=45.0,
    rekey_after_messages=150,
    reject_after_messages=180,
    previous_key_grace=3.0,
    keepalive_interval=10.0,
    handshake_retransmit=0.25,
    rekey_retransmit=1.0,
    relay_fallback_after=1.5,
)


class Clock:
    def __init__(self) -> None:
        self.wall = 1_800_000_000.0

    def __call__(self) -> float:
        return self.wall


def rand_from(seed: int):
    r = random.Random(seed)
    return lambda n: r.randbytes(n)


def keypair(kp) -> dict | None:
    if kp is None:
        return None
    return {
        "counter": kp.counter,
        "created": kp.created,
        "initiator": kp.initiator,
        "expires": kp.expires,
        "send_ok": kp.send_ok,
        "reject": kp.reject_time,
        "rekey": kp.rekey_time,
        "soft": kp.soft_limit,
        "top": kp.window.top,
        "bits": hex(kp.window.bits),
        "size": kp.window.size,
    }


def state(s: Session) -> dict:
    return {
        "phase": s.phase.value,
        "established": s.established,
        "via": s.via,
        "rtt": s.rtt,
        "peer": s.peer_addr,
        "relay_active": s.relay_active,
        "deadlines": s.deadlines(),
        "next_timer": s.next_timer(),
        "last_sent": s.last_sent,
        "last_received": s.last_received,
        "stats": s.stats,
        "wins": s.wins_collisions,
        "candidates": s.candidates,
        "keys": {"current": keypair(s.current), "previous": keypair(s.previous), "next": keypair(s.next)},
    }


def sent(out) -> list:
    return [[hashlib.sha256(d).hexdigest()[:16], d[0], len(d), dst] for d, dst in out]


class Trace:
    def __init__(self) -> None:
        self.steps: list = []

    def step(self, name: str, *sessions: Session, **extra) -> None:
        self.steps.append(
            json.loads(json.dumps({"step": name, **extra, "sessions": [state(s) for s in sessions]}, default=repr))
        )


def pair(
    trace: Trace, clock: Clock, role_a="initiate", role_b="wait", relay=False, cands_a=(B,), cands_b=(), seed=1, cfg=CFG
):
    ra = RelayInfo(RELAY, TOKEN, 0) if relay else None
    rb = RelayInfo(RELAY, TOKEN, 1) if relay else None
    a = Session(
        KA, IDB, PB, PATH, role=role_a, candidates=list(cands_a), relay=ra, config=cfg, rand=rand_from(seed), wall=clock
    )
    b = Session(
        KB,
        IDA,
        PA,
        PATH,
        role=role_b,
        candidates=list(cands_b),
        relay=rb,
        config=cfg,
        rand=rand_from(seed + 1),
        wall=clock,
    )
    trace.step("new", a, b)
    return a, b


def deliver(trace: Trace, name: str, to: Session, out, src, now: float, *others: Session) -> list:
    """Hand every datagram in `out` to `to` as coming from `src`; record and return the events."""
    events = []
    for d, _ in out:
        events += to.receive(d, src, now)
    trace.step(name, to, *others, events=events, out=sent(to.datagrams_to_send() if False else []))
    return events


def run_scenario() -> list:
    clock, t = Clock(), Trace()
    a, b = pair(t, clock)
    a.start(T0)
    b.start(T0)
    t.step("start", a, b)
    reqs = a.poll(T0)
    t.step("a poll: requests", a, b, out=sent(reqs))
    t.step("b sees request", b, events=b.receive(reqs[0][0], A, T0 + 0.01))
    resp = b.poll(T0 + 0.01)
    t.step("b poll: response", b, out=sent(resp))
    try:
        b.encrypt(b"x", T0 + 0.01)
    except TunnelError as exc:
        t.step("b cannot send yet", b, error=str(exc))
    t.step("b close before keys", b, close=b.close_packet(T0 + 0.01))
    t.step("a gets response", a, events=a.receive(resp[0][0], B, T0 + 0.02))
    confirm = a.poll(T0 + 0.02)
    t.step("a poll: confirm", a, out=sent(confirm))
    t.step("b confirmed", b, events=b.receive(confirm[0][0], A, T0 + 0.03))
    answer = b.poll(T0 + 0.03)
    t.step("a gets the confirmation's pong", a, events=a.receive(answer[0][0], B, T0 + 0.04), out=sent(answer))
    # data, ping, pong
    for i in range(3):
        t.step(f"a->b data {i}", a, b, events=b.receive(a.encrypt(b"hello %d" % i, T0 + 0.1 + i), A, T0 + 0.1 + i))
    t.step("b->a data", a, b, events=a.receive(b.encrypt(b"back", T0 + 3), B, T0 + 3))
    ping = a.ping(T0 + 3.1)
    t.step("b gets ping", b, events=b.receive(ping, A, T0 + 3.2))
    pong = b.poll(T0 + 3.2)
    t.step("a gets pong", a, events=a.receive(pong[0][0], B, T0 + 3.3), out=sent(pong))
    t.step("a gets unknown pong", a, events=a.receive(b._seal(TYPE_PONG, b"\x00" * 8, T0 + 3.3), B, T0 + 3.3))
    t.step("b gets short ping", b, events=b.receive(a._seal(TYPE_PING, b"\x01", T0 + 3.3), A, T0 + 3.3))
    for i in range(20):
        a.ping(T0 + 3.4)
    t.step("a: pings outstanding are bounded", a, pings=len(a._pings))
    # every drop
    good = a.encrypt(b"good", T0 + 4)
    t.step("good", b, events=b.receive(good, A, T0 + 4))
    flip = bytearray(a.encrypt(b"flip", T0 + 4))
    flip[-1] ^= 1
    bad = {
        "truncated": good[:5],
        "short transport": good[:20],
        "oversize": good[:17] + b"\x00" * 65500,
        "unknown type": b"\x7f" + PATH + b"\x00" * 30,
        "other path transport": good[:1] + OTHER_PATH + good[9:],
        "other path handshake": bytes([TYPE_HANDSHAKE_REQUEST]) + OTHER_PATH + b"\x00" * 100,
        "counter too high": TransportPacket(1, PATH, CFG.reject_after_messages, b"\x00" * 32).encode(),
        "bad tag": bytes(flip),
        "replay": good,
        "malformed handshake": bytes([TYPE_HANDSHAKE_REQUEST]) + PATH + b"\x00" * 10,
        "unexpected response": resp[0][0],
        "bind ack from a stranger": RelayBindAck(PATH, 0, True, 1, bytes(16)).encode(),
        "short bind ack": RelayBindAck(PATH, 0, True, 1, bytes(16)).encode()[:-1] + b"",
    }
    for name, data in bad.items():
        t.step("drop " + name, b, a, events=b.receive(data, A, T0 + 4.1), out=sent(b.datagrams_to_send()))
    t.step("a: unexpected response", a, events=a.receive(resp[0][0], B, T0 + 4.1))
    # a window of 64: 70 packets later, counter 5 is too old
    early = [a.encrypt(b"e", T0 + 5) for _ in range(2)]
    for i in range(70):
        b.receive(a.encrypt(b"fill", T0 + 5), A, T0 + 5)
    t.step("too old", b, events=b.receive(early[0], A, T0 + 5))
    # roaming: a newer authenticated packet from A2 moves B's view; an older one from EVIL does not
    older = a.encrypt(b"older", T0 + 6)
    t.step("roam", b, events=b.receive(a.encrypt(b"from A2", T0 + 6), A2, T0 + 6))
    t.step("no roam on older", b, events=b.receive(older, EVIL, T0 + 6))
    t.step("roam back", b, events=b.receive(a.encrypt(b"from A", T0 + 6), A, T0 + 6))
    # keepalive when idle
    for now in (T0 + 9.0, T0 + 16.5, T0 + 17.0):
        t.step(f"poll {now - T0}", a, b, out_a=sent(a.poll(now)), out_b=sent(b.poll(now)))
    # rekey by time (A initiated the keys: its rekey is due first), with old packets in flight
    inflight = [a.encrypt(b"old%d" % i, T0 + 29) for i in range(3)]
    clock.wall += 100
    rk = a.poll(T0 + 30.5)
    t.step("a rekey request", a, b, out=sent(rk))
    t.step("b answers rekey", b, events=b.receive(rk[0][0], A, T0 + 30.6))
    t.step("b still sends on current", a, events=a.receive(b.encrypt(b"cur", T0 + 30.6), B, T0 + 30.6))
    rr = b.poll(T0 + 30.6)
    t.step("a gets rekey response", a, events=a.receive(rr[0][0], B, T0 + 30.7), out=sent(rr))
    conf = a.poll(T0 + 30.7)
    t.step("b sees new keys", b, events=b.receive(conf[0][0], A, T0 + 30.8), out=sent(conf))
    t.step("in flight within grace", b, events=b.receive(inflight[0], A, T0 + 31.5))
    t.step("in flight replayed", b, events=b.receive(inflight[0], A, T0 + 31.5))
    t.step("in flight after grace", b, events=b.receive(inflight[1], A, T0 + 33.9))
    t.step("b poll drops previous", b, out=sent(b.poll(T0 + 34.0)))
    t.step("in flight after drop", b, events=b.receive(inflight[2], A, T0 + 34.1))
    # rekey by count: the 150th packet on one key starts a rekey from the send path; 180 is the end
    for i in range(200):
        try:
            b.receive(a.encrypt(b"n", T0 + 34), A, T0 + 34)
        except TunnelError as exc:
            t.step("exhausted", a, error=str(exc), i=i)
            break
    t.step("after count", a, b, out=sent(a.datagrams_to_send()))
    try:
        a.encrypt(b"\x00" * 2000, T0 + 34)
    except TunnelError as exc:
        t.step("too big", a, error=str(exc))
    # keys expire without a successful rekey; a (initiator) starts over, b (wait) only waits
    for now in (T0 + 64.0, T0 + 75.1, T0 + 76.0, T0 + 80.0):
        t.step(f"late poll {now - T0}", a, b, out_a=sent(a.poll(now)), out_b=sent(b.poll(now)))
    try:
        a.encrypt(b"x", T0 + 80)
    except TunnelError as exc:
        t.step("no keys after expiry", a, error=str(exc))
    t.step("close without keys", a, close=a.close_packet(T0 + 80))

    # relay: the direct candidate never answers; at 1.5 s both bind and A also tries via the relay
    c, d = pair(t, clock, relay=True, cands_b=(A,), seed=7)
    c.start(T0)
    d.start(T0)
    t.step("relay start", c, d, out_c=sent(c.poll(T0)), out_d=sent(d.poll(T0)))
    t.step("relay 1.0", c, d, out_c=sent(c.poll(T0 + 1.0)), out_d=sent(d.poll(T0 + 1.0)))
    oc, od = c.poll(T0 + 1.5), d.poll(T0 + 1.5)
    t.step("relay fallback", c, d, out_c=sent(oc), out_d=sent(od))
    bind_c = RelayBind.parse([x for x, dst in oc if dst == RELAY and x[0] == TYPE_RELAY_BIND][0])
    ack = RelayBindAck(PATH, 0, True, bind_c.counter, bytes(16)).encode()
    t.step("ack from stranger", c, events=c.receive(ack, EVIL, T0 + 1.5))
    t.step("ack from relay", c, events=c.receive(ack, RELAY, T0 + 1.5))
    req = [x for x, dst in oc if dst == RELAY and x[0] == TYPE_HANDSHAKE_REQUEST]
    t.step("d via relay", d, events=d.receive(req[0], RELAY, T0 + 1.6))
    r2 = d.poll(T0 + 1.6)
    t.step("c via relay", c, events=c.receive([x for x, _ in r2 if x[0] != 0x10][0], RELAY, T0 + 1.7), out=sent(r2))
    t.step("c confirm", c, d, events=d.receive(c.poll(T0 + 1.7)[-1][0], RELAY, T0 + 1.8))
    for now in (T0 + 2.0, T0 + 12.0, T0 + 12.5):
        t.step(f"relay poll {now - T0}", c, d, out_c=sent(c.poll(now)), out_d=sent(d.poll(now)))
    c.local_address_changed(T0 + 13)
    t.step("c moved", c, out=sent(c.datagrams_to_send()))
    # the direct path starts working: the peer address leaves the relay and bind refreshes stop
    t.step("direct again", c, events=c.receive(d.encrypt(b"direct", T0 + 14), B, T0 + 14))
    t.step("relay after direct", c, out=sent(c.poll(T0 + 25)))
    t.step("close", c, d, events=d.receive(c.close_packet(T0 + 26), RELAY, T0 + 26))

    # punch: both initiate; the lower node ID's Request wins, the other is dropped as a collision
    e, f = pair(t, clock, role_a="punch", role_b="punch", cands_b=(A,), seed=11)
    e.start(T0)
    f.start(T0)
    oe, of = e.poll(T0), f.poll(T0)
    t.step("punch requests", e, f, out_e=sent(oe), out_f=sent(of))
    t.step("e gets f's request", e, events=e.receive(of[0][0], B, T0 + 0.01), out=sent(e.datagrams_to_send()))
    t.step("f gets e's request", f, events=f.receive(oe[0][0], A, T0 + 0.01), out=sent(f.datagrams_to_send()))
    # a fresh session with no keys drops transport packets
    g, h = pair(t, clock, seed=13)
    t.step("no keys", h, events=h.receive(good, A, T0))
    # a responder refuses Requests arriving faster than the limit
    g.start(T0)
    h.start(T0)
    r1, r2_ = g.poll(T0)[0][0], g.poll(T0 + 0.25)[0][0]
    t.step("first request", h, events=h.receive(r1, A, T0 + 0.30))
    t.step("second too fast", h, events=h.receive(r2_, A, T0 + 0.305))
    t.step("tampered request", h, events=h.receive(r2_[:-1] + bytes([r2_[-1] ^ 1]), A, T0 + 1))
    t.step("replayed request", h, events=h.receive(r1, A, T0 + 2))
    return t.steps


def test_tunnel_trace_matches_the_golden_file():
    steps = run_scenario()
    assert run_scenario() == steps  # deterministic
    if os.environ.get("NTM_UPDATE_TRACE"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(steps, indent=1, sort_keys=True) + "\n")
    golden = json.loads(GOLDEN.read_text())
    assert len(steps) == len(golden)
    for got, want in zip(steps, golden):
        assert got == want, f"step {want['step']!r} differs"


def test_the_trace_sees_what_it_should():
    """A few facts checked by hand, so the golden file is known to record a working session."""
    steps = {s["step"]: s for s in run_scenario()}
    assert steps["b confirmed"]["sessions"][0]["established"]
    assert "Data(payload=b'hello 0')" in steps["a->b data 0"]["events"][0]
    assert steps["drop replay"]["sessions"][0]["stats"]["drop_replay"] == 1
    assert steps["drop oversize"]["sessions"][0]["stats"]["drop_malformed"] == 1
    assert "EndpointChanged" in steps["roam"]["events"][0]
    assert steps["no roam on older"]["events"] == ["Data(payload=b'older')"]  # read, but it moves nothing
    assert steps["no roam on older"]["sessions"][0]["peer"] == list(A2)
    assert steps["in flight within grace"]["events"] and not steps["in flight after grace"]["events"]
    assert steps["relay fallback"]["sessions"][0]["relay_active"]
    assert "PeerClosed()" in steps["close"]["events"][0]
    assert steps["second too fast"]["sessions"][0]["stats"]["drop_handshake_rate"] == 1
    with pytest.raises(KeyError):
        steps["no such step"]
