"""What an outsider gets for their effort; prints `metric: value` lines (docs/PROTOCOL.md §5, §6).

  forged_handshake_cpu_us             responder CPU per forged Tunnel Request (well-formed, right
                                      path ID, wrong key: refused at mac1, before any ECDH; target ≤ 15)
  replayed_handshake_cpu_us           ... per copy of a genuine Request replayed by an on-path attacker
  junk_datagram_cpu_us                responder CPU per junk datagram on a known path (for scale)
  chain_calls_per_random_whois        eth_call a real DC makes per whois for a random node ID
  chain_calls_per_fresh_key_direction eth_call a real RS makes per relay direction signed by a
                                      fresh key (refused: not a DC)
  keepalive_log_lines_per_1000_forged log lines a DC writes for 1,000 forged keepalives

  reflection_amplification            bytes a NATed victim sends to addresses its attacking peer only
                                      claimed (7 third-party local_addrs), per byte of the attacker's
                                      Direction Requests (real DC and node; target ≤ 1.0)
  reflection_amplification_shared_ip  ... when the attacker shares the victim's public IP (carrier-
                                      grade or office NAT; target ≤ 1.0, was 167)

  direction_flood_rss_growth_mb       a real DC's RSS growth while one session sends 2,000 Direction
                                      Requests (all in flight) to an online peer
  direction_flood_refused_share       the share of them refused (rate_limited)

  newcomer_registrations_left_after_sybil  new identities a real DC's gas budget still allows after
                                      200 fresh ones from 20 source networks at once (of 200; was 0)
  connect_p99_ms_under_flood          legitimate peers' connect time (retrying a refusal after 1 s)
                                      to a victim 64 admitted identities flood with directions
  cs_bytes_over_quota_concurrent      bytes a real Cache Server stores beyond one sender's 1 MB quota
                                      when it starts 12 uploads of 300 kB at once (target 0; was 2 MB)
  relay_tokens_in_clear               Relay Directions' path tokens (raw or hex) a recording proxy between
                                      the DC side and a real RS reads, of 100 (target 0; was every one
                                      while DC → RS was plain HTTP)
  secrets_in_clear                    keepalive token and relay side key occurrences an on-path
                                      attacker (a proxy in the node's NAT router, labkit/lab/onpath.py)
                                      finds in what it relayed of the node↔DC channel (target 0;
                                      needs root and network namespaces, else not printed)
  injected_directions_acted_on        Tunnel Requests the node sent to the address a Route Direction
                                      injected into its session named (target 0)

usage: python bench/abuse.py [--rounds 5] [--quick]
`--quick`: one round, 10 lookups, 1 attack watched for 1.5 s, a flood of 200, 5 networks' sybil burst, 16
identities flooding 2 legitimate connects: the same code paths (make test). The attacks that need a DC share one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


from dc.federation import FederationClient, FederationError  # noqa: E402
from dc.presence import Presence  # noqa: E402
from node.agent import Node  # noqa: E402
from node.dc_client import DcClient, DcError  # noqa: E402
from ntm import envelope, keepalive, keys, messages  # noqa: E402
from ntm.handshake import Initiator  # noqa: E402
from ntm.tunnel import Session  # noqa: E402
from scripts.anvil import Anvil  # noqa: E402
from scripts.procs import rs_child  # noqa: E402
from labkit.dcnet import CountingRpc, DcNet, RecordingProxy, raw_http, register  # noqa: E402
from labkit.budgets import (
    FLOODERS,
    SYBIL_EACH,
    SYBIL_SOURCES,
    dc_for_outsiders,  # noqa: E402
    legit_connects_under_flood,
    new_node_budget,
    sybil_burst,
)
from labkit.load import STRICT_CS, concurrent_uploads, flood, rss_mb  # noqa: E402

PATH = bytes(8)
N = 2000  # datagrams per timing round
LOOKUPS = 100  # random whois and fresh-key relay directions, each
FLOOD = 2000  # Direction Requests in the flood
LEGIT = 10  # legitimate peers connecting to a victim flooded by FLOODERS identities
WATCH_S = 9.0  # the victim's handshake attempts run their course (tunnel timeout 8 s)


def per_packet_us(session: Session, datagrams: list[bytes]) -> float:
    t0 = time.process_time()
    for d in datagrams:
        session.receive(d, ("203.0.113.1", 1), 1.0)
    return (time.process_time() - t0) / len(datagrams) * 1e6


def handshake_costs(rounds: int) -> tuple[float, float, float]:
    """(forged Request µs, replayed genuine Request µs, junk µs), medians over `rounds`."""
    victim, peer, mallory = keys.generate(), keys.generate(), keys.generate()
    session = Session(victim, keys.node_id_of(peer), keys.public_bytes(peer), PATH, role="wait")
    session.start(0.0)
    # Mallory knows both public keys and the path ID, but not the peer's private key: she builds
    # Requests with her own key in the peer's place; their mac1 (keyed by the peer-victim secret)
    # fails before any ECDH. On path, she may also replay one genuine Request over and over.
    forger = Initiator(mallory, keys.node_id_of(victim), keys.public_bytes(victim), PATH)
    genuine = Initiator(peer, keys.node_id_of(victim), keys.public_bytes(victim), PATH).request(0.0)
    forged, junk = [], []
    for i in range(N):
        forged.append(forger.request(float(i)))
        junk.append(forged[-1][:9] + os.urandom(len(forged[-1]) - 9))
    session.receive(genuine, ("203.0.113.1", 1), 1.0)
    f, r, j = [], [], []
    for _ in range(rounds):
        before = session.stats["drop_handshake_mac"]
        f.append(per_packet_us(session, forged))
        assert session.stats["drop_handshake_mac"] - before == N  # every forged Request refused
        before = session.stats["drop_handshake_replay"]
        r.append(per_packet_us(session, [genuine] * N))
        assert session.stats["drop_handshake_replay"] - before == N
        j.append(per_packet_us(session, junk))
    return statistics.median(f), statistics.median(r), statistics.median(j)


def keepalive_log_lines() -> int:
    lines = []
    handler = logging.Handler()
    handler.emit = lines.append  # type: ignore[method-assign]
    logger = logging.getLogger("ntm.dc.presence")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        p = Presence()
        node = keys.node_id_of(keys.generate())
        p.open(node, lambda m: None)
        for i in range(1000):
            p.on_keepalive(keepalive.encode_request(node, i + 1, b"\x00" * 32), ("203.0.113.1", 1))
    finally:
        logger.removeHandler(handler)
    return len(lines)


async def chain_calls(tmp: Path, lookups: int = LOOKUPS) -> tuple[float, float, int]:
    """eth_call per random whois at a real DC, and per fresh-key relay direction at a real RS; and
    how many of those directions' path tokens a recording proxy between the DC side and the RS
    read (its control channel is TLS pinned by the relay's certificate, §5)."""
    with Anvil() as chain:
        async with CountingRpc(chain.url) as rpc:
            net = DcNet(tmp, types.SimpleNamespace(url=rpc.url))
            await net.deploy(1)
            await asyncio.to_thread(net.start_dc, 0)
            rs = await asyncio.to_thread(rs_child(rpc.url, net.deployment, tmp).start)
            observer = RecordingProxy(("127.0.0.1", int(rs.ready["http"].rsplit(":", 1)[1])))
            relay_url = f"https://127.0.0.1:{await observer.start()}#{rs.ready['pin']}"
            tokens = [os.urandom(32) for _ in range(lookups)]
            try:
                async with DcClient(net.urls[0]) as dc, raw_http() as http:
                    before = rpc.calls["eth_call"]
                    answers = await asyncio.gather(
                        *(dc.whois(keys.node_id_of(keys.generate())) for _ in range(lookups)), return_exceptions=True
                    )
                    assert all(isinstance(a, DcError) for a in answers)
                    whois = (rpc.calls["eth_call"] - before) / lookups
                    before = rpc.calls["eth_call"]
                    ids = [keys.checksum(keys.node_id_of(keys.generate())) for _ in range(2)]
                    for token in tokens:
                        fed = FederationClient(keys.generate(), lambda _a: True, envelope.ReplayGuard(), http=http)
                        body = messages.RelayDirection(
                            os.urandom(8).hex(), token.hex(), ids, time.time_ns() // 1_000_000 + 60_000, 1000
                        )
                        with contextlib.suppress(FederationError):  # refused (untrusted_dc), as expected
                            await fed.book_relay(relay_url, body)
                    directions = (rpc.calls["eth_call"] - before) / lookups
                    assert rs.log_tail(200).count("untrusted_dc") >= lookups, "the directions did not reach the relay"
                    in_clear = sum(t in observer.seen or t.hex().encode() in observer.seen for t in tokens)
            finally:
                await asyncio.to_thread(rs.stop)
                await asyncio.to_thread(net.stop)
    return whois, directions, in_clear


LIES = 7  # third-party addresses the attacker announces as its own
ATTACKS = 5  # Direction Requests the attacker sends towards its victim


async def reflection(url: str, attacks: int = ATTACKS, watch_s: float = WATCH_S) -> tuple[float, float]:
    """A registered attacker announces LIES third-party addresses and asks for `attacks` directions
    to a NATed victim (which therefore initiates). Third parties are UDP sockets counting what
    reaches them; the attacker's cost is its Direction Requests as sent on the WebSocket. Two
    attackers, one after the other: one with its own public IP, one sharing the victim's (a
    carrier-grade or office NAT). Returns (own IP, shared IP) bytes out per byte in."""
    loop = asyncio.get_running_loop()
    received = [0]

    class Count(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr) -> None:
            received[0] += len(data)

    # Distinct loopback IPs: victim 127.0.0.1, first attacker 127.0.0.9 (the second shares
    # 127.0.0.1 with the victim), third parties 127.0.0.2-8.
    thirds = [(await loop.create_datagram_endpoint(Count, local_addr=(f"127.0.0.{2 + i}", 0)))[0] for i in range(LIES)]
    lies = [f"127.0.0.{2 + i}:{t.get_extra_info('sockname')[1]}" for i, t in enumerate(thirds)]
    logging.getLogger("ntm.node").setLevel(logging.ERROR)  # the victim's failed handshakes are expected
    victim_key = keys.generate()
    await register(url, victim_key, ("10.9.9.9:4330",))
    victim = await Node.start(victim_key, url, host="127.0.0.1", port=0, local_addrs=["10.9.9.9:4330"])
    try:
        ratios = []
        for ip in ("127.0.0.9", "127.0.0.1"):
            received[0] = 0
            sent = await attack(url, victim.id, ip, lies, attacks)
            await asyncio.sleep(watch_s)  # the victim's handshake attempts run their course
            ratios.append(received[0] / sent)
    finally:
        await victim.close()
        for t in thirds:
            t.close()
    return ratios[0], ratios[1]


async def attack(url: str, victim: bytes, ip: str, lies: list[str], attacks: int) -> int:
    """A fresh attacker on `ip` announcing `lies` asks for `attacks` directions to `victim`; the
    bytes of its Direction Requests."""
    loop = asyncio.get_running_loop()
    attacker = keys.generate()
    own, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol, local_addr=(ip, 0))
    own_addr = f"{ip}:{own.get_extra_info('sockname')[1]}"
    await register(url, attacker, (own_addr,))
    try:
        async with DcClient(url) as dc:
            ws, welcome = await dc.open_session(attacker, [own_addr, *lies])
            for seq in (1, 2):  # keepalives from its own socket: the DC observes it as public
                for port in welcome.keepalive_ports:
                    own.sendto(
                        keepalive.encode_request(keys.node_id_of(attacker), seq, bytes.fromhex(welcome.token)),
                        ("127.0.0.1", port),
                    )
            await asyncio.sleep(0.3)
            sent = 0
            for i in range(attacks):
                req = messages.encode(messages.DirectionRequest(i + 1, keys.checksum(victim), inline=True))
                sent += len(json.dumps(req).encode()) + 6  # + the WebSocket frame header
                await ws.send_json(req)
                # one reply (§8.1): the victim was directed before it; its own direction in it
                messages.decode(messages.DirectionResult, await ws.receive_str(timeout=10))
            return sent
    finally:
        own.close()


async def direction_flood(url: str, pid: int, n: int = FLOOD) -> tuple[float, float]:
    """A registered node floods its DC (process `pid`) with Direction Requests towards an online peer."""
    attacker, peer_key = keys.generate(), keys.generate()
    await register(url, attacker)
    await register(url, peer_key)
    logging.getLogger("ntm.node").setLevel(logging.ERROR)
    peer = await Node.start(peer_key, url, host="127.0.0.1", port=0)
    try:
        await flood(url, attacker, peer.id, 50)
        await asyncio.sleep(1.0)
        before = rss_mb(pid)
        codes = await flood(url, attacker, peer.id, n)
        grown = rss_mb(pid) - before
    finally:
        await peer.close()
    return grown, codes.get("rate_limited", 0) / n


async def budgets(url: str, legit: int, flooders: int, sybil: tuple[int, int]) -> tuple[float, float]:
    """A sybil burst (`sybil`: fresh identities from that many networks, that many each) at a real
    DC, then `flooders` identities flooding a victim with directions while `legit` peers connect:
    (new-node registrations left, legitimate connect p99 in ms)."""
    await sybil_burst(url, *sybil)
    left = await new_node_budget(url)
    times, _, _ = await legit_connects_under_flood(url, legit, flooders)
    return left, statistics.quantiles(times, n=100, method="inclusive")[98] * 1000


async def at_one_dc(tmp: Path, sizes: types.SimpleNamespace) -> dict[str, float]:
    """The attacks that need a real DC, one after another at one DC (its start-up is paid once)."""
    async with dc_for_outsiders(tmp, STRICT_CS) as net:
        url = net.urls[0]
        stored, _ = await concurrent_uploads(net)
        own_ip, shared_ip = await reflection(url, sizes.attacks, sizes.watch_s)
        grown, refused = await direction_flood(url, net.dcs[0].proc.pid, sizes.flood)
        left, p99 = await budgets(url, sizes.legit, sizes.flooders, sizes.sybil)
    return {
        "reflection_amplification": own_ip,
        "reflection_amplification_shared_ip": shared_ip,
        "direction_flood_rss_growth_mb": grown,
        "direction_flood_refused_share": refused,
        "newcomer_registrations_left_after_sybil": left,
        "connect_p99_ms_under_flood": p99,
        "cs_bytes_over_quota_concurrent": max(0, stored - (1 << 20)),
    }


def on_path(tmp: Path, quick: bool) -> dict | None:
    """labkit/lab/onpath.py's scenario (an attacker in the node's NAT router); None without the lab."""
    from labkit.lab.fed import Federation
    from labkit.lab.onpath import on_path as scenario
    from labkit.lab.topology import Lab, lab_ready

    if not lab_ready("on-path lab scenario"):
        return None
    with Lab() as lab, Federation(lab, tmp, n_dcs=2, plain=(1,)) as fed:
        return scenario(fed, quick)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="tiny sizes, same code paths (CI)")
    args = p.parse_args()
    rounds, lookups = (1, 10) if args.quick else (args.rounds, LOOKUPS)
    sizes = types.SimpleNamespace(
        attacks=ATTACKS, watch_s=WATCH_S, flood=FLOOD, legit=LEGIT, flooders=FLOODERS, sybil=(SYBIL_SOURCES, SYBIL_EACH)
    )
    if args.quick:
        sizes = types.SimpleNamespace(attacks=1, watch_s=1.5, flood=200, legit=2, flooders=16, sybil=(5, 6))
    forged, replayed, junk = handshake_costs(rounds)
    print(f"forged_handshake_cpu_us: {forged:.1f}")
    print(f"replayed_handshake_cpu_us: {replayed:.1f}")
    print(f"junk_datagram_cpu_us: {junk:.1f}")
    with tempfile.TemporaryDirectory() as tmp:
        whois, directions, relay_tokens = asyncio.run(chain_calls(Path(tmp), lookups))
    print(f"chain_calls_per_random_whois: {whois:g}")
    print(f"chain_calls_per_fresh_key_direction: {directions:g}")
    print(f"relay_tokens_in_clear: {relay_tokens}")
    print(f"keepalive_log_lines_per_1000_forged: {keepalive_log_lines()}")
    with tempfile.TemporaryDirectory() as tmp:
        found = asyncio.run(at_one_dc(Path(tmp), sizes))
    for name, value in found.items():
        print(f"{name}: {value:.3f}" if "amplification" in name or "share" in name else f"{name}: {value:.1f}")
    with tempfile.TemporaryDirectory() as tmp:
        seen = on_path(Path(tmp), args.quick)
    if seen is not None:
        print(f"secrets_in_clear: {seen['secrets_in_clear']}")
        print(f"injected_directions_acted_on: {seen['injected_directions_acted_on']}")


if __name__ == "__main__":
    main()
