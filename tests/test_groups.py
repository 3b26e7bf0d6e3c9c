"""Group keys end to end (docs/PROTOCOL.md §13), real processes: anvil, two DCs each with a Cache
Server, four members running `ntm up` (two at each DC), every step through the `ntm group` CLI.
Assertions about keys use the real ciphertext of the run and the real files (members' state, the
GMS's SQLite database)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

from daemon import keystore
from node.cs_client import CsClient, bytes_chunks
from node import control
from node.peers import PeerBook
from node.groups import CONTROL, GROUP_APP, MSG
from ntm import envelope, group, keys, seal
from ntm.group import GroupError, GroupMessage
from labkit.dcnet import DcNet, cs_federation, raw_http, register, until
from labkit import nodeproc
from labkit.nodeproc import read_json_line
from tests.test_cli_tunnel import stop

pytestmark = pytest.mark.asyncio(loop_scope="module")


@dataclass
class Member:
    name: str
    home: Path
    id: str
    proc: subprocess.Popen | None = None

    def key(self):
        return keystore.load_keystore(self.home / "key.json", "")

    def state(self, gid: str) -> dict:
        return json.loads((self.home / "groups" / f"{gid}.json").read_text())

    def log(self, gid: str) -> list[dict]:
        path = self.home / "groups" / f"{gid}.messages.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def run(home: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "node.cli", "--home", str(home), *args],
        capture_output=True,
        text=True,
        timeout=90,
        stdin=subprocess.DEVNULL,
    )


async def cli(m: Member, *args: str) -> dict:
    """`ntm group ...` with --json after the subcommand; must succeed."""
    proc = await asyncio.to_thread(run, m.home, "group", *args, "--json")
    assert proc.returncode == 0, f"{m.name}: ntm group {' '.join(args)}: {proc.stderr}"
    return json.loads(proc.stdout)


async def ctl(m: Member, request: str, **body) -> dict:
    """A group request straight to `m`'s daemon (its control socket): what the CLI sends, without
    starting a Python process each time. The first test goes through the CLI itself."""
    return await control.call(m.home, f"group.{request}", body, timeout=90)


async def refused(m: Member, *args: str) -> str:
    proc = await asyncio.to_thread(run, m.home, "group", *args)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) == 1, proc.stderr
    return proc.stderr


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fed(tmp_path_factory):
    """anvil, two DCs with Cache Servers, and four members up: alice and bob at dc1, carol and dave at dc2."""
    workdir = tmp_path_factory.mktemp("groups")
    async with cs_federation(workdir) as net:

        async def member(i: int, name: str) -> Member:
            home = workdir / name
            nid = json.loads((await asyncio.to_thread(run, home, "--json", "keygen")).stdout)["node"]
            reg = await asyncio.to_thread(run, home, "register", *net.dc_args(i // 2))
            assert reg.returncode == 0, reg.stderr
            return Member(name, home, nid)

        members = await asyncio.gather(*(member(i, n) for i, n in enumerate(("alice", "bob", "carol", "dave"))))
        for m in members:  # they know each other: invitations are consented to (§12.1), items fetched
            book = PeerBook.load(m.home)
            book.allow.update(keys.parse_node_id(o.id) for o in members if o is not m)
            book.save(m.home)
        try:
            await asyncio.gather(*(asyncio.to_thread(start_daemon, m) for m in members))
            yield net, members
        finally:
            for m in members:
                if m.proc is not None:
                    stop(m.proc)


async def group_with(admin: Member, name: str, others: list[Member], gid: str | None = None) -> str:
    """`admin` creates group `name` (unless `gid` says it did), invites `others`, they accept."""
    gid = gid or (await ctl(admin, "create", name=name))["gid"]
    for m in others:
        inv = await ctl(admin, "invite", group=gid, node=m.id)
        assert inv["invited"] == m.id and inv["via"] in ("tunnel", "cs")

    for m in others:  # the invitation reaches each (over a tunnel or through a Cache Server)

        async def invited(m=m):
            return any(g["gid"] == gid for g in (await ctl(m, "members"))["groups"])

        await until(invited, timeout=30, interval=0.2)
        joined = await ctl(m, "accept", group=gid)
        assert joined["status"] == "member"
    return gid


async def received(m: Member, gid: str, text: str) -> dict:
    """Wait until `m` has received `text` in group `gid`."""

    async def got():
        return next((e for e in m.log(gid) if e["text"] == text), None)

    return await until(got, timeout=30, interval=0.2)


def opens_with(wire: bytes, st: dict, rn2s: list[bytes] | None = None) -> bool:
    """Can anything in a member's state (its RN1 generations, the RN2 it got; or, colluding with the
    GMS, every RN2 the GMS ever had) open `wire`?"""
    msg = GroupMessage.decode(wire)
    gid = bytes.fromhex(st["gid"])
    rn1s = [bytes.fromhex(v) for v in st["rn1"].values()]
    pool = rn2s if rn2s is not None else [bytes.fromhex(e["rn2"]) for e in st["epochs"].values()]
    for rn1 in rn1s:
        for rn2 in pool:
            try:
                msg.decrypt(group.group_key(rn1, rn2, gid, st["name"], msg.epoch))
                return True
            except GroupError:
                pass
    return False


def gms_rows(net: DcNet, gid: str) -> list[tuple]:
    with sqlite3.connect(net.workdir / "dc1.sqlite") as db:
        return db.execute("SELECT epoch, rn2, rn1_gen FROM group_epochs WHERE gid=?", (bytes.fromhex(gid),)).fetchall()


async def put_item(net: DcNet, sender_key, recipient: Member, payload: bytes) -> str:
    """Hand `recipient` a group payload through a Cache Server, as any registered node can; a
    sender it does not admit waits there until fetched (`fetch_held`)."""
    pub = bytes.fromhex(recipient_pub(recipient))
    sealer = seal.Sealer(
        sender_key, {keys.parse_node_id(recipient.id): pub}, seal.Meta(GROUP_APP), int(time.time() * 1000)
    )
    async with CsClient(sender_key, net.cs_url(0)) as c:
        return (await c.put(sealer, bytes_chunks(payload), len(payload)))["item"]


async def fetch_held(m: Member, *items: str) -> None:
    """`ntm inbox fetch`: the user takes in a stranger's items (they waited at the Cache Server)."""
    got = (await control.call(m.home, "inbox.fetch", {"items": list(items)}, timeout=90))["fetched"]
    assert [g["item"] for g in got if "error" not in g] == list(items), got


def recipient_pub(m: Member) -> str:
    return json.loads(run(m.home, "--json", "id").stdout)["pubkey"]


async def refusals(m: Member) -> dict:
    proc = await asyncio.to_thread(run, m.home, "--json", "status")
    return json.loads(proc.stdout)["daemon"]["group_refusals"]


async def test_four_members_across_two_dcs_join_leave_and_keys(fed):
    net, (alice, bob, carol, dave) = fed
    created = await cli(alice, "create", "team")
    assert (created["epoch"], created["members"], created["admin"]) == (1, [alice.id], alice.id)
    gid = await group_with(alice, "team", [bob, carol], created["gid"])
    sent = await cli(alice, "send", gid, "m1: before dave")
    assert sent["epoch"] == 3 and sorted(sent["tunnel"] + sent["cs"]) == sorted([bob.id, carol.id])
    for m in (bob, carol):
        e = await received(m, gid, "m1: before dave")
        assert e["sender"] == alice.id and e["epoch"] == 3

    # dave joins (epoch 4): he gets no key of epoch 3, so m1 stays closed to him
    await cli(alice, "invite", gid, dave.id)
    await until(lambda: (dave.home / "groups" / f"{gid}.json").exists(), timeout=30, interval=0.3)
    assert (await cli(dave, "accept", gid))["epoch"] == 4
    wire1 = bytes.fromhex((await received(bob, gid, "m1: before dave"))["wire"])
    assert opens_with(wire1, bob.state(gid)) and not opens_with(wire1, dave.state(gid))
    assert min(int(e) for e in dave.state(gid)["epochs"]) == 4

    # a member at the other DC writes; everyone of epoch 4 reads it
    sent = await cli(carol, "send", gid, "m2: four of us")
    assert sent["epoch"] == 4 and sorted(sent["tunnel"] + sent["cs"]) == sorted([alice.id, bob.id, dave.id])
    for m in (alice, bob, dave):
        assert (await received(m, gid, "m2: four of us"))["sender"] == carol.id
    got = await cli(dave, "recv", gid)
    assert [e["text"] for e in got["messages"]] == ["m2: four of us"]  # and recv hands it out once
    assert (await cli(dave, "recv", gid))["messages"] == []

    # bob is removed: epoch 5 and a new RN1 generation that only alice, carol and dave get
    removed = await cli(alice, "remove", gid, bob.id)
    assert (removed["epoch"], removed["rn1_gen"]) == (5, 2) and bob.id not in removed["members"]
    for m in (carol, dave):
        await until(lambda m=m: "2" in m.state(gid)["rn1"], timeout=30, interval=0.3)
    sent = await cli(alice, "send", gid, "m3: without bob")
    assert sent["epoch"] == 5 and sorted(sent["tunnel"] + sent["cs"]) == sorted([carol.id, dave.id])
    wire3 = bytes.fromhex((await received(carol, gid, "m3: without bob"))["wire"])
    await received(dave, gid, "m3: without bob")
    assert (await cli(bob, "members", gid))["status"] == "removed"
    assert not opens_with(wire3, bob.state(gid))
    # beyond the seed: bob colluding with the GMS (every RN2 in its database) still cannot read epoch 5
    all_rn2 = [row[1] for row in gms_rows(net, gid)]
    assert opens_with(wire3, carol.state(gid), all_rn2)  # (the same search finds it with carol's RN1)
    assert not opens_with(wire3, bob.state(gid), all_rn2)
    assert "m3: without bob" not in [e["text"] for e in bob.log(gid)]
    # bob still holds epoch 4's key and writes under it after his removal: carol refuses it
    st = bob.state(gid)
    ep4 = st["epochs"]["4"]
    gk4 = group.group_key(
        bytes.fromhex(st["rn1"][str(ep4["rn1_gen"])]), bytes.fromhex(ep4["rn2"]), bytes.fromhex(gid), st["name"], 4
    )
    late = group.seal_message(bob.key(), gk4, bytes.fromhex(gid), 4, st["counter"] + 100, b"bob, removed, writes")
    await put_item(net, bob.key(), carol, MSG + late.encode())

    async def carol_refused_bob():
        return (await refusals(carol)).get("removed", 0) >= 1

    await until(carol_refused_bob, timeout=30, interval=0.3)
    assert "bob, removed, writes" not in [e["text"] for e in carol.log(gid)]
    # a removed member's comeback is refused by the GMS
    assert "is not invited" in await refused(bob, "accept", gid)

    # the GMS's store never held RN1 or any group key the members derived
    needles = set()
    for m in (alice, bob, carol, dave):
        st = m.state(gid)
        for gen, rn1 in st["rn1"].items():
            needles.add(bytes.fromhex(rn1))
            for e, ep in st["epochs"].items():
                if str(ep["rn1_gen"]) == gen:
                    needles.add(
                        group.group_key(
                            bytes.fromhex(rn1), bytes.fromhex(ep["rn2"]), bytes.fromhex(gid), st["name"], int(e)
                        )
                    )
    assert len(needles) >= 2 + 3  # two RN1 generations, keys of epochs 3, 4, 5 at least
    for path in net.workdir.glob("dc*.sqlite*"):
        blob = path.read_bytes()
        for n in needles:
            assert n not in blob and n.hex().encode() not in blob, f"{path.name} holds a member secret"


async def test_impersonation_replay_and_non_members_are_refused(fed):
    net, (alice, bob, carol, dave) = fed
    gid = await group_with(alice, "guarded", [bob, carol])
    await ctl(bob, "send", group=gid, text="honest bob")
    wire = bytes.fromhex((await received(alice, gid, "honest bob"))["wire"])
    st = bob.state(gid)
    epoch = st["epoch"]
    ep = st["epochs"][str(epoch)]
    gk = group.group_key(
        bytes.fromhex(st["rn1"][str(ep["rn1_gen"])]), bytes.fromhex(ep["rn2"]), bytes.fromhex(gid), st["name"], epoch
    )
    bob_key = bob.key()
    # bob (a member, he knows GK) writes as carol: the signature gives him away
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    carol_id = keys.parse_node_id(carol.id)
    unsigned = GroupMessage(bytes.fromhex(gid), epoch, carol_id, 99, b"", b"")
    body = AESGCM(group.message_key(gk, carol_id)).encrypt(
        bytes(4) + (99).to_bytes(8, "big"), b"carol says pay bob", unsigned.header
    )
    forged = GroupMessage(bytes.fromhex(gid), epoch, carol_id, 99, body, b"")
    forged = GroupMessage(forged.gid, epoch, carol_id, 99, body, keys.sign_digest(bob_key, forged.digest()))
    await put_item(net, bob_key, alice, MSG + forged.encode())
    # an old message again (a Cache Server or a peer replaying it)
    await put_item(net, bob_key, alice, MSG + wire)
    # a registered node that is no member: its own signature, no key
    eve = keys.generate()
    await register(net.urls[1], eve)
    eve_msg = group.seal_message(eve, group.new_rn(), bytes.fromhex(gid), epoch, 0, b"let me in")
    await fetch_held(alice, await put_item(net, eve, alice, MSG + eve_msg.encode()))
    # and eve's invitation "from the admin", and RN1 "from the admin"
    await fetch_held(
        carol,
        await put_item(
            net, eve, carol, CONTROL + json.dumps({"t": "rn1", "gid": gid, "gen": 9, "rn1": "00" * 32}).encode()
        ),
    )

    async def all_refused():
        r = await refusals(alice)
        return r.get("impersonation", 0) >= 1 and r.get("replay", 0) >= 1 and r.get("not_member", 0) >= 1

    await until(all_refused, timeout=30, interval=0.5)

    # and an RN1 message from the admin that does not parse: refused, the daemon carries on
    await put_item(
        net, alice.key(), carol, CONTROL + json.dumps({"t": "rn1", "gid": gid, "gen": "x", "rn1": "zz"}).encode()
    )

    async def carol_refused():
        r = await refusals(carol)
        return r.get("not_admin", 0) >= 1 and r.get("malformed", 0) >= 1

    await until(carol_refused, timeout=30, interval=0.5)
    assert "9" not in carol.state(gid)["rn1"] and carol.proc.poll() is None
    texts = [e["text"] for e in alice.log(gid)]
    assert texts.count("honest bob") == 1 and "carol says pay bob" not in texts and "let me in" not in texts

    # eve at the GMS: no acceptance without an invitation, no state, no invitations of her own
    async with raw_http() as http:
        for kind, body in (
            ("group.accept", {"gid": gid}),
            ("group.state", {"gid": gid}),
            ("group.invite", {"gid": gid, "node": keys.checksum(keys.node_id_of(eve))}),
        ):
            env = envelope.seal(eve, kind, body, int(time.time() * 1000))
            async with http.post(net.urls[0] + "/v1/groups", json=env) as r:
                assert r.status == 403, await r.text()
                assert (await r.json())["error"] in ("not_invited", "not_member", "not_admin")
    assert len(gms_rows(net, gid)) == 3  # eve changed nothing: epochs 1-3 (create, bob, carol)


async def test_kill9_of_the_gms_during_a_rekey_converges(fed):
    net, (alice, bob, carol, dave) = fed
    gid = await group_with(alice, "crashy", [bob, carol, dave])
    before = max(r[0] for r in gms_rows(net, gid))
    # remove dave and kill the GMS (dc1) while that rekey is in flight: the DC is stopped first
    # (SIGSTOP), so the request is surely under way when SIGKILL comes
    gms = net.dcs[0]
    os.kill(gms.pid, signal.SIGSTOP)
    remove = subprocess.Popen(
        [sys.executable, "-m", "node.cli", "--home", str(alice.home), "group", "remove", gid, dave.id],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    await until(lambda: alice.state(gid)["pending_remove"] is not None, timeout=30, interval=0.05)
    await asyncio.sleep(0.3)
    gms.kill()
    out, err = await asyncio.to_thread(remove.communicate, timeout=60)
    assert remove.returncode == 1 and "cannot reach the GMS" in err and len(err.splitlines()) == 1, err
    assert max(r[0] for r in gms_rows(net, gid)) == before  # the rekey never committed
    net.start_dc(0)  # same key, port and SQLite file

    async def converged():
        views = [await ctl(m, "members", group=gid) for m in (alice, bob, carol)]
        epochs = {v["epoch"] for v in views}
        gms_epoch = max(r[0] for r in gms_rows(net, gid))
        return (
            len(epochs) == 1
            and epochs == {gms_epoch}
            and views[0]["pending_removal"] is None
            and all(v["has_key"] for v in views)
            and views
        )

    views = await until(converged, timeout=60, interval=1.0)
    assert views[0]["epoch"] == before + 1 and dave.id not in views[0]["members"]
    assert (await ctl(dave, "members", group=gid))["status"] == "removed"
    sent = await ctl(carol, "send", group=gid, text="after the crash")
    assert sorted(sent["tunnel"] + sent["cs"]) == sorted([alice.id, bob.id])
    for m in (alice, bob):
        await received(m, gid, "after the crash")


def start_daemon(m: Member) -> None:
    m.proc = nodeproc.start_up(m.home)
    assert read_json_line(m.proc, timeout=60)["event"] == "up"  # four start at once: headroom for a loaded machine


async def test_a_member_offline_during_a_rekey_catches_up_at_its_next_start(fed):
    net, (alice, bob, carol, dave) = fed
    gid = await group_with(alice, "away", [bob, carol])
    await ctl(alice, "invite", group=gid, node=dave.id)  # an invitation withdrawn: no new epoch, no new RN1
    withdrawn = await ctl(alice, "remove", group=gid, node=dave.id)
    assert (withdrawn["epoch"], withdrawn["rn1_gen"]) == (3, 1)
    stop(carol.proc)  # carol is offline while bob is removed and alice writes
    removed = await ctl(alice, "remove", group=gid, node=bob.id)
    assert (removed["epoch"], removed["rn1_gen"]) == (4, 2)
    sent = await ctl(alice, "send", group=gid, text="while you were away")
    assert sent["cs"] == [carol.id] and sent["epoch"] == removed["epoch"]
    assert str(removed["rn1_gen"]) not in carol.state(gid)["rn1"]
    await asyncio.to_thread(start_daemon, carol)  # the Cache Server sweep brings RN1 and the message, the GMS RN2
    e = await received(carol, gid, "while you were away")
    assert e["epoch"] == removed["epoch"] and e["sender"] == alice.id
    view = await ctl(carol, "members", group=gid)
    assert view["epoch"] == removed["epoch"] and view["has_key"] and bob.id not in view["members"]
