"""Issue 29 item 1 (first part, behind a flag): a DC served over TLS with a certificate bound to its
chain key (ntm/tls_binding.py), and a node client pinned to the DC's on-chain address. Real DC and
chain processes on loopback; the attacker is a TLS endpoint of its own on the path."""

from __future__ import annotations

import asyncio
import os
import ssl
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from node.agent import Node
from node.dc_client import DcClient, DcError
from ntm import keys, messages, tls_binding
from ntm.errors import SignatureError
from ntm.registration import RegistrationRequest
from scripts.anvil import Anvil
from labkit.dcnet import DcNet
from tests.test_rs_stream import self_signed


async def cli(home: Path, *args: str) -> subprocess.CompletedProcess:
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "node.cli", "--home", str(home), "--json", *args],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "NTM_PASSPHRASE": "pw"},
    )


def test_binding_vector():
    """Test vector (docs/PROTOCOL.md §5): dev key 1 binding the DER bytes b"cert"."""
    key = keys.private_key(bytes.fromhex("59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d"))
    b = tls_binding.bind(key, b"cert")
    assert messages.encode(b) == {
        "cert_sha256": "06298432e8066b29e2223bcc23aa9504b56ae508fabf3435508869b9c3190e22",
        "sig": "4f818cb900dd5945e6bdd75c1379267023e3614fea9c835aeafee2b4f29c92b5"
        "6aa9e6a58eccb2a106f34e7ca3ef85ce641b06664d20a349247eb7cc5a2c55ed1c",
    }
    assert keys.checksum(tls_binding.signer(b, b"cert")) == "0x70997970C51812dc3A010C7d01b50e0d17dc79C8"
    assert tls_binding.check(b, b"cert", keys.node_id_of(key)).hex() == b.cert_sha256
    with pytest.raises(SignatureError):
        tls_binding.check(b, b"other cert", keys.node_id_of(key))
    with pytest.raises(SignatureError):
        tls_binding.check(b, b"cert", b"\x01" * 20)


async def test_a_pinned_client_reaches_its_dc_over_tls_and_refuses_an_impostor(tmp_path):
    """On-path attacker terminating TLS with a certificate of its own and relaying the DC's
    genuine /v1/info (binding included): the pinned client refuses it before sending anything
    else (no registration, no session, no token). Pinned to another DC's address: refused too.
    The genuine DC: registration, then a session whose welcome (the keepalive token) came
    over TLS."""
    cert, key_pem = self_signed(tmp_path)
    (tmp_path / "evil").mkdir()
    evil_cert, evil_key = self_signed(tmp_path / "evil")
    with Anvil() as chain:
        net = DcNet(tmp_path, chain)
        await net.deploy(2)
        try:
            child = net.start_dc(0, ("--tls-cert", str(cert), "--tls-key", str(key_pem)))
            url = child.ready["http"]
            assert url.startswith("https://")
            dc1, dc2 = (keys.node_id_of(k) for k in net.dc_keys)
            node = keys.generate()
            async with DcClient(url, pin=dc1) as dc:
                info = await dc.info()
                await dc.register(RegistrationRequest.signed(node, info, int(time.time() * 1000), ()))
            a = await Node.start(node, url, host="127.0.0.1", port=0, dc_pin=dc1)  # session over wss
            try:
                assert a.observed and a.session.dc.base.startswith("https://") and len(a.session.token) == 32
            finally:
                await a.close()
            async with DcClient(url, pin=dc2) as dc:
                with pytest.raises(DcError) as exc:
                    await dc.info()
                assert exc.value.code == "dc_unauthenticated"
            async with DcClient(url.replace("127.0.0.1", "localhost")) as dc:  # no address known to check it against
                with pytest.raises(DcError) as exc:
                    await dc.info()
                assert exc.value.code == "dc_unauthenticated"

            # The first registration from the CLI: no address known → refused, naming the one the DC
            # claims; another DC's address → refused; the right one → registered and pinned.
            home = tmp_path / "cli"
            assert (await cli(home, "keygen")).returncode == 0
            proc = await cli(home, "register", "--dc", url)
            assert proc.returncode == 2 and keys.checksum(dc1) in proc.stderr and "--dc-address" in proc.stderr
            proc = await cli(home, "register", "--dc", url, "--dc-address", keys.checksum(dc2))
            assert proc.returncode != 0 and "dc_unauthenticated" in proc.stderr, proc.stderr
            assert not (home / "state.json").exists()
            assert (await cli(home, "register", "--dc", url, "--dc-address", keys.checksum(dc1))).returncode == 0
            plain = "http" + url.removeprefix("https")
            proc = await cli(home, "register", "--dc", plain)
            assert proc.returncode == 2 and "--insecure-plain-http" in proc.stderr

            seen: list[str] = []

            async def relay(request: web.Request) -> web.Response:
                seen.append(request.path)
                async with aiohttp.ClientSession() as http, http.get(url + request.path, ssl=False) as r:
                    return web.Response(body=await r.read(), content_type="application/json")

            tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            tls.load_cert_chain(evil_cert, evil_key)
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", relay)
            runner = web.AppRunner(app)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls)
            await site.start()
            evil = f"https://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
            try:
                async with DcClient(evil, pin=dc1) as dc:
                    with pytest.raises(DcError) as exc:
                        await dc.open_session(node)
                    assert exc.value.code == "dc_unauthenticated"
                assert seen == ["/v1/info"]  # the binding check was all it got: no session, no token
            finally:
                await runner.cleanup()
        finally:
            net.stop()


async def test_a_dc_that_rotates_its_certificate_is_checked_afresh_not_refused(tmp_path):
    """A DC restarted with a new certificate (bound to the same chain key) at the same URL: the
    client that pinned the old one checks the new binding once and goes on, in the same call; a
    new client of the process (the shared pin cache still holds the old one) does too. Without
    this a rotation failed each client's next request (seen in CI when a port came back with a
    fresh DC of the same dev key)."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, second = self_signed(tmp_path / "a"), self_signed(tmp_path / "b")
    with Anvil() as chain:
        net = DcNet(tmp_path, chain)
        await net.deploy(1)
        try:
            url = net.start_dc(0, ("--tls-cert", str(first[0]), "--tls-key", str(first[1]))).ready["http"]
            dc1 = keys.node_id_of(net.dc_keys[0])
            async with DcClient(url, pin=dc1) as held:
                assert (await held.info()).dc == keys.checksum(dc1)
                net.dcs[0].stop()
                net.start_dc(0, ("--tls-cert", str(second[0]), "--tls-key", str(second[1])))
                assert (await held.info()).dc == keys.checksum(dc1)
            async with DcClient(url, pin=dc1) as fresh:
                assert (await fresh.info()).dc == keys.checksum(dc1)
        finally:
            net.stop()
