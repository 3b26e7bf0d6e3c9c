"""Cache Server end to end (docs/PROTOCOL.md §11–12), real processes: anvil, two DCs, two Cache
Servers; nodes in-process (the daemon's Node with an inbox) and through the `ntm` CLI."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio

from cs import dclink
from node.agent import Node
from node.cs_client import CsClient, CsClientError, bytes_chunks
from ntm import envelope, keys, messages, seal
from tests.dcnet import DcNet, cs_federation, raw_http, register, revoke, until

MARKER = b"PLAINTEXT-MARKER-7f3a9c"  # appears in every test's content: must never appear at a CS


# One federation for the module (every test uses fresh node keys): starting anvil, two DCs and
# two CSs costs ~8 s. Tests that restart a CS leave it as they found it.
pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fed(tmp_path_factory):
    """anvil, two DCs each with its Cache Server."""
    async with cs_federation(tmp_path_factory.mktemp("cs-fed")) as net:
        yield net


async def registered(net: DcNet, i: int):
    key = keys.generate()
    await register(net.urls[i], key)
    return key


async def upload(net: DcNet, cs: int, sender, recipients: list, content: bytes, notice: str = "hi") -> str:
    pubs = {keys.node_id_of(k): keys.public_bytes(k) for k in recipients}
    sealer = seal.Sealer(sender, pubs, seal.Meta("test", "svc", "1", notice), int(time.time() * 1000))
    async with CsClient(sender, net.cs_url(cs)) as c:
        res = await c.put(sealer, bytes_chunks(content), len(content))
    return res["item"]


def cs_files_contain(net: DcNet, i: int, needle: bytes) -> bool:
    return any(needle in p.read_bytes() for p in net.cs_dir(i).rglob("*") if p.is_file())


def stored_items(net: DcNet, i: int) -> int:
    with sqlite3.connect(net.cs_dir(i) / "cs.sqlite") as db:
        return db.execute("SELECT count(*) FROM items").fetchone()[0]


def is_stored(net: DcNet, i: int, item: str) -> bool:
    with sqlite3.connect(net.cs_dir(i) / "cs.sqlite") as db:
        row = db.execute("SELECT 1 FROM items WHERE item=?", (bytes.fromhex(item),)).fetchone()
    return row is not None and (net.cs_dir(i) / "blobs" / item).exists()


async def online(net: DcNet, i: int, key, inbox: Path) -> Node:
    return await Node.start(key, net.urls[i], host="127.0.0.1", port=0, inbox=inbox)


async def test_offline_recipient_is_notified_fetches_and_the_cs_forgets(fed, tmp_path):
    sender, bob = await registered(fed, 0), await registered(fed, 1)  # at different DCs; bob offline
    content = os.urandom(300_000) + MARKER * 100
    item = await upload(fed, 0, sender, [bob], content, notice="for bob")
    assert is_stored(fed, 0, item) and not cs_files_contain(fed, 0, MARKER)
    async with await online(fed, 1, bob, tmp_path / "bob") as node:  # bob comes online at dc2
        got = await asyncio.wait_for(node.next_item(), 20)
        assert got.item == item and got.sender == keys.node_id_of(sender) and got.meta.notice == "for bob"
        assert got.path.read_bytes() == content
        # dc2 pushed cs1's notice on bob's session (it was stored while bob was offline)
        await until(lambda: any(n.item == item for n in node.mailbox.notices), timeout=10)
        await until(lambda: not (fed.cs_dir(0) / "blobs" / item).exists(), timeout=10)  # confirmed: deleted
    assert not is_stored(fed, 0, item) and not cs_files_contain(fed, 0, MARKER)


async def test_three_recipients_one_offline_each_get_it_exactly_once(fed, tmp_path):
    sender = await registered(fed, 0)
    bob, carol, dave = await registered(fed, 1), await registered(fed, 0), await registered(fed, 1)
    nodes = [await online(fed, 1, bob, tmp_path / "bob"), await online(fed, 0, carol, tmp_path / "carol")]
    try:
        item = await upload(fed, 1, sender, [bob, carol, dave], MARKER + b" to three")
        for n in nodes:  # online: fetched on the notice
            got = await asyncio.wait_for(n.next_item(), 20)
            assert got.item == item
        assert is_stored(fed, 1, item)  # dave has not confirmed yet
        nodes.append(await online(fed, 1, dave, tmp_path / "dave"))
        assert (await asyncio.wait_for(nodes[2].next_item(), 20)).item == item
        await until(lambda: not is_stored(fed, 1, item), timeout=10)
        await asyncio.sleep(1.0)  # a second notice or sweep would show up now
        for n in nodes:
            assert [r.item for r in n.mailbox.received] == [item]
    finally:
        for n in nodes:
            await n.close()


async def test_refusals_store_nothing(fed, tmp_path):
    sender, bob, eve = await registered(fed, 0), await registered(fed, 1), await registered(fed, 0)
    item = await upload(fed, 0, sender, [bob], MARKER)
    before = stored_items(fed, 0)
    # another node asking for bob's item: the same answer as for no item at all
    async with CsClient(eve, fed.cs_url(0)) as c:
        with pytest.raises(CsClientError) as exc:
            await c.fetch(item, tmp_path / "eve")
        assert exc.value.code == "not_found" and not list((tmp_path / "eve").glob("*"))
        assert await c.inbox() == []
    # a replayed signed request is refused, however valid it was the first time
    auth = envelope.seal(bob, messages.CS_LIST, {}, int(time.time() * 1000))
    async with aiohttp.ClientSession() as http:
        async with http.post(fed.cs_url(0) + "/v1/inbox", json=auth) as r:
            assert r.status == 200 and len((await r.json())["items"]) == 1
        async with http.post(fed.cs_url(0) + "/v1/inbox", json=auth) as r:
            assert r.status == 403 and (await r.json())["error"] == "forbidden"
        # a stale one, and one signed by a key that is not a registered node
        old = envelope.seal(bob, messages.CS_LIST, {}, int(time.time() * 1000) - 120_000)
        async with http.post(fed.cs_url(0) + "/v1/inbox", json=old) as r:
            assert r.status == 403
        stranger = envelope.seal(keys.generate(), messages.CS_LIST, {}, int(time.time() * 1000))
        async with http.post(fed.cs_url(0) + "/v1/inbox", json=stranger) as r:
            assert (r.status, (await r.json())["error"]) == (403, "unregistered")
    # a revoked sender can no longer upload
    await revoke(fed.urls[0], eve)
    await asyncio.sleep(dclink.VERDICT_TTL_S + 0.5)  # the CS's cached verdict on eve expires
    with pytest.raises(CsClientError) as exc:
        await upload(fed, 0, eve, [bob], MARKER)
    assert exc.value.code == "revoked"
    assert stored_items(fed, 0) == before
    # a tampered blob: bob refuses it, writes nothing, and it stays unconfirmed at the CS
    blob = fed.cs_dir(0) / "blobs" / item
    data = bytearray(blob.read_bytes())
    data[-5] ^= 1
    blob.write_bytes(bytes(data))
    async with CsClient(bob, fed.cs_url(0)) as c:
        with pytest.raises(CsClientError) as exc:
            await c.fetch(item, tmp_path / "bob")
        assert exc.value.code == "bad_item" and not list((tmp_path / "bob").glob("*"))
        assert [e["item"] for e in await c.inbox()] == [item]


async def test_oversized_and_over_quota_uploads(fed):
    fed.css[0].stop()
    fed.start_cs(0, ("--max-item-mb", "0.5", "--sender-quota-mb", "0.7", "--recipient-quota-mb", "10"))
    try:
        sender, bob = await registered(fed, 0), await registered(fed, 1)
        before, blobs = stored_items(fed, 0), len(list((fed.cs_dir(0) / "blobs").iterdir()))
        with pytest.raises(CsClientError) as exc:
            await upload(fed, 0, sender, [bob], os.urandom(600_000))
        assert exc.value.code == "too_large"
        await upload(fed, 0, sender, [bob], os.urandom(400_000))
        with pytest.raises(CsClientError) as exc:
            await upload(fed, 0, sender, [bob], os.urandom(400_000))
        assert exc.value.code == "over_quota" and "sender quota" in str(exc.value)
        assert stored_items(fed, 0) == before + 1 and len(list((fed.cs_dir(0) / "blobs").iterdir())) == blobs + 1
    finally:
        fed.css[0].stop()
        fed.start_cs(0)  # default limits again, for the other tests


async def test_an_acknowledged_item_survives_kill_9_of_the_cs(fed, tmp_path):
    sender, bob = await registered(fed, 0), await registered(fed, 1)
    content = os.urandom(200_000)
    item = await upload(fed, 0, sender, [bob], content)
    fed.css[0].kill()
    fed.start_cs(0)
    async with CsClient(bob, fed.cs_url(0)) as c:
        got = await c.fetch(item, tmp_path / "bob")
    assert got.path.read_bytes() == content


def ntm(home: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "node.cli", "--home", str(home), "--json", *args],
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


async def test_the_cli_sends_offline_lists_and_fetches(fed, tmp_path):
    alice, bob = tmp_path / "alice", tmp_path / "bob"
    for home, i in ((alice, 0), (bob, 1)):
        assert ntm(home, "keygen").returncode == 0
        reg = await asyncio.to_thread(ntm, home, "register", *fed.dc_args(i))
        assert reg.returncode == 0, reg.stderr
    bob_id = json.loads(ntm(bob, "id").stdout)["node"]
    (tmp_path / "note.txt").write_bytes(MARKER + b" in a file")
    sent = await asyncio.to_thread(ntm, alice, "send", bob_id, "--offline", "--file", str(tmp_path / "note.txt"),
                                   "--app", "notes")
    assert sent.returncode == 0, sent.stderr
    item = json.loads(sent.stdout)["item"]
    inbox = json.loads((await asyncio.to_thread(ntm, bob, "inbox")).stdout)
    assert [w["item"] for w in inbox["waiting"]] == [item]
    fetched = await asyncio.to_thread(ntm, bob, "fetch")
    assert fetched.returncode == 0, fetched.stderr
    got = json.loads(fetched.stdout)["fetched"][0]
    assert got["app_id"] == "notes" and got["name"] == "note.txt"
    assert Path(got["path"]).read_bytes() == MARKER + b" in a file"
    again = json.loads((await asyncio.to_thread(ntm, bob, "inbox")).stdout)
    assert again["waiting"] == [] and [r["item"] for r in again["received"]] == [item]
    # bad input is refused before any network work, in one line
    for args, code in ((("send", bob_id, "--offline"), 2), (("send", bob_id, "--offline", "--file", "/nonexistent"), 2),
                       (("send", bob_id, "x", "--offline", "--notice", "n" * 141), 2)):
        bad = ntm(alice, *args)
        assert bad.returncode == code and "Traceback" not in bad.stderr and len(bad.stderr.splitlines()) == 1, bad


async def test_a_recipient_that_moved_to_another_dc_still_finds_its_item(fed, tmp_path):
    """The notice went to bob's old home (dc2); bob re-registers at dc1 before coming online:
    at start its node asks every Cache Server of the federation."""
    sender, bob = await registered(fed, 0), await registered(fed, 1)
    item = await upload(fed, 1, sender, [bob], MARKER + b" moved")
    await register(fed.urls[0], bob)  # new home: dc1
    async with await online(fed, 0, bob, tmp_path / "bob") as node:
        got = await asyncio.wait_for(node.next_item(), 20)
    assert got.item == item and got.path.read_bytes() == MARKER + b" moved"


async def test_the_daemon_fetches_on_the_notice(fed, tmp_path):
    bob_home = tmp_path / "bob"
    assert ntm(bob_home, "keygen").returncode == 0
    assert (await asyncio.to_thread(ntm, bob_home, "register", *fed.dc_args(1))).returncode == 0
    bob_id = keys.parse_node_id(json.loads(ntm(bob_home, "id").stdout)["node"])
    daemon = subprocess.Popen([sys.executable, "-m", "node.cli", "--home", str(bob_home), "--json", "up", "--no-tun",
                               "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        line = await asyncio.wait_for(asyncio.to_thread(daemon.stdout.readline), 30)
        assert json.loads(line)["event"] == "up"
        sender = await registered(fed, 0)
        async with raw_http() as http, http.get(f"{fed.urls[1]}/v1/nodes/{keys.checksum(bob_id)}") as r:
            bob_pub = bytes.fromhex((await r.json())["pubkey"])
        sealer = seal.Sealer(sender, {bob_id: bob_pub}, seal.Meta("test", notice="to the daemon"), int(time.time() * 1000))
        async with CsClient(sender, fed.cs_url(0)) as c:
            item = (await c.put(sealer, bytes_chunks(MARKER), len(MARKER)))["item"]
        path = bob_home / "inbox" / item
        await until(lambda: path.exists() and (bob_home / "inbox" / f"{item}.json").exists(), timeout=20)
        assert path.read_bytes() == MARKER
        assert json.loads((bob_home / "inbox" / f"{item}.json").read_text())["notice"] == "to the daemon"
        status = json.loads(ntm(bob_home, "status").stdout)
        assert [r["item"] for r in status["daemon"]["inbox"]["received"]] == [item]
    finally:
        daemon.terminate()
        daemon.wait(10)


async def test_a_notice_not_signed_by_an_active_dc_is_refused(fed):
    bob = await registered(fed, 1)
    body = messages.encode(messages.CsNotice(node=keys.checksum(keys.node_id_of(bob)), item="00" * 16,
                                             cs="http://evil.example", sender=keys.checksum(bytes(20)), size=1,
                                             created=1))

    async def refused(http) -> float:
        async with http.get(fed.urls[1] + "/metrics") as r:
            return next(float(ln.split()[1]) for ln in (await r.text()).splitlines()
                        if ln.startswith("ntm_dc_cs_notices_refused_total "))

    async with raw_http() as http:
        before = await refused(http)
        forged = envelope.seal(keys.generate(), messages.CS_NOTICE, body, int(time.time() * 1000))
        async with http.post(fed.urls[1] + "/v1/federation/cs-notice", json=forged) as r:
            assert r.status == 403
        assert await refused(http) == before + 1
