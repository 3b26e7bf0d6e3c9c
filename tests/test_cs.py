"""Cache Server end to end (docs/PROTOCOL.md §11–12), real processes: anvil, two DCs, two Cache
Servers; nodes in-process (the daemon's Node with an inbox) and through the `ntm` CLI."""

from __future__ import annotations

import asyncio
import contextlib
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
from node import control
from node.agent import Node, NodeError
from node.api import AppNode
from node.cs_client import CsClient, CsClientError, bytes_chunks
from ntm import envelope, keys, messages, seal
from labkit.dcnet import DcNet, cs_federation, raw_http, register, revoke, until
from labkit.load import IDLE_S, STRICT_CS, concurrent_uploads, registered, upload

MARKER = b"PLAINTEXT-MARKER-7f3a9c"  # appears in every test's content: must never appear at a CS


# One federation for the module (every test uses fresh node keys): starting anvil, two DCs and
# two CSs costs ~8 s. Tests that restart a CS leave it as they found it.
pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fed(tmp_path_factory):
    """anvil, two DCs each with its Cache Server."""
    async with cs_federation(tmp_path_factory.mktemp("cs-fed")) as net:
        yield net


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


# --- limits that hold (issue 29 item 6) -------------------------------------------------------


@contextlib.asynccontextmanager
async def strict_cs(fed: DcNet):
    """CS 0 restarted with a 1 MB sender quota and a 2 s idle limit; default limits again after."""
    fed.css[0].stop()
    fed.start_cs(0, STRICT_CS)
    try:
        yield fed.cs_url(0)
    finally:
        fed.css[0].stop()
        fed.start_cs(0)


async def until_uploading(url: str, reserved: int, within_s: float = 30.0) -> None:
    """Wait until the CS's uploads in flight have reserved `reserved` bytes (its operator gauge)."""
    deadline = time.monotonic() + within_s
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            async with http.get(url + "/metrics") as r:
                text = await r.text()
            if any(
                ln == f"ntm_cs_uploading_bytes {reserved}" or ln == f"ntm_cs_uploading_bytes {float(reserved)}"
                for ln in text.splitlines()
            ):
                return
            await asyncio.sleep(0.05)
    raise AssertionError(f"the CS never held {reserved} bytes of uploads in flight:\n{text}")


async def test_concurrent_uploads_by_one_sender_stay_within_its_quota(fed):
    """Adversary: one identity starting 12 uploads of 300 kB at once against a 1 MB quota (each
    passed the check alone and 4.8× the quota was stored). Each upload reserves its size before a
    byte is stored: 3 are stored, 9 refused over_quota, nothing beyond the quota is on disk."""
    async with strict_cs(fed):
        stored, outcomes = await concurrent_uploads(fed)
        blobs = {p.name for p in (fed.cs_dir(0) / "blobs").iterdir()}
    assert stored <= 1 << 20 and outcomes["stored"] >= 3 and outcomes["over_quota"] == 12 - outcomes["stored"]
    assert not any(name.endswith(".part") for name in blobs)


async def test_slow_bodies_and_slowloris_headers_are_cut_off(fed):
    """Adversary: an upload that sends 1 kB then pauses, and a client sending its headers a line
    every 0.5 s (slowloris). Each is cut off after the idle limit (2 s here, 15 s by default, as at
    the DC and RS); the stalled upload leaves no file and gives its reservation back, so the sender
    then uploads its whole quota."""
    async with strict_cs(fed) as url:
        sender, bob = await registered(fed, 0), await registered(fed, 1)
        sealer = seal.Sealer(
            sender,
            {keys.node_id_of(bob): keys.public_bytes(bob)},
            seal.Meta("t", "s", "1", "n"),
            int(time.time() * 1000),
        )
        auth = envelope.seal(
            sender, messages.CS_PUT, {"header": sealer.header.to_json(), "size": 900_000}, int(time.time() * 1000)
        )

        async def trickle():
            yield b"\0" * 1000
            await asyncio.sleep(30)

        t0 = time.monotonic()
        async with aiohttp.ClientSession() as http:
            try:
                async with http.put(url + "/v1/items", data=trickle(), headers={"X-NTM-Auth": json.dumps(auth)}) as r:
                    status = r.status
            except aiohttp.ClientError:
                status = 0  # cut off before an answer could be read: as good
        assert time.monotonic() - t0 < IDLE_S + 5 and status in (0, 408)
        assert not list((fed.cs_dir(0) / "blobs").glob("*.part"))
        await upload(fed, 0, sender, [bob], os.urandom(900_000))  # its reservation was given back

        host, port = url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: cs\r\n")
        t0 = time.monotonic()
        closed = None
        while time.monotonic() - t0 < IDLE_S + 10:
            try:
                writer.write(b"X-Slow: 1\r\n")
                await writer.drain()
                if await asyncio.wait_for(reader.read(100), 0.5) == b"":
                    closed = time.monotonic() - t0
                    break
            except asyncio.TimeoutError:
                continue
            except (ConnectionError, OSError):
                closed = time.monotonic() - t0
                break
        writer.close()
        assert closed is not None and closed < IDLE_S + 5, closed


async def test_one_network_has_four_uploads_at_once(fed):
    """Adversary: five identities behind one network (127.77.0.0/24, not the operator's) each
    starting an upload that trickles. Four are taken, the fifth is refused `busy` at once; another
    network uploads meanwhile, and the network uploads again once its uploads have ended."""
    async with strict_cs(fed) as url:
        bob = await registered(fed, 0)
        senders = [await registered(fed, 0) for _ in range(5)]

        def put(http: aiohttp.ClientSession, sender, body) -> asyncio.Task:
            sealer = seal.Sealer(
                sender,
                {keys.node_id_of(bob): keys.public_bytes(bob)},
                seal.Meta("t", "s", "1", "n"),
                int(time.time() * 1000),
            )
            auth = envelope.seal(
                sender, messages.CS_PUT, {"header": sealer.header.to_json(), "size": 10_000}, int(time.time() * 1000)
            )

            async def go() -> int:
                try:
                    async with http.put(url + "/v1/items", data=body, headers={"X-NTM-Auth": json.dumps(auth)}) as r:
                        return r.status
                except aiohttp.ClientError:
                    return 0

            return asyncio.create_task(go())

        async def trickle():
            yield b"\0" * 1000
            await asyncio.sleep(IDLE_S * 0.9)  # within the idle limit: the upload stays open a while

        def from_ip(ip: str) -> aiohttp.ClientSession:
            return aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(ip, 0)))

        async with from_ip("127.77.0.1") as a, from_ip("127.77.0.2") as b, from_ip("127.78.0.1") as other:
            held = [put(a if i % 2 else b, s, trickle()) for i, s in enumerate(senders[:4])]
            await until_uploading(url, 4 * 10_000)  # the four hold their reservations (a loaded machine is slow)
            assert await put(a, senders[4], b"\0" * 10_000) == 409  # busy: the network's 4 are open
            assert await put(other, senders[4], b"\0" * 10_000) == 201  # another network: stored
            await asyncio.gather(*held)
            assert await put(a, senders[4], b"\0" * 10_000) == 201  # the network's slots are free again


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
    return subprocess.run(
        [sys.executable, "-m", "node.cli", "--home", str(home), "--json", *args],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def ntm_text(home: Path, *args: str) -> subprocess.CompletedProcess:
    """The CLI's human output (what reaches a terminal)."""
    return subprocess.run(
        [sys.executable, "-m", "node.cli", "--home", str(home), *args],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


async def test_the_cli_sends_offline_lists_and_fetches(fed, tmp_path):
    alice, bob = tmp_path / "alice", tmp_path / "bob"
    for home, i in ((alice, 0), (bob, 1)):
        assert ntm(home, "keygen").returncode == 0
        reg = await asyncio.to_thread(ntm, home, "register", *fed.dc_args(i))
        assert reg.returncode == 0, reg.stderr
    bob_id = json.loads(ntm(bob, "id").stdout)["node"]
    (tmp_path / "note.txt").write_bytes(MARKER + b" in a file")
    sent = await asyncio.to_thread(
        ntm, alice, "send", bob_id, "--offline", "--file", str(tmp_path / "note.txt"), "--app", "notes"
    )
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
    for args, code in (
        (("send", bob_id, "--offline"), 2),
        (("send", bob_id, "--offline", "--file", "/nonexistent"), 2),
        (("send", bob_id, "x", "--offline", "--notice", "n" * 141), 2),
    ):
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


async def test_a_strangers_invitation_and_items_wait_a_friends_land(fed, tmp_path):
    """Adversary: a stranger (any registered node) seals items for bob at a Cache Server, one with
    terminal escape sequences in its notice, and invites bob to its group. Nothing of it lands: its
    items wait at the CS (listed by `ntm inbox` with sender and size, on its quota), its invitation
    admits nobody. Bob's friend (on his allow list) gets items and an invitation through as before,
    and bob can still fetch the stranger's items when he asks, printed with control characters escaped."""
    bob_home = tmp_path / "bob"
    assert ntm(bob_home, "keygen").returncode == 0
    assert (await asyncio.to_thread(ntm, bob_home, "register", *fed.dc_args(1))).returncode == 0
    bob_id = keys.parse_node_id(json.loads(ntm(bob_home, "id").stdout)["node"])
    mallory, friend = await registered(fed, 0), await registered(fed, 0)
    assert ntm(bob_home, "allow", keys.checksum(keys.node_id_of(friend))).returncode == 0
    daemon = subprocess.Popen(
        [sys.executable, "-m", "node.cli", "--home", str(bob_home), "--json", "up", "--no-tun", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    try:
        line = await asyncio.wait_for(asyncio.to_thread(daemon.stdout.readline), 30)
        assert json.loads(line)["event"] == "up"
        async with raw_http() as http, http.get(f"{fed.urls[1]}/v1/nodes/{keys.checksum(bob_id)}") as r:
            bob_pub = bytes.fromhex((await r.json())["pubkey"])

        async def put(sender, meta: seal.Meta, content: bytes) -> str:
            sealer = seal.Sealer(sender, {bob_id: bob_pub}, meta, int(time.time() * 1000))
            async with CsClient(sender, fed.cs_url(0)) as c:
                return (await c.put(sealer, bytes_chunks(content), len(content)))["item"]

        def invitation(admin, name: str) -> bytes:
            return (
                b"C"
                + json.dumps(
                    {
                        "t": "invite",
                        "gid": os.urandom(16).hex(),
                        "name": name,
                        "admin": keys.checksum(keys.node_id_of(admin)),
                        "gms": fed.urls[0],
                    }
                ).encode()
            )

        big = [
            await put(mallory, seal.Meta("test", notice="fill the disk"), MARKER + os.urandom(1 << 20))
            for _ in range(2)
        ]
        hostile = await put(mallory, seal.Meta("test", notice="\x1b]0;pwned\x07\x1b[2Jlooks legit"), MARKER)
        strange_invite = await put(mallory, seal.Meta("ntm-group"), invitation(mallory, "free-stuff"))
        kept = await put(friend, seal.Meta("test", notice="from a friend"), MARKER)
        await put(friend, seal.Meta("ntm-group"), invitation(friend, "friends"))

        async def invitations() -> list[dict]:
            return (await control.call(bob_home, "group.invitations", {}))["invitations"]

        await until(lambda: (bob_home / "inbox" / kept).exists(), timeout=20)
        got = await until(invitations, timeout=20)
        assert [(g["name"], g["admin"], g["admitted"]) for g in got] == [
            ("friends", keys.checksum(keys.node_id_of(friend)), True)
        ]
        # the stranger's items: not fetched, still at the Cache Server (on its quota), listed with sender and size
        strangers = [*big, hostile, strange_invite]
        assert not any((bob_home / "inbox" / i).exists() for i in strangers)
        assert all(is_stored(fed, 0, i) for i in strangers)
        listed = json.loads((await asyncio.to_thread(ntm, bob_home, "inbox")).stdout)
        waiting = {w["item"]: w for w in listed["waiting"]}
        assert set(strangers) <= set(waiting) and kept not in waiting
        assert {waiting[i]["sender"] for i in strangers} == {keys.checksum(keys.node_id_of(mallory))}
        assert all(waiting[i]["size"] > 1 << 20 for i in big)
        status = json.loads(ntm(bob_home, "status").stdout)["daemon"]["inbox"]
        assert status["held"]["not_admitted"] >= len(strangers)

        # bob asks for the stranger's invitation and hostile item: they land, and admit nobody
        fetched = await asyncio.to_thread(ntm_text, bob_home, "inbox", "fetch", strange_invite, hostile)
        assert fetched.returncode == 0, fetched.stderr
        names = {g["name"]: g for g in await invitations()}
        assert set(names) == {"friends", "free-stuff"} and names["free-stuff"]["admitted"] is False
        assert (bob_home / "inbox" / hostile).exists()
        text = (await asyncio.to_thread(ntm_text, bob_home, "inbox")).stdout
        assert "\x1b" not in text and "\x07" not in text and "\\x1b]0;pwned\\x07\\x1b[2Jlooks legit" in text
        shown = (await asyncio.to_thread(ntm_text, bob_home, "group", "invitations")).stdout
        assert "free-stuff" in shown and "not on your allow list" in shown
        declined = await asyncio.to_thread(ntm_text, bob_home, "group", "decline", "free-stuff")
        assert declined.returncode == 0, declined.stderr
        assert [g["name"] for g in await invitations()] == ["friends"]
    finally:
        daemon.terminate()
        daemon.wait(10)


async def test_a_notice_not_signed_by_an_active_dc_is_refused(fed):
    bob = await registered(fed, 1)
    body = messages.encode(
        messages.CsNotice(
            node=keys.checksum(keys.node_id_of(bob)),
            item="00" * 16,
            cs="http://evil.example",
            sender=keys.checksum(bytes(20)),
            size=1,
            created=1,
        )
    )

    async def refused(http) -> float:
        async with http.get(fed.urls[1] + "/metrics") as r:
            return next(
                float(ln.split()[1])
                for ln in (await r.text()).splitlines()
                if ln.startswith("ntm_dc_cs_notices_refused_total ")
            )

    async with raw_http() as http:
        before = await refused(http)
        forged = envelope.seal(keys.generate(), messages.CS_NOTICE, body, int(time.time() * 1000))
        async with http.post(fed.urls[1] + "/v1/federation/cs-notice", json=forged) as r:
            assert r.status == 403
        assert await refused(http) == before + 1


async def test_an_embedded_node_leaves_an_item_for_an_offline_peer(fed, tmp_path):
    """AppNode.send_offline: sealed at our DC's CS for a peer that is offline; it gets it with
    next_item() once online at another DC. A node the federation does not know is refused
    (NodeError with the DC's reason) and nothing is stored."""
    alice, bob = await registered(fed, 0), await registered(fed, 1)
    content = b"see you tomorrow " + MARKER
    async with await AppNode.start(alice, fed.urls[0], host="127.0.0.1", port=0) as a:
        before = stored_items(fed, 0)
        with pytest.raises(NodeError) as refused:
            await a.send_offline(keys.node_id_of(keys.generate()), content)
        assert refused.value.code == "unknown_node" and stored_items(fed, 0) == before
        item = await a.send_offline(keys.node_id_of(bob), content, app="chat", notice="from alice")
    assert is_stored(fed, 0, item) and not cs_files_contain(fed, 0, MARKER)
    async with await AppNode.start(bob, fed.urls[1], host="127.0.0.1", port=0, inbox=tmp_path / "bob") as b:
        got = await asyncio.wait_for(b.next_item(), 20)
    assert (got.item, got.sender, got.meta.app_id, got.meta.notice) == (
        item,
        keys.node_id_of(alice),
        "chat",
        "from alice",
    )
    assert got.path.read_bytes() == content
