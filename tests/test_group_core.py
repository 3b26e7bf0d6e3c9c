"""Group keys (docs/PROTOCOL.md §13): the pure core (ntm/group.py) with its test vectors and
refusals, and the GMS (dc/groups.py) on a real SQLite file."""

from __future__ import annotations

import hashlib
import sqlite3
import time

import pytest
from hypothesis import given, settings, strategies as st

from dc.groups import EPOCHS_KEPT, GroupRefused, GroupService
from ntm import envelope, group, keys
from ntm.errors import ParseError, SignatureError
from ntm.group import GroupError, GroupMessage
from tests.fakes import FakeClock

RN1, RN2, GID = bytes([0x11]) * 32, bytes([0x22]) * 32, bytes([0x33]) * 16
SENDER = keys.private_key(bytes([1]) * 32)
RECIPIENT = keys.private_key(bytes([2]) * 32)
EPH = keys.private_key(bytes([3]) * 32)
GK = bytes.fromhex("5e5a3a787a407dd4554d48acd2838a6a73446b65fcba3601c6d9354ecdd7c999")


def test_vector():
    """The values docs/PROTOCOL.md §13 prints."""
    assert group.group_key(RN1, RN2, GID, "team", 3) == GK
    assert (
        group.message_key(GK, keys.node_id_of(SENDER)).hex()
        == "187d0f838a10f5f6af2da8a3daceb9a47433dc7d7bd51748e9c96ba440308ffb"
    )
    wire = group.seal_message(SENDER, GK, GID, 3, 7, b"hello, group").encode()
    assert len(wire) == 142
    assert hashlib.sha256(wire).hexdigest() == "308ffff9816cb83a0f6d11fd0943e43a20efb42c931ba4d87a07375f17cd6a77"
    wrapped = group.wrap_secret(RN2, keys.public_bytes(RECIPIENT), GID, 3, EPH)
    assert wrapped.hex() == (
        "02531fe6068134503d2723133227c867ac8fa6c83c537e9a44c3c5bdbdcb1fe337"
        "04f8b6e84d1aad68f7267505b9fb0edf9adf7b5e63632a35d6bc93e2aa04cb95"
        "48908257087710149276d1e302876124"
    )
    assert group.unwrap_secret(RECIPIENT, wrapped, GID, 3) == RN2


def test_every_input_changes_the_key():
    base = group.group_key(RN1, RN2, GID, "team", 3)
    others = [
        group.group_key(bytes(32), RN2, GID, "team", 3),
        group.group_key(RN1, bytes(32), GID, "team", 3),
        group.group_key(RN1, RN2, bytes(16), "team", 3),
        group.group_key(RN1, RN2, GID, "teams", 3),
        group.group_key(RN1, RN2, GID, "team", 4),
    ]
    assert len({base, *others}) == 6
    with pytest.raises(ValueError):
        group.group_key(RN1[:31], RN2, GID, "team", 3)


def test_message_round_trip_and_refusals():
    msg = group.seal_message(SENDER, GK, GID, 3, 7, b"hello, group")
    got = GroupMessage.decode(msg.encode())
    got.check_signature()
    assert got.decrypt(GK) == b"hello, group" and got.sender == keys.node_id_of(SENDER)
    # another epoch's key (a removed member's, a new member's) does not open it
    with pytest.raises(GroupError) as e:
        got.decrypt(group.group_key(RN1, RN2, GID, "team", 4))
    assert e.value.code == "undecryptable"
    # any flipped byte: the signature (header, body) or the tag (signature bytes) catches it
    wire = bytearray(msg.encode())
    for i in range(len(wire)):
        bad = bytearray(wire)
        bad[i] ^= 1
        with pytest.raises(GroupError):
            m = GroupMessage.decode(bytes(bad))
            m.check_signature()
            m.decrypt(GK)
    for size in (0, group.HEADER_LEN + 16 + 64, group.HEADER_LEN + group.MAX_TEXT + 16 + 65 + 1):
        with pytest.raises(GroupError, match="bytes"):
            GroupMessage.decode(bytes(size))
    with pytest.raises(GroupError, match="version"):
        GroupMessage.decode(b"\x02" + msg.encode()[1:])
    with pytest.raises(ValueError):
        group.seal_message(SENDER, GK, GID, 3, 8, bytes(group.MAX_TEXT + 1))


def test_a_member_cannot_speak_as_another():
    """Mallory knows GK (a member) and encrypts under Bob's message key, naming Bob as sender."""
    mallory, bob = keys.generate(), keys.node_id_of(RECIPIENT)
    real = group.seal_message(mallory, GK, GID, 3, 1, b"pay mallory")
    forged = GroupMessage(GID, 3, bob, 1, b"", b"")
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    body = AESGCM(group.message_key(GK, bob)).encrypt(bytes(4) + (1).to_bytes(8, "big"), b"pay mallory", forged.header)
    forged = GroupMessage(
        GID, 3, bob, 1, body, keys.sign_digest(mallory, GroupMessage(GID, 3, bob, 1, body, b"").digest())
    )
    with pytest.raises(GroupError) as e:
        GroupMessage.decode(forged.encode()).check_signature()
    assert e.value.code == "impersonation"
    # the same body with Mallory's own signature swapped in: still not Bob's
    swapped = GroupMessage(GID, 3, bob, 1, real.body, real.sig)
    with pytest.raises(GroupError):
        swapped.check_signature()
    high_s = bytearray(real.sig)
    s = keys.SECP256K1_N - int.from_bytes(real.sig[32:64])
    high_s[32:64] = s.to_bytes(32)
    high_s[64] ^= 1
    with pytest.raises(GroupError) as e:
        GroupMessage(GID, 3, real.sender, 1, real.body, bytes(high_s)).check_signature()
    assert e.value.code == "bad_signature"


def test_a_removed_member_cannot_write_under_its_last_epoch():
    """Bob, removed at epoch 5, still holds the key of epoch 4 and seals under it: the members who know
    epoch 5 refuse him. A member of every later epoch (one whose GMS was unreachable and sent under
    an older epoch), and a member who left and joined again, are still heard."""
    alice, bob, carol = (keys.node_id_of(keys.generate()) for _ in range(3))
    epochs = {3: {alice, bob}, 4: {alice, bob, carol}, 5: {alice, carol}}
    with pytest.raises(GroupError) as e:
        group.check_still_member(epochs, 4, bob)
    assert e.value.code == "removed" and str(e.value) == (
        f"{keys.checksum(bob)} is no member of epoch 5, after epoch 4: removed or departed, its messages are refused"
    )
    with pytest.raises(GroupError):
        group.check_still_member(epochs, 3, bob)
    group.check_still_member(epochs, 3, alice)
    group.check_still_member(epochs, 5, carol)
    group.check_still_member({**epochs, 6: {alice, bob, carol}}, 6, bob)  # invited back: his new epoch counts
    group.check_still_member({4: {alice, bob}}, 4, bob)  # the receiver has not heard of the removal yet
    # only epochs after the message's count: membership of its own epoch is the caller's check
    # (groupstate refuses that as `not_member`, a different answer from `removed`)
    group.check_still_member({4: {alice}, 5: {alice, bob}}, 4, bob)


def test_replay_window_drops_repeats_and_persists():
    r = group.Replay()
    msgs = [group.seal_message(SENDER, GK, GID, 3, n, b"x") for n in (5, 3, 4)]
    for m in msgs:
        r.check(m)
        r.update(m)
    for m in msgs:
        with pytest.raises(GroupError) as e:
            r.check(m)
        assert e.value.code == "replay"
    r.check(group.seal_message(SENDER, GK, GID, 4, 5, b"x"))  # another epoch: its own window
    again = group.Replay.load(r.dump())  # after a restart
    with pytest.raises(GroupError):
        again.check(msgs[0])
    old = group.seal_message(SENDER, GK, GID, 3, 5 + group.REPLAY_WINDOW + 1, b"x")
    again.update(old)
    with pytest.raises(GroupError, match="too_old"):
        again.check(group.seal_message(SENDER, GK, GID, 3, 2, b"x"))


def test_wraps_open_only_for_their_member_and_epoch():
    wrapped = group.wrap_secret(RN2, keys.public_bytes(RECIPIENT), GID, 3)
    for key, gid, epoch in ((SENDER, GID, 3), (RECIPIENT, GID, 4), (RECIPIENT, bytes(16), 3)):
        with pytest.raises(GroupError) as e:
            group.unwrap_secret(key, wrapped, gid, epoch)
        assert e.value.code == "bad_wrap"
    with pytest.raises(GroupError):
        group.unwrap_secret(RECIPIENT, wrapped[:-1], GID, 3)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=1300))
def test_decode_never_raises_anything_else(data):
    try:
        GroupMessage.decode(data).check_signature()
    except GroupError:
        pass


def test_names():
    for ok in ("team", "a", "ops-2026.eu_west", "x" * 64):
        assert group.check_name(ok) == ok
    for bad in ("", "-x", "x" * 65, "a b", "é", "a/b", None):
        with pytest.raises(ValueError):
            group.check_name(bad)


# --- the GMS on a real SQLite file ---------------------------------------------------------------
class Gms:
    """GroupService with registered nodes chosen by the test and signed requests."""

    def __init__(self, path) -> None:
        self.registered: set[bytes] = set()
        self.revoked: set[bytes] = set()
        self.clock = FakeClock(wall=time.time())
        self.db = sqlite3.connect(path, isolation_level=None)
        self.svc = GroupService(self.db, lambda n: (1 if n in self.registered else 0, n in self.revoked), self.clock)

    def node(self) -> keys.coincurve.PrivateKey:
        k = keys.generate()
        self.registered.add(keys.node_id_of(k))
        return k

    def ask(self, key, kind: str, **body) -> dict:
        body = {
            k: (keys.checksum(v) if isinstance(v, bytes) and len(v) == 20 else v.hex() if isinstance(v, bytes) else v)
            for k, v in body.items()
        }
        return self.svc.handle(envelope.seal(key, kind, body, self.clock.wall_ms()))


@pytest.fixture
def gms(tmp_path):
    g = Gms(tmp_path / "dc.sqlite")
    yield g
    g.db.close()


def nid(k) -> bytes:
    return keys.node_id_of(k)


def test_gms_membership_epochs_and_wraps(gms):
    admin, bob, carol = gms.node(), gms.node(), gms.node()
    gid = group.new_gid()
    v = gms.ask(admin, "group.create", gid=gid, name="team")
    assert (v["epoch"], v["rn1_gen"], v["members"]) == (1, 1, ["0x" + nid(admin).hex()])
    rn2_1 = group.unwrap_secret(admin, bytes.fromhex(v["epochs"][0]["rn2"]), gid, 1)
    assert gms.ask(admin, "group.invite", gid=gid, node=nid(bob))["invited"] == ["0x" + nid(bob).hex()]
    v = gms.ask(bob, "group.accept", gid=gid)
    assert (
        v["epoch"] == 2 and v["invited"] == [] and [e["epoch"] for e in v["epochs"]] == [2]
    )  # nothing from before it joined
    rn2_2 = group.unwrap_secret(bob, bytes.fromhex(v["epochs"][0]["rn2"]), gid, 2)
    assert rn2_2 != rn2_1
    assert gms.ask(bob, "group.accept", gid=gid)["epoch"] == 2  # again (answer lost): same epoch
    gms.ask(admin, "group.invite", gid=gid, node=nid(carol))
    gms.ask(carol, "group.accept", gid=gid)
    v = gms.ask(admin, "group.remove", gid=gid, node=nid(bob), rn1_gen=2)
    assert (v["epoch"], v["rn1_gen"]) == (4, 2) and "0x" + nid(bob).hex() not in v["members"]
    assert gms.ask(admin, "group.remove", gid=gid, node=nid(bob), rn1_gen=2)["epoch"] == 4  # repeated: no new epoch
    with pytest.raises(GroupRefused) as e:
        gms.ask(bob, "group.state", gid=gid)
    assert e.value.code == "not_member"
    assert gms.ask(carol, "group.leave", gid=gid) == {"gid": gid.hex(), "left": True}
    v = gms.ask(admin, "group.state", gid=gid, since=0)
    assert (v["epoch"], v["rn1_gen"]) == (5, 3)  # a departure starts an RN1 generation too
    assert [e["epoch"] for e in v["epochs"]] == [1, 2, 3, 4, 5]
    assert [e["rn1_gen"] for e in v["epochs"]] == [1, 1, 1, 2, 3]


def test_gms_refusals_change_nothing(gms):
    admin, bob, mallory = gms.node(), gms.node(), gms.node()
    gid = group.new_gid()
    gms.ask(admin, "group.create", gid=gid, name="team")
    before = gms.db.execute("SELECT * FROM groups").fetchall()

    def refused(code, key, kind, **body):
        with pytest.raises(GroupRefused) as e:
            gms.ask(key, kind, **body)
        assert e.value.code == code

    refused("not_invited", mallory, "group.accept", gid=gid)  # a join request nobody asked for
    refused("not_admin", mallory, "group.invite", gid=gid, node=nid(mallory))
    refused("not_admin", mallory, "group.remove", gid=gid, node=nid(admin), rn1_gen=2)
    refused("not_member", mallory, "group.state", gid=gid)
    refused("not_member", mallory, "group.leave", gid=gid)
    refused("exists", mallory, "group.create", gid=gid, name="mine")
    refused("unknown_group", admin, "group.state", gid=group.new_gid())
    refused("bad_request", admin, "group.leave", gid=gid)
    gms.ask(admin, "group.invite", gid=gid, node=nid(bob))
    gms.ask(bob, "group.accept", gid=gid)
    refused("bad_request", admin, "group.remove", gid=gid, node=nid(bob), rn1_gen=5)  # skips a generation
    stranger = keys.generate()  # not registered
    refused("unregistered", stranger, "group.create", gid=group.new_gid(), name="x")
    refused("unregistered", admin, "group.invite", gid=gid, node=nid(stranger))
    gms.revoked.add(nid(bob))
    refused("revoked", bob, "group.state", gid=gid)
    with pytest.raises(ParseError):
        gms.ask(admin, "group.create", gid=group.new_gid(), name="bad name")
    with pytest.raises(ParseError):
        gms.ask(admin, "group.frobnicate", gid=gid)
    env = envelope.seal(admin, "group.state", {"gid": gid.hex()}, gms.clock.wall_ms())
    gms.svc.handle(env)
    with pytest.raises(SignatureError, match="replayed"):
        gms.svc.handle(env)
    forged = {
        **envelope.seal(admin, "group.state", {"gid": gid.hex()}, gms.clock.wall_ms()),
        "from": keys.checksum(nid(bob)),
    }
    with pytest.raises(SignatureError):
        gms.svc.handle(forged)
    assert gms.db.execute("SELECT epoch FROM groups").fetchone()[0] == 2  # only bob's accepted join moved it
    assert before[0][3] == 1


def test_gms_forgets_old_epochs(gms):
    admin, bob = gms.node(), gms.node()
    gid = group.new_gid()
    gms.ask(admin, "group.create", gid=gid, name="busy")
    for i in range(EPOCHS_KEPT + 5):
        gms.ask(admin, "group.invite", gid=gid, node=nid(bob))
        gms.ask(bob, "group.accept", gid=gid)
        gms.ask(admin, "group.remove", gid=gid, node=nid(bob), rn1_gen=i + 2)
    kept = gms.db.execute("SELECT count(*), min(epoch), max(epoch) FROM group_epochs").fetchone()
    assert kept[0] == EPOCHS_KEPT and kept[2] - kept[1] == EPOCHS_KEPT - 1


def test_edges_of_every_field():
    """Largest epoch and counter, empty and largest texts, exact length limits, and that every
    refusal names its code and says why (mutation testing found these unasserted)."""
    top_epoch, top_counter = 2**32 - 1, 2**64 - 1
    gk = group.group_key(RN1, RN2, GID, "team", top_epoch)
    assert gk != group.group_key(RN1, RN2, GID, "team", 0)
    wrapped = group.wrap_secret(RN2, keys.public_bytes(RECIPIENT), GID, top_epoch)
    assert group.unwrap_secret(RECIPIENT, wrapped, GID, top_epoch) == RN2
    for text in (b"", bytes(group.MAX_TEXT)):
        msg = group.seal_message(SENDER, gk, GID, top_epoch, top_counter, text)
        wire = msg.encode()
        assert len(wire) == group.HEADER_LEN + len(text) + group.TAG_LEN + group.SIG_LEN
        got = GroupMessage.decode(wire)
        got.check_signature()
        assert got.decrypt(gk) == text and (got.epoch, got.counter) == (top_epoch, top_counter)
    with pytest.raises(ValueError, match="^RN1 and RN2 are 32 bytes, the group ID 16$"):
        group.group_key(RN1, RN2, GID[:15], "team", 1)
    with pytest.raises(ValueError, match="at most 1024 bytes"):
        group.seal_message(SENDER, GK, GID, 3, 1, bytes(group.MAX_TEXT + 1))
    with pytest.raises(ValueError, match="1-64 letters"):
        group.check_name("")

    def refused(code: str, words: str, f, *args):
        with pytest.raises(GroupError) as e:
            f(*args)
        assert e.value.code == code and words in str(e.value)

    good = group.seal_message(SENDER, GK, GID, 3, 1, b"x").encode()
    refused("malformed", "a group message is 130..1154 bytes, got 129", GroupMessage.decode, good[:49] + good[-80:])
    refused("malformed", "got 1155", GroupMessage.decode, bytes(1155))
    refused("malformed", "version 2, expected 1", GroupMessage.decode, b"\x02" + good[1:])
    refused("bad_wrap", "is 81 bytes, got 80", group.unwrap_secret, RECIPIENT, wrapped[:-1], GID, top_epoch)
    refused(
        "bad_wrap", "does not open for this node: tag mismatch", group.unwrap_secret, SENDER, wrapped, GID, top_epoch
    )
    refused("undecryptable", "of epoch 3", GroupMessage.decode(good).decrypt, bytes(32))
    impostor = GroupMessage.decode(good)
    refused(
        "impersonation",
        "message claims to be from 0x0000000000000000000000000000000000000000 but was signed by 0x",
        GroupMessage(GID, 3, bytes(20), 1, impostor.body, impostor.sig).check_signature,
    )
    refused(
        "bad_signature",
        "group message signature: signature v is 0",
        GroupMessage(GID, 3, impostor.sender, 1, impostor.body, bytes(65)).check_signature,
    )
