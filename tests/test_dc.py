"""DC integration: real anvil, real DC processes on loopback, real SQLite files, the real `ntm` CLI."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
import types

import aiohttp
import pytest

from dc.federation import FederationClient, FederationError
from node.dc_client import DcClient, DcError
from daemon import keystore
from ntm import envelope, keepalive, keys, messages
from ntm.record import Domain, NodeTransaction
from ntm.registration import RegistrationRequest
from scripts.anvil import Anvil
from labkit.dcnet import CountingRpc, DcNet, metric, raw_http, until
from labkit.nodeproc import ntm


def make_node(tmp_path, name):
    home = tmp_path / name
    out = ntm(home, "keygen")
    return home, keys.parse_node_id(out["node"])


async def test_two_dcs_federation(net, tmp_path):
    a_home, a = make_node(tmp_path, "a")
    b_home, b = make_node(tmp_path, "b")
    ra = ntm(a_home, "register", *net.dc_args(0), "--addr", "10.1.0.2:4330")
    rb = ntm(b_home, "register", *net.dc_args(1), "--addr", "10.2.0.2:4330")
    assert ra["status"] == rb["status"] == "confirmed"

    async with DcClient(net.urls[0]) as dc1:
        # DC1 learns B's home from its registry cache, then asks DC2 over the federation.
        seen = await until(lambda: _whois_or_none(dc1, b))
    assert seen.home_dc == keys.checksum(net.dc_keys[1].public_key.format(False) and keys.node_id_of(net.dc_keys[1]))
    assert keys.node_id(bytes.fromhex(seen.pubkey)) == b

    # The federation request itself, signed by DC1's chain key, returns B's key and addresses.
    guard = envelope.ReplayGuard()
    reg = await net.registry()
    fed = FederationClient(net.dc_keys[0], lambda addr: True, guard)
    info = await fed.ntm_info(net.urls[1], keys.node_id_of(net.dc_keys[1]), b)
    await fed.close()
    assert info.local_addrs == ["10.2.0.2:4330"] and keys.node_id(bytes.fromhex(info.pubkey)) == b

    # An unknown key signing a federation request is refused, and so is a replay of a good one.
    stranger = FederationClient(keys.generate(), lambda addr: True, guard)
    with pytest.raises(FederationError, match="not an active DC"):
        await stranger.ntm_info(net.urls[1], keys.node_id_of(net.dc_keys[1]), b)
    await stranger.close()
    good = envelope.seal(
        net.dc_keys[0],
        "ntm-info-request",
        {"node": keys.checksum(b), "to": keys.checksum(keys.node_id_of(net.dc_keys[1]))},
        int(time.time() * 1000),
    )
    async with raw_http() as http:
        first = await http.post(net.urls[1] + "/v1/federation/ntm-info", json=good)
        again = await http.post(net.urls[1] + "/v1/federation/ntm-info", json=good)
        assert first.status == 200 and again.status == 403
        assert "replayed" in (await again.json())["message"]
    await reg.close()


async def _whois_or_none(dc, node):
    try:
        return await dc.whois(node)
    except DcError:
        return None


async def test_node_moves_between_dcs_within_one_block(net, tmp_path):
    home, n = make_node(tmp_path, "m")
    ntm(home, "register", *net.dc_args(0))
    moved = ntm(home, "register", *net.dc_args(1))
    assert moved["status"] == "confirmed"
    dc2 = keys.checksum(keys.node_id_of(net.dc_keys[1]))
    reg = await net.registry()
    assert (await reg.lookup(n)).dc == keys.node_id_of(net.dc_keys[1])
    # Both DCs' caches reflect the move by the time the chain has one more block.
    async with DcClient(net.urls[0]) as dc1, DcClient(net.urls[1]) as dc2c:
        for dc in (dc1, dc2c):
            seen = await until(lambda: _whois_or_none(dc, n), timeout=5)
            assert seen.home_dc == dc2
    assert await reg.block_number() <= moved["block"] + 1
    # The old DC's stale record can no longer reach the chain, and `ntm status` shows the new home.
    status = ntm(home, "status")
    assert status["home_dc"] == dc2 and status["confirmed"]
    await reg.close()


async def test_bad_input_is_refused_and_changes_nothing(net, tmp_path):
    url = net.urls[0]
    dc1 = keys.node_id_of(net.dc_keys[0])
    key = keys.generate()
    nid = keys.node_id_of(key)
    async with DcClient(url) as client:
        info = await client.info()
        domain = Domain(info.chain_id, keys.parse_node_id(info.registry))

        def req(ts, dc=dc1, revoked=False, signer=key):
            rec = NodeTransaction(nid, dc, ts, revoked)
            sig = keys.sign_digest(signer, rec.digest(domain))
            return RegistrationRequest(rec, sig, keys.public_bytes(key), ())

        async with raw_http() as http:

            async def post(body, raw=False):
                data = body if raw else json.dumps(body)
                async with http.post(url + "/v1/register", data=data) as r:
                    return r.status, await r.json()

            async def stored():
                async with http.get(url + "/metrics") as r:
                    text = await r.text()
                return int(metric(text, "ntm_dc_nodes_stored"))

            now = int(time.time() * 1000)
            assert (await post("{not json", raw=True))[0] == 400
            assert (await post("x" * 100_000, raw=True))[0] == 413
            status, body = await post(req(now, signer=keys.generate()).to_json())
            assert (status, body["error"]) == (400, "bad_signature")
            status, body = await post(req(now, dc=b"\x42" * 20).to_json())
            assert (status, body["error"]) == (400, "wrong_dc")
            assert await stored() == 0

            good = req(now).to_json()
            assert (await post({**good, "wait": "confirmed"}))[1]["status"] == "confirmed"
            status, body = await post(good)  # replay of the exact same record
            assert (status, body["error"]) == (409, "stale")
            revoke = req(now + 1, revoked=True).to_json()
            assert (await post({**revoke, "wait": "confirmed"}))[1]["status"] == "confirmed"
            status, body = await post(req(now + 2).to_json())
            assert (status, body["error"]) == (403, "revoked")
            assert await stored() == 1

    # The CLI says so in words.
    home, _ = make_node(tmp_path, "r")
    ntm(home, "register", *net.dc_args(0))
    ntm(home, "revoke", "--dc", url, "--yes")
    proc = ntm(home, "register", "--dc", url, check=False)
    assert proc.returncode == 1 and "revoked" in proc.stderr


async def test_session_and_keepalive_token(net, tmp_path):
    home, n = make_node(tmp_path, "k")
    ntm(home, "register", *net.dc_args(0))
    key = keystore.load_keystore(home / "key.json")
    async with DcClient(net.urls[0]) as client:
        ws, welcome = await client.open_session(key)
        token, port = bytes.fromhex(welcome.token), welcome.keepalive_ports[0]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(2)
            s.sendto(keepalive.encode_request(n, 1, b"\x00" * 32), ("127.0.0.1", port))  # wrong token
            s.sendto(keepalive.encode_request(n, 2, token), ("127.0.0.1", port))
            seq, ip, observed_port = keepalive.parse_reply(s.recv(100), token)
            assert (seq, ip, observed_port) == (2, "127.0.0.1", s.getsockname()[1])
        await ws.send_json({"type": "status"})
        status = await ws.receive_json()
        assert status["observed"] == f"127.0.0.1:{observed_port}" and status["keepalives"] == 1
        await ws.close()
        # A stranger cannot open a session for a node it does not hold the key of.
        with pytest.raises(DcError, match="not registered|refused"):
            await client.open_session(keys.generate())


async def test_cli_errors_are_readable(net, tmp_path):
    home, _ = make_node(tmp_path, "e")
    proc = ntm(home, "register", "--dc", "127.0.0.1:1", check=False)
    assert proc.returncode == 4 and "cannot reach DC" in proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "node.cli", "--home", str(home), "status"],
        capture_output=True,
        text=True,
        env={"NTM_PASSPHRASE": "wrong", "PATH": ""},
    )
    assert proc.returncode == 2 and "wrong passphrase" in proc.stderr
    proc = ntm(tmp_path / "nobody", "id", check=False)
    assert proc.returncode == 2 and "ntm keygen" in proc.stderr


async def test_a_silent_node_session_is_dropped_by_the_dc_heartbeat(net, tmp_path):
    """A node gone without a FIN (host frozen, link cut: here a client that never reads, so it
    answers no ping) is shown offline once the DC's heartbeat deadline passed, while a node that
    answers the DC's pings stays online: presence (and so route decisions) stays right."""
    from dc.server import NODE_HEARTBEAT_S

    (silent_home, silent), (live_home, live) = make_node(tmp_path, "hs"), make_node(tmp_path, "hl")
    for home in (silent_home, live_home):
        ntm(home, "register", *net.dc_args(0))
    async with DcClient(net.urls[0]) as a, DcClient(net.urls[0]) as b:
        ws_silent, _ = await a.open_session(keystore.load_keystore(silent_home / "key.json"))
        ws_live, _ = await b.open_session(keystore.load_keystore(live_home / "key.json"))
        reader = asyncio.create_task(ws_live.receive())  # reading answers the DC's pings
        try:
            assert (await a.whois(silent)).online
            await asyncio.sleep(1.5 * NODE_HEARTBEAT_S + 1.0)
            assert not (await a.whois(silent)).online
            assert (await a.whois(live)).online and not reader.done()
        finally:
            reader.cancel()
            await ws_live.close()
            await ws_silent.close()


async def _ended(ws) -> dict:
    """The DC's last word on a session it ended, then the close."""
    msg = await asyncio.wait_for(ws.receive_json(), 5)
    assert (await asyncio.wait_for(ws.receive(), 5)).type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    return msg


async def test_one_live_session_per_node_and_revocation_ends_it(net, tmp_path):
    """A key thief's earlier session does not survive the owner reconnecting, and a revocation
    (durable at the DC, before the chain confirms) ends the live session at once."""
    home, n = make_node(tmp_path, "s")
    ntm(home, "register", *net.dc_args(0))
    key = keystore.load_keystore(home / "key.json")
    async with DcClient(net.urls[0]) as thief, DcClient(net.urls[0]) as owner:
        ws_thief, _ = await thief.open_session(key)
        ws_owner, _ = await owner.open_session(key)
        assert await _ended(ws_thief) == {
            "type": "error",
            "error": "session_ended",
            "message": "superseded by a newer session of this node",
        }
        ntm(home, "revoke", "--dc", net.urls[0], "--yes", "--no-wait")
        assert await _ended(ws_owner) == {"type": "error", "error": "session_ended", "message": "node revoked"}
        with pytest.raises(DcError, match="revoked"):
            await owner.open_session(key)


async def test_random_whois_costs_no_chain_call(tmp_path):
    """An outsider asking about 100 random node IDs makes the DC read the chain 0 times for them
    (it answers from its event-fed cache), where it used to make one eth_call each."""
    with Anvil() as chain:
        async with CountingRpc(chain.url) as rpc:
            net = DcNet(tmp_path, types.SimpleNamespace(url=rpc.url))
            await net.deploy(1)
            await asyncio.to_thread(net.start_dc, 0)  # the proxy runs on this loop: do not block it
            try:
                async with DcClient(net.urls[0]) as dc:
                    before = rpc.calls["eth_call"]
                    answers = await asyncio.gather(
                        *(dc.whois(keys.node_id_of(keys.generate())) for _ in range(100)), return_exceptions=True
                    )
                    assert all(isinstance(a, DcError) and a.code == "unknown_node" for a in answers)
                    assert rpc.calls["eth_call"] - before == 0
            finally:
                net.stop()


async def test_stalled_http_connections_are_closed_and_sessions_stay(tmp_path):
    """200 connections that send nothing, or half a request line, are closed by the DC after its
    idle timeout (they stayed open forever); a node's WebSocket session is not affected."""
    with Anvil() as chain:
        net = DcNet(tmp_path, chain)
        await net.deploy(1)
        net.start_dc(0, extra=("--http-idle-timeout", "1"))
        try:
            home, _ = make_node(tmp_path, "w")
            ntm(home, "register", *net.dc_args(0))
            port = int(net.urls[0].rsplit(":", 1)[1])
            socks = []
            for i in range(200):
                s = socket.create_connection(("127.0.0.1", port))
                if i % 2:
                    s.sendall(b"GET /v1/info HT")  # a request line that never ends
                socks.append(s)
            async with DcClient(net.urls[0]) as client:
                ws, _ = await client.open_session(keystore.load_keystore(home / "key.json"))
                await asyncio.sleep(2.5)
                closed = 0
                for s in socks:
                    s.settimeout(1)
                    try:
                        closed += s.recv(100) == b""
                    except TimeoutError:
                        pass  # still open
                    except OSError:
                        closed += 1  # reset by the DC
                    s.close()
                assert closed == 200
                await ws.send_json({"type": "status"})
                assert (await asyncio.wait_for(ws.receive_json(), 5))["type"] == "status"
                await ws.close()
        finally:
            net.stop()


async def test_register_exits_1_when_the_chain_refuses_the_record(tmp_path):
    """A DC that answers "rejected" (the chain's verdict): `ntm register` says why and exits 1,
    and remembers nothing of it (no "registered", no state file)."""
    from aiohttp import web
    from ntm import messages as m
    from labkit.dcnet import local_app

    async def info(request):
        return web.json_response(
            m.encode(m.DcInfoReply("0x" + "11" * 20, "dcx", 31337, "0x" + "22" * 20, [4331, 4332], [], True))
        )

    async def register(request):
        body = await request.json()
        return web.json_response(
            {
                "node": body["record"]["node"],
                "dc": "0x" + "11" * 20,
                "timestamp": body["record"]["timestamp"],
                "status": "rejected",
                "reason": "NodeRegistry: stale timestamp",
            }
        )

    app = web.Application()
    app.router.add_get("/v1/info", info)
    app.router.add_post("/v1/register", register)
    async with local_app(app) as url:
        home = tmp_path / "n"
        ntm(home, "keygen")
        proc = await asyncio.to_thread(ntm, home, "register", "--dc", url, "--insecure-plain-http", check=False)
        assert proc.returncode == 1, proc
        assert "the chain refused the record" in proc.stderr and "stale timestamp" in proc.stderr
        assert "Traceback" not in proc.stderr and not (home / "state.json").exists()


async def test_route_offer_travels_in_node_info_and_a_forged_one_is_refused(net, tmp_path):
    """A node announces its signed route offer with its session (§10.10); a peer's whois at
    another DC gets it through the federation, still verifiable. Adversary: a client announcing
    an offer altered after signing, or another node's offer: the session is refused."""
    import msgspec

    from ntm.routes import parse_prefixes, sign_offer, verify_offer

    home, n = make_node(tmp_path, "router")
    ntm(home, "register", *net.dc_args(1))
    key = keystore.load_keystore(home / "key.json")
    offer = sign_offer(key, parse_prefixes("10.77.0.0/24"), False, int(time.time() * 1000))
    async with DcClient(net.urls[1]) as dc2, DcClient(net.urls[0]) as dc1:
        for bad in (
            msgspec.structs.replace(offer, routes=["10.0.0.0/8"]),
            sign_offer(keys.generate(), parse_prefixes("10.77.0.0/24"), False, offer.seq),
        ):
            with pytest.raises(DcError, match="route offer"):
                await dc2.open_session(key, routes=bad)
        ws, _ = await dc2.open_session(key, routes=offer)
        try:
            seen = await until(lambda: _whois_or_none(dc1, n))
            assert seen.routes == offer and verify_offer(seen.routes).node == n
        finally:
            await ws.close()


async def test_a_peer_dc_killed_mid_direction_answers_at_once_and_its_restart_is_reached(net):
    """Adversary: the peer's home DC dies (SIGKILL) while it directs its node, the call on the
    requester's DC's kept channel to it (§8.6). The requester is answered home_dc_unreachable at
    once, not at the 6 s offer timeout; once the peer DC is back, the next direction reaches it on a
    new channel."""
    from labkit.dcnet import register

    ka, kb = keys.generate(), keys.generate()
    await register(net.urls[0], ka)
    await register(net.urls[1], kb)

    async def serve(ws, ack: bool):
        """Acknowledge pushes on session `ws` until a result (or, `ack` False, a push) arrives; that message."""
        while True:
            m = messages.decode(messages.DcToNode, await ws.receive_str(timeout=10))
            if isinstance(m, messages.DirectionResult) or (isinstance(m, messages.DirectionPush) and not ack):
                return m
            if isinstance(m, messages.DirectionPush):
                await ws.send_json(messages.encode(messages.DirectionAck(m.direction.body["path"])))

    for attempt in (1, 2):
        async with DcClient(net.urls[0]) as dc1, DcClient(net.urls[1]) as dc2:
            wa, _ = await dc1.open_session(ka, ["127.0.0.1:40001"])
            wb, _ = await dc2.open_session(kb, ["127.0.0.1:40002"])
            await wa.send_json(messages.encode(messages.DirectionRequest(attempt, keys.checksum(keys.node_id_of(kb)))))
            requester = asyncio.create_task(serve(wa, True))
            if attempt == 1:
                assert isinstance(await serve(wb, False), messages.DirectionPush)  # B holds its ack
                await asyncio.to_thread(net.dcs[1].kill)
                killed = time.monotonic()
                result = await requester
                assert time.monotonic() - killed < 1.5
                assert result.error is not None and result.error.error == "home_dc_unreachable", result
                await asyncio.to_thread(net.start_dc, 1)
            else:
                peer = asyncio.create_task(serve(wb, True))
                result = await requester
                assert result.route is not None, result
                peer.cancel()
            await wa.close()
            await wb.close()
