"""Relay Server integration: a real `python -m rs` process, real anvil with the registry deployed
and a DC admitted; signed Relay Directions over HTTP; IPv4 and IPv6 UDP sockets on loopback
bridged through the relay's one dual-stack socket; a real tunnel handshake through the relay and
a check that the relay only ever forwarded ciphertext."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ntm import envelope, handshake, keys, messages, packet
from chain.registry import Registry
from dc.federation import FederationClient, FederationError as RelayDirectionError
from scripts.anvil import DEV_KEYS, Anvil
from scripts.procs import Child, free_port, has_ipv6_loopback, rs_child
from labkit.dcnet import CountingRpc, metric, raw_http

PLAINTEXT = b"attack at dawn: the relay must never see this sentence"


async def send_relay_direction(
    http, url: str, dc_key, path: bytes, token: bytes, nodes, expires_ms: int, max_bytes: int
) -> dict:
    """The DC's booking call (dc/federation.py) against the relay under test."""
    fed = FederationClient(dc_key, lambda _a: True, envelope.ReplayGuard(), http=http)
    body = messages.RelayDirection(path.hex(), token.hex(), [keys.checksum(n) for n in nodes], expires_ms, max_bytes)
    try:
        return messages.encode(await fed.book_relay(url, body))
    finally:
        await fed.close()  # its channel to the relay holds one of `http`'s connections


@pytest.fixture
async def net(tmp_path):
    with Anvil() as chain:
        owner = await Registry.deploy(chain.url, DEV_KEYS[0])
        dc_key = keys.private_key(DEV_KEYS[1])
        removed_key = keys.private_key(DEV_KEYS[2])
        await owner.admit_dc(keys.node_id_of(dc_key), "dc1", "http://127.0.0.1:1")
        await owner.admit_dc(keys.node_id_of(removed_key), "dc2", "http://127.0.0.1:2")
        await owner.remove_dc(keys.node_id_of(removed_key))
        deployment = tmp_path / "deployment.json"
        deployment.write_text(
            json.dumps({"chain_id": owner.chain_id, "registry": keys.checksum(owner.address), "block": 0})
        )
        await owner.close()
        capture = tmp_path / "capture.hex"
        udp_port = free_port(socket.SOCK_DGRAM)
        rs = rs_child(
            chain.url,
            deployment,
            tmp_path,
            *["--udp-host", "::", "--capture", str(capture)],
            *["--advertise", f"127.0.0.1:{udp_port}", "--advertise", f"[::1]:{udp_port}"],
            udp_port=udp_port,
        ).start()
        try:
            async with raw_http() as http:
                yield type(
                    "Net",
                    (),
                    dict(
                        rs=rs,
                        url=rs.ready["http"],
                        control=rs.ready["control"],
                        udp_port=udp_port,
                        http=http,
                        dc_key=dc_key,
                        removed_key=removed_key,
                        capture=capture,
                        tmp=tmp_path,
                    ),
                )
        finally:
            rs.stop()
            assert rs.proc.returncode == 0, rs.log_tail()


def node_ids():
    return [keys.node_id_of(keys.generate()), keys.node_id_of(keys.generate())]


def udp(family: int, host: str) -> socket.socket:
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.bind((host, 0))
    s.settimeout(2.0)
    return s


def recv_or_none(s: socket.socket, timeout: float = 0.3) -> bytes | None:
    s.settimeout(timeout)
    try:
        return s.recv(70000)
    except (socket.timeout, TimeoutError):
        return None
    finally:
        s.settimeout(2.0)


async def post(net, env) -> tuple[int, dict]:
    async with net.http.post(net.url + "/v1/relay-directions", json=env) as r:
        return r.status, await r.json()


def future_ms(s: float = 600) -> int:
    return time.time_ns() // 1_000_000 + int(s * 1000)


async def test_directions_trust_replay_conflict(net):
    path, token = os.urandom(8), os.urandom(32)
    nodes = node_ids()
    ans = await send_relay_direction(net.http, net.control, net.dc_key, path, token, nodes, future_ms(), 10**6)
    assert ans["path"] == path.hex() and ans["created"] is True
    assert ans["relay"] == [f"127.0.0.1:{net.udp_port}", f"[::1]:{net.udp_port}"]
    assert ans["max_bytes"] == 10**6

    # same path, same token, same DC: idempotent
    again = await send_relay_direction(net.http, net.control, net.dc_key, path, token, nodes, future_ms(), 10**6)
    assert again["created"] is False and again["path"] == path.hex()

    # another token for an existing path: conflict
    with pytest.raises(RelayDirectionError) as e:
        await send_relay_direction(net.http, net.control, net.dc_key, path, os.urandom(32), nodes, future_ms(), 10**6)
    assert e.value.status == 409 and e.value.code == "conflict"

    # a key that was never admitted, and a DC removed on chain: 403 with a clear error
    for key in (keys.generate(), net.removed_key):
        with pytest.raises(RelayDirectionError) as e:
            await send_relay_direction(net.http, net.control, key, os.urandom(8), token, nodes, future_ms(), 10**6)
        assert e.value.status == 403 and e.value.code == "untrusted_dc"
        assert keys.checksum(keys.node_id_of(key)) in str(e.value)

    # the exact same envelope twice: the second is a replay
    body = {
        "path": os.urandom(8).hex(),
        "token": token.hex(),
        "nodes": [keys.checksum(n) for n in nodes],
        "expires_ms": future_ms(),
        "max_bytes": 1000,
    }
    env = envelope.seal(net.dc_key, "relay-direction", body, time.time_ns() // 1_000_000)
    assert (await post(net, env))[0] == 200
    status, err = await post(net, env)
    assert status == 403 and err["error"] == "replayed" and err["message"]

    # stale, tampered, wrong kind, malformed body
    stale = envelope.seal(net.dc_key, "relay-direction", body, time.time_ns() // 1_000_000 - 120_000)
    assert (await post(net, stale))[0] == 403
    tampered = dict(envelope.seal(net.dc_key, "relay-direction", body, time.time_ns() // 1_000_000))
    tampered["body"] = {**body, "max_bytes": 10**9}
    assert (await post(net, tampered))[0] == 403
    assert (await post(net, envelope.seal(net.dc_key, "route-direction", body, time.time_ns() // 1_000_000)))[0] == 400
    bad = envelope.seal(net.dc_key, "relay-direction", {**body, "token": "00"}, time.time_ns() // 1_000_000)
    status, err = await post(net, bad)
    assert status == 400 and err["error"] == "malformed"
    async with net.http.post(net.url + "/v1/relay-directions", data=b"not json") as r:
        assert r.status == 400

    # bookings made in one turn leave as one batch on the channel (§8.2 "Batches"), each answered
    # on its own: the one for a path live with another token is refused, the others booked
    fed = FederationClient(net.dc_key, lambda _a: True, envelope.ReplayGuard(), http=net.http)
    try:
        wanted = [(os.urandom(8), token) for _ in range(3)] + [(path, os.urandom(32))]
        answers = await asyncio.gather(
            *(
                fed.book_relay(
                    net.control,
                    messages.RelayDirection(p.hex(), t.hex(), [keys.checksum(n) for n in nodes], future_ms(), 1000),
                )
                for p, t in wanted
            ),
            return_exceptions=True,
        )
    finally:
        await fed.close()
    assert [a.path for a in answers[:3]] == [p.hex() for p, _ in wanted[:3]] and all(a.created for a in answers[:3])
    assert isinstance(answers[3], RelayDirectionError) and (answers[3].status, answers[3].code) == (409, "conflict")

    async with net.http.get(net.url + "/metrics") as r:
        text = await r.text()
    assert metric(text, "ntm_rs_paths") == 5
    assert metric(text, "ntm_rs_directions_refused_total", reason="untrusted_dc") == 2
    assert metric(text, "ntm_rs_directions_refused_total", reason="replayed") == 1
    async with net.http.get(net.url + "/v1/info") as r:
        info = await r.json()
    assert info["paths"] == 5 and info["udp_port"] == net.udp_port
    async with net.http.get(net.url + "/healthz") as r:
        assert r.status == 200


def bind_via(sock, relay, path: bytes, token: bytes, side: int) -> packet.RelayBindAck:
    """A node's two-step bind (PROTOCOL §8.2): a bind that earns this address's cookie, then one
    that carries it. Returns the relay's final ack."""
    key = packet.relay_side_key(token, side)
    sock.sendto(packet.RelayBind.make(path, side, time.time_ns() // 1000, packet.NO_COOKIE, key).encode(), relay)
    first = packet.RelayBindAck.parse(sock.recv(100))
    assert not first.bound  # not before the address has proven it receives
    sock.sendto(packet.RelayBind.make(path, side, time.time_ns() // 1000, first.cookie, key).encode(), relay)
    return packet.RelayBindAck.parse(sock.recv(100))


@pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback")
async def test_ipv4_ipv6_bridge_with_real_handshake(net):
    key_a, key_b = keys.generate(), keys.generate()
    id_a, id_b = keys.node_id_of(key_a), keys.node_id_of(key_b)
    path, token = os.urandom(8), os.urandom(32)
    ans = await send_relay_direction(net.http, net.control, net.dc_key, path, token, [id_a, id_b], future_ms(), 10**6)
    assert ans["created"] and ans["path"] == path.hex()
    relay_v4 = ("127.0.0.1", net.udp_port)
    relay_v6 = ("::1", net.udp_port)
    a = udp(socket.AF_INET, "127.0.0.1")  # an IPv4-only node
    b = udp(socket.AF_INET6, "::1")  # an IPv6-only node
    evil = udp(socket.AF_INET, "127.0.0.1")
    try:
        # wrong side key: no ack, nothing bound
        wrong = packet.relay_side_key(os.urandom(32), 1)
        evil.sendto(packet.RelayBind.make(path, 1, 1, packet.NO_COOKIE, wrong).encode(), relay_v4)
        assert recv_or_none(evil) is None

        ack = bind_via(a, relay_v4, path, token, 0)
        assert (ack.path_id, ack.side, ack.bound) == (path, 0, True)
        ack = bind_via(b, relay_v6, path, token, 1)
        assert (ack.path_id, ack.side, ack.bound) == (path, 1, True)

        # the tunnel handshake, through the relay (A initiates)
        ini = handshake.Initiator(key_a, id_b, keys.public_bytes(key_b), path)
        resp = handshake.Responder(key_b, id_a, keys.public_bytes(key_a), path)
        a.sendto(ini.request(time.time()), relay_v4)
        req = b.recv(200)
        response, kb = resp.respond(req, time.time())
        b.sendto(response, relay_v6)
        ka = ini.response(a.recv(200))
        assert ka.send == kb.recv and ka.recv == kb.send

        def seal(k, counter, payload):
            header = packet.HEADER.pack(packet.TYPE_DATA, path, counter)
            return header + AESGCM(k).encrypt(b"\0" * 4 + struct.pack("!Q", counter), payload, header)

        def open_(k, dgram):
            p = packet.TransportPacket.parse(dgram)
            return AESGCM(k).decrypt(b"\0" * 4 + struct.pack("!Q", p.counter), p.ciphertext, p.header)

        for i in range(5):  # IPv4 → IPv6 and back
            a.sendto(seal(ka.send, i, PLAINTEXT + b" a%d" % i), relay_v4)
            assert open_(kb.recv, b.recv(2000)) == PLAINTEXT + b" a%d" % i
            b.sendto(seal(kb.send, i, PLAINTEXT + b" b%d" % i), relay_v6)
            assert open_(ka.recv, a.recv(2000)) == PLAINTEXT + b" b%d" % i

        # the intruder (wrong token, unbound address) gets nothing forwarded, and injects nothing
        evil.sendto(seal(os.urandom(32), 99, b"injected"), relay_v4)
        assert recv_or_none(b) is None and recv_or_none(a) is None
        b.sendto(seal(kb.send, 10, b"after intrusion"), relay_v6)
        assert recv_or_none(evil) is None
        assert open_(ka.recv, a.recv(2000)) == b"after intrusion"

        # roaming: A rebinds from a new socket (new port); traffic follows the new address
        a2 = udp(socket.AF_INET, "127.0.0.1")
        try:
            assert bind_via(a2, relay_v4, path, token, 0).bound
            b.sendto(seal(kb.send, 11, b"to the new address"), relay_v6)
            assert open_(ka.recv, a2.recv(2000)) == b"to the new address"
            assert recv_or_none(a) is None
        finally:
            a2.close()
    finally:
        for s in (a, b, evil):
            s.close()

    async with net.http.get(f"{net.url}/v1/paths/{path.hex()}") as r:
        stats = await r.json()
    assert stats["packets"] == [6, 8] and stats["bound"] == [True, True]
    async with net.http.get(net.url + "/metrics") as r:
        text = await r.text()
    assert metric(text, "ntm_rs_dropped_total", reason="bad_token") == 1
    assert metric(text, "ntm_rs_dropped_total", reason="unknown_sender") == 1

    # the relay forwarded exactly the 14 tunnel datagrams, and never the plaintext
    lines = net.capture.read_text().split()
    assert len(lines) == 14
    captured = b"".join(bytes.fromhex(x) for x in lines)
    assert PLAINTEXT not in captured and PLAINTEXT[:16] not in captured
    assert b"after intrusion" not in captured and b"new address" not in captured
    log = net.rs.log_path.read_text()
    assert f"path {path.hex()} side 0 bound" in log and f"path {path.hex()} side 0 moved" in log


async def test_bad_arguments_exit_nonzero(tmp_path):
    proc = Child(
        "rs", ["--rpc-url", "http://127.0.0.1:1", "--deployment", str(tmp_path / "missing.json")], tmp_path / "bad.log"
    )
    with pytest.raises(RuntimeError, match="did not start"):
        proc.start(timeout=10)
    assert proc.proc.returncode == 2  # a missing file is a usage error, refused before any work
    assert "--deployment: expected a readable file" in proc.log_tail()


async def one_dc(chain_url: str, tmp: Path):
    """The registry deployed with DEV_KEYS[1] admitted as a DC: (its key, the deployment file)."""
    owner = await Registry.deploy(chain_url, DEV_KEYS[0])
    dc_key = keys.private_key(DEV_KEYS[1])
    await owner.admit_dc(keys.node_id_of(dc_key), "dc1", "https://127.0.0.1:1")
    deployment = tmp / "deployment.json"
    deployment.write_text(json.dumps({"chain_id": owner.chain_id, "registry": keys.checksum(owner.address)}))
    await owner.close()
    return dc_key, deployment


async def test_ipv4_only_socket_and_default_advertise(tmp_path):
    """--udp-host 0.0.0.0 (machines without IPv6): IPv4 socket, advertised endpoints derived."""
    with Anvil() as chain:
        dc_key, deployment = await one_dc(chain.url, tmp_path)
        rs = rs_child(
            chain.url,
            deployment,
            tmp_path,
            "--udp-host",
            "0.0.0.0",
            log="rs4.log",
        ).start()
        try:
            port = rs.ready["udp_port"]
            assert rs.ready["relay"] and all(e.endswith(f":{port}") for e in rs.ready["relay"])
            path, token = os.urandom(8), os.urandom(32)
            async with raw_http() as http:
                ans = await send_relay_direction(
                    http, rs.ready["control"], dc_key, path, token, node_ids(), future_ms(), 10**6
                )
            assert ans["relay"] == rs.ready["relay"]
            a, b = udp(socket.AF_INET, "127.0.0.1"), udp(socket.AF_INET, "127.0.0.1")
            try:
                for side, s in enumerate((a, b)):
                    assert bind_via(s, ("127.0.0.1", port), path, token, side).bound
                ka = packet.TransportPacket(packet.TYPE_KEEPALIVE, path, 1, os.urandom(16)).encode()
                a.sendto(ka, ("127.0.0.1", port))
                assert b.recv(100) == ka
            finally:
                a.close()
                b.close()
        finally:
            rs.stop()
        assert rs.proc.returncode == 0


async def test_directions_from_fresh_keys_cost_no_chain_call(tmp_path):
    """An outsider signing relay directions with 100 fresh keys gets 100 refusals and makes the
    relay read the chain 0 times (it knows the active DCs from chain events; it used to make
    one eth_call per new signer)."""
    with Anvil() as chain:
        async with CountingRpc(chain.url) as rpc:
            owner = await Registry.deploy(chain.url, DEV_KEYS[0])
            await owner.admit_dc(keys.node_id_of(keys.private_key(DEV_KEYS[1])), "dc1", "http://127.0.0.1:1")
            deployment = tmp_path / "deployment.json"
            deployment.write_text(json.dumps({"chain_id": owner.chain_id, "registry": keys.checksum(owner.address)}))
            await owner.close()
            rs = await asyncio.to_thread(rs_child(rpc.url, deployment, tmp_path, "--admin-allow", "192.0.2.0/24").start)
            try:
                async with raw_http() as http:
                    before = rpc.calls["eth_call"]
                    refusals = await asyncio.gather(
                        *(
                            send_relay_direction(
                                http,
                                rs.ready["control"],
                                keys.generate(),
                                os.urandom(8),
                                os.urandom(32),
                                node_ids(),
                                future_ms(),
                                1000,
                            )
                            for _ in range(100)
                        ),
                        return_exceptions=True,
                    )
                    assert all(isinstance(r, RelayDirectionError) and r.code == "untrusted_dc" for r in refusals)
                    assert rpc.calls["eth_call"] - before == 0
                    ok = await send_relay_direction(
                        http,
                        rs.ready["control"],
                        keys.private_key(DEV_KEYS[1]),
                        os.urandom(8),
                        os.urandom(32),
                        node_ids(),
                        future_ms(),
                        1000,
                    )
                    assert ok["created"]
                    # operator endpoints only for the admin network (here not loopback): 403, nothing shown
                    for path in ("/metrics", f"/v1/paths/{'00' * 8}"):
                        async with http.get(rs.ready["http"] + path) as r:
                            assert r.status == 403 and (await r.json())["error"] == "forbidden"
                    async with http.get(rs.ready["http"] + "/v1/info") as r:
                        assert r.status == 200
            finally:
                await asyncio.to_thread(rs.stop)


async def test_stream_port_taken_is_one_line_and_exit_1(tmp_path):
    """A stream port that cannot be bound, given explicitly: one line naming it, exit 1 (the
    default 443 only warns: a relay without root still relays UDP)."""
    with Anvil() as chain:
        owner = await Registry.deploy(chain.url, DEV_KEYS[0])
        deployment = tmp_path / "deployment.json"
        deployment.write_text(json.dumps({"chain_id": owner.chain_id, "registry": keys.checksum(owner.address)}))
        await owner.close()
        busy = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        try:
            r = await asyncio.to_thread(
                subprocess.run,
                [
                    sys.executable,
                    "-m",
                    "rs",
                    "--rpc-url",
                    chain.url,
                    "--deployment",
                    str(deployment),
                    "--udp-port",
                    "0",
                    "--http-port",
                    "0",
                    "--stream-host",
                    "127.0.0.1",
                    "--stream-port",
                    str(busy.getsockname()[1]),
                    "--data-dir",
                    str(tmp_path),
                ],
                capture_output=True,
                text=True,
                timeout=60,
            )
        finally:
            busy.close()
    assert r.returncode == 1, r.stderr
    [line] = r.stderr.strip().splitlines()[-1:]
    assert "no stream listener" in line and "Traceback" not in r.stderr
