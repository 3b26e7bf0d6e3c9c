"""Groups as state machines (ntm/groupstate.py) on fakes: every refusal and state change of a
member's GroupBook and of the GMS's decisions, in milliseconds (the end-to-end tests are
tests/test_groups.py). Each refusal is checked to change nothing."""

from __future__ import annotations

import copy
import json
import re

import pytest

from ntm import consent, group, groupstate as gs, keys, messages
from ntm.group import GroupError
from ntm.groupstate import CONTROL, MSG, CatchUp, Deliver, Forget, GmsGroup, GmsRefused, GroupBook, GroupState, Save
from tests.fakes import FakeClock

ADMIN, ME, BOB, MALLORY = (keys.private_key(bytes([n]) * 32) for n in (1, 2, 3, 4))
A, M, B, X = (keys.node_id_of(k) for k in (ADMIN, ME, BOB, MALLORY))
GID = bytes([0x33]) * 16
RN1 = {1: bytes([0x11]) * 32, 2: bytes([0x12]) * 32}
RN2 = {e: bytes([0x20 + e]) * 32 for e in range(1, 6)}
GMS = "https://dc.test:8330"


def hexid(n: bytes) -> str:
    return "0x" + n.hex()


def view(
    epochs: list[tuple[int, int, list[bytes]]],
    me: keys.coincurve.PrivateKey = ME,
    gid: bytes = GID,
    invited: tuple[bytes, ...] = (),
) -> messages.GmsView:
    """A GMS answer for `me`: (epoch, rn1_gen, members) each, RN2 wrapped to `me`."""
    pub = keys.public_bytes(me)
    eps = [
        messages.GmsEpoch(e, gen, [hexid(m) for m in who], group.wrap_secret(RN2[e], pub, gid, e).hex())
        for e, gen, who in epochs
    ]
    e, gen, who = epochs[-1]
    return messages.GmsView(
        gid.hex(), "team", keys.checksum(A), e, gen, [hexid(m) for m in who], [hexid(m) for m in invited], eps
    )


def member_book(epochs=((2, 1, [A, M, B]),), rn1=(1,)) -> tuple[GroupBook, GroupState, FakeClock]:
    """ME, a member of GID since epoch 2 (admin A, member B), with the RN1 generations `rn1`."""
    clock = FakeClock()
    book = GroupBook(ME, clock)
    g = GroupState(GID, "team", A, GMS, "invited")
    book.groups[GID] = g
    gs.apply_view(g, view(list(epochs)), ME)
    g.rn1.update({n: RN1[n] for n in rn1})
    return book, g, clock


def key_of(epoch: int, gen: int = 1) -> bytes:
    return group.group_key(RN1[gen], RN2[epoch], GID, "team", epoch)


def msg(sender=BOB, epoch: int = 2, counter: int = 0, text: bytes = b"hi", gen: int = 1) -> bytes:
    return MSG + group.seal_message(sender, key_of(epoch, gen), GID, epoch, counter, text).encode()


def note(**fields) -> bytes:
    return CONTROL + json.dumps(fields, separators=(",", ":")).encode()


def refused(book: GroupBook, code: str, sender: bytes, payload: bytes) -> None:
    """`payload` is refused with `code`, counted, and changes no group."""
    before = {gid: g.to_json() for gid, g in book.groups.items()}
    counted = book.refused[code]
    with pytest.raises(GroupError) as e:
        book.receive(sender, payload, "tunnel")
    assert e.value.code == code and str(e.value) not in ("", "None"), str(e.value)
    assert book.refused[code] == counted + 1
    assert {gid: g.to_json() for gid, g in book.groups.items()} == before


def delivered(actions: list) -> list[str]:
    return [a.entry["text"] for a in actions if isinstance(a, Deliver)]


# --- wire forms ----------------------------------------------------------------------------------
def test_control_notes_keep_their_bytes():
    """The typed notes encode to the very bytes the hand-made dicts did (§13.4): old and new nodes
    understand each other."""
    g = GID.hex()
    cases = [
        (
            messages.InviteNote(g, "team", keys.checksum(A), GMS),
            {"t": "invite", "gid": g, "name": "team", "admin": keys.checksum(A), "gms": GMS},
        ),
        (messages.Rn1Note(g, 7, RN1[1].hex()), {"t": "rn1", "gid": g, "gen": 7, "rn1": RN1[1].hex()}),
        (messages.JoinedNote(g), {"t": "joined", "gid": g}),
        (messages.LeftNote(g), {"t": "left", "gid": g}),
    ]
    for typed, old in cases:
        wire = gs.encode_note(typed)
        assert wire == CONTROL + json.dumps(old, separators=(",", ":")).encode()
        assert gs.decode_note(wire[1:]) == typed


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"Z{}",
        CONTROL + b"not json",
        CONTROL + b"[]",
        note(t="frobnicate", gid=GID.hex()),
        note(t="joined"),
        note(t="joined", gid=GID.hex()[:-2]),
        note(t="joined", gid=GID.hex(), extra=1),
        note(t="rn1", gid=GID.hex(), gen="1", rn1=RN1[1].hex()),
        note(t="rn1", gid=GID.hex(), gen=1, rn1="00" * 31),
        note(t="rn1", gid=GID.hex(), gen=-1, rn1=RN1[1].hex()),
        note(t="rn1", gid=GID.hex(), gen=2**32, rn1=RN1[1].hex()),
        note(t="invite", gid=GID.hex(), name="bad name", admin=keys.checksum(A), gms=GMS),
        note(t="invite", gid=GID.hex(), name="x", admin=keys.checksum(A), gms="ftp://dc.test"),
        note(t="invite", gid=GID.hex(), name="x", admin="0x12", gms=GMS),
        CONTROL + b"[" * 100 + b"]" * 100,
        MSG + b"\x01" * 40,
    ],
)
def test_malformed_payloads_are_refused(payload):
    """Adversary: a member or a stranger sending bytes that are no group payload: one `malformed`
    refusal each, never another exception, nothing changed."""
    book, _, _ = member_book()
    refused(book, "malformed", A, payload)
    if payload[:1] not in (MSG, CONTROL):
        with pytest.raises(GroupError, match="^not a group payload$"):
            book.receive(A, payload, "tunnel")


# --- group messages ------------------------------------------------------------------------------
def test_messages_in_any_order_are_delivered_once():
    """Adversary: the network (and a Cache Server) reorders and repeats messages; each is
    delivered once, with the received time from the clock."""
    book, g, clock = member_book()
    first, second = msg(counter=1, text=b"one"), msg(counter=0, text=b"\xffzero")
    assert book.receive(B, first, "tunnel") == [
        Deliver(
            g,
            {
                "gid": GID.hex(),
                "group": "team",
                "epoch": 2,
                "sender": keys.checksum(B),
                "counter": 1,
                "text": "one",
                "via": "tunnel",
                "received": clock.wall_ms(),
                "wire": first[1:].hex(),
            },
        ),
        Save(g),
    ]
    assert delivered(book.receive(B, second, "cs")) == ["\ufffdzero"]  # bytes that are no UTF-8: replaced
    refused(book, "replay", B, first)
    refused(book, "replay", B, second)


def test_refusals_of_group_messages():
    """Adversaries: a member speaking as another, a non-member with a stolen key, a message from
    before we joined, a message for a group we are not in, a tampered body."""
    book, g, _ = member_book(epochs=((2, 1, [A, M, B]), (3, 1, [A, M, B, X])))
    forged = group.seal_message(MALLORY, key_of(2), GID, 2, 0, b"x")
    forged = group.GroupMessage(GID, 2, B, 0, forged.body, forged.sig)  # claims to be B
    refused(book, "impersonation", B, MSG + forged.encode())
    refused(book, "not_member", X, msg(MALLORY, epoch=2))  # X joined in epoch 3 only
    g.joined = 3
    refused(book, "before_join", B, msg(epoch=2))
    g.joined = 2
    other = GroupState(bytes(16), "other", A, GMS, "invited")
    book.groups[other.gid] = other
    wire = MSG + group.seal_message(BOB, key_of(2), other.gid, 2, 0, b"x").encode()
    refused(book, "unknown_group", B, wire)  # invited is not in
    refused(book, "unknown_group", B, MSG + group.seal_message(BOB, key_of(2), bytes(range(16)), 2, 0, b"x").encode())
    wrong_key = MSG + group.seal_message(BOB, bytes(32), GID, 2, 5, b"x").encode()
    refused(book, "undecryptable", B, wrong_key)
    assert delivered(book.receive(B, msg(counter=5), "tunnel")) == ["hi"]  # the undecryptable one did not burn 5


def test_a_removed_member_writing_is_refused_from_the_next_epoch_on():
    """Adversary: B, removed in epoch 3, still holds the key of epoch 2 and writes with it. Its
    messages sealed under epoch 2 are refused once we know epoch 3 (§13.2, `removed`); those it
    sent before are read."""
    book, g, _ = member_book(epochs=((2, 1, [A, M, B]),))
    assert delivered(book.receive(B, msg(counter=0), "tunnel")) == ["hi"]
    gs.apply_view(g, view([(3, 2, [A, M])]), ME)
    g.rn1[2] = RN1[2]
    refused(book, "removed", B, msg(counter=1))
    assert not book.knows(B) and book.knows(A)
    for status in ("left", "removed"):  # we left or were removed: what was sent before still opens
        g.status = status
        assert delivered(book.receive(A, msg(ADMIN, counter=len(status)), "cs")) == ["hi"]


def test_a_message_of_an_unknown_epoch_waits_for_its_key():
    """A message of an epoch we have no key for is parked (a bounded number) and asks for a catch-up
    (paced by the clock); the admin's RN1 or a refresh delivers it; stale epochs never wait."""
    book, g, clock = member_book()
    gs.apply_view(g, view([(3, 2, [A, M, B])]), ME)  # epoch 3 needs RN1 generation 2, not here yet
    out = book.receive(B, msg(epoch=3, gen=2, text=b"later"), "tunnel")
    assert len(g.parked) == 1 and [type(a) for a in out] == [Save, CatchUp] and out[1].delay_s == 0.0
    assert book.receive(B, msg(epoch=3, gen=2, counter=1, text=b"later too"), "tunnel") == [
        Save(g)
    ]  # one catch-up at a time
    refused(book, "not_admin", B, note(t="rn1", gid=GID.hex(), gen=2, rn1=RN1[2].hex()))  # only the admin hands out RN1
    out = book.receive(A, note(t="rn1", gid=GID.hex(), gen=2, rn1=RN1[2].hex()), "tunnel")
    assert delivered(out) == ["later", "later too"] and g.parked == [] and g.rn1[2] == RN1[2]
    assert {a.entry["via"] for a in out if isinstance(a, Deliver)} == {"parked"}
    refused(book, "malformed", A, note(t="rn1", gid=GID.hex(), gen=2, rn1=RN1[1].hex()))  # a generation never changes
    assert book.receive(A, note(t="rn1", gid=GID.hex(), gen=2, rn1=RN1[2].hex()), "tunnel")[0] == Save(g)  # again: fine
    for n in range(gs.MAX_PARKED + 3):
        book.receive(B, msg(epoch=4, counter=n), "tunnel")
    assert len(g.parked) == gs.MAX_PARKED and group.GroupMessage.decode(g.parked[0]).counter == 3  # oldest dropped


def test_parked_messages_are_refused_or_kept_on_retry():
    """On retry a parked message that turned out bad is refused and dropped, one still without a
    key stays, one with a key is delivered."""
    book, g, _ = member_book()
    g.parked = [msg(epoch=3, gen=2)[1:], msg(MALLORY, epoch=3, gen=2)[1:], b"\x01junk", b"\x02"]
    gs.apply_view(g, view([(3, 2, [A, M, B])]), ME)
    assert book.retry_parked(g) == [Save(g)] and len(g.parked) == 2  # junk refused, the others wait for RN1 2
    assert book.refused["malformed"] == 2
    g.rn1[2] = RN1[2]
    out = book.retry_parked(g)
    assert delivered(out) == ["hi"] and g.parked == [] and book.refused["not_member"] == 1


def test_catch_ups_are_paced_by_the_clock():
    """Adversary: a peer sending messages of bogus epochs as fast as it can; the GMS hears from us
    at most once per REFRESH_MIN_S per group."""
    book, g, clock = member_book()
    book.refreshed(g)
    assert book.want_catch_up(g) == [CatchUp(g, gs.REFRESH_MIN_S)]
    assert book.want_catch_up(g) == []
    book.catching_up(g)
    clock.advance(0.5)
    assert book.want_catch_up(g) == [CatchUp(g, gs.REFRESH_MIN_S - 0.5)]
    book.catching_up(g)
    clock.advance(10)
    assert book.want_catch_up(g) == [CatchUp(g, 0.0)]


def test_joined_and_left_notes_make_only_an_admin_look():
    book, g, _ = member_book()
    assert book.receive(B, note(t="joined", gid=GID.hex()), "tunnel") == []  # we are no admin
    refused(book, "unknown_group", B, note(t="left", gid=bytes(16).hex()))
    admin = GroupBook(ADMIN, FakeClock())
    ga = GroupState(GID, "team", A, GMS, "member")
    admin.groups[GID] = ga
    assert admin.receive(B, note(t="left", gid=GID.hex()), "tunnel") == [CatchUp(ga, 0.0)]


# --- invitations ---------------------------------------------------------------------------------
def invite(admin: bytes, gid: bytes, name: str = "g") -> bytes:
    return note(t="invite", gid=gid.hex(), name=name, admin=keys.checksum(admin), gms=GMS)


def test_invitations_are_capped_per_stranger_and_admit_nobody():
    """Adversary: a stranger inviting us to many groups holds MAX_INVITES_PER_STRANGER of them, an
    admitted friend's invitation still lands; nobody is admitted by inviting; a duplicate changes
    nothing; an invitation signed by another than its admin is refused."""
    book = GroupBook(ME, FakeClock(), admits=lambda peer: peer == A)
    for n in range(consent.MAX_INVITES_PER_STRANGER):
        assert book.receive(X, invite(X, bytes([n]) * 16), "cs") == [Save(book.groups[bytes([n]) * 16])]
    refused(book, "too_many_from_sender", X, invite(X, bytes([99]) * 16))
    refused(book, "not_admin", X, invite(A, GID))  # X forwards an invitation naming A
    assert book.receive(A, invite(A, GID, "team"), "tunnel") == [Save(book.groups[GID])]
    assert book.receive(A, invite(A, GID, "renamed"), "tunnel") == []  # the first invitation stands
    assert [(i["name"], i["admitted"]) for i in book.invitations()][-1] == ("team", True)
    assert not book.knows(X) and not book.knows(A)
    with pytest.raises(GroupError) as e:
        book.find("g")
    assert "4 groups are named" in str(e.value)


def test_a_full_invitation_list_makes_room_only_for_an_admitted_sender():
    """The oldest invitation is a friend's, the rest strangers'; a second friend's invitation
    pushes out the oldest stranger's, never the first friend's."""
    strangers = [keys.node_id_of(keys.private_key(bytes([n + 10]) * 32)) for n in range(consent.MAX_INVITES_HELD - 1)]
    book = GroupBook(ME, FakeClock(), admits=lambda peer: peer in (A, B))
    book.receive(A, invite(A, bytes([0xAA]) * 16), "tunnel")
    for n, s in enumerate(strangers):
        book.receive(s, invite(s, n.to_bytes(16, "big")), "cs")
    refused(book, "invitations_full", X, invite(X, bytes([0xEE]) * 16))
    out = book.receive(B, invite(B, GID), "tunnel")
    assert [type(a) for a in out] == [Forget, Save] and out[0].g.gid == (0).to_bytes(16, "big")
    assert len(book.invitations()) == consent.MAX_INVITES_HELD and (0).to_bytes(16, "big") not in book.groups
    assert bytes([0xAA]) * 16 in book.groups and book.groups[GID].gms == GMS


def test_accept_and_decline():
    """Accepting takes the GMS's answer (we are a member from the epoch we joined); declining
    forgets the invitation and only an invitation; a GMS answer that does not fit changes nothing."""
    book = GroupBook(ME, FakeClock())
    book.receive(A, invite(A, GID, "team"), "tunnel")
    book.receive(A, invite(A, bytes(16), "other"), "tunnel")
    g = book.find("team")
    before = g.to_json()
    with pytest.raises(GroupError, match="not 33333333") as e:
        gs.apply_view(g, view([(2, 1, [A, M])], gid=bytes(16)), ME)
    assert e.value.code == "malformed"
    with pytest.raises(GroupError) as e:
        gs.apply_view(g, view([(2, 1, [A, M])], me=BOB), ME)  # wrapped to another member
    assert e.value.code == "bad_wrap" and g.to_json() == before
    bad_name = copy.copy(view([(2, 1, [A, M])]))
    bad_name.name = "bad name"
    with pytest.raises(GroupError, match="GMS answer: a group name is 1-64") as e:
        gs.apply_view(g, bad_name, ME)
    assert e.value.code == "malformed" and g.to_json() == before
    gs.apply_view(g, view([(3, 1, [A, M])]), ME)
    gs.apply_view(g, view([(2, 1, [A, M])], invited=(X,)), ME)  # a stale answer (reordered): epoch 3 stays
    assert (g.status, g.joined, g.epoch, g.members(), g.invited) == ("member", 2, 3, {A, M}, {X})
    assert book.receive(A, invite(A, GID, "again"), "tunnel") == [] and g.status == "member"  # a member already
    with pytest.raises(GroupError, match=r"^group team is not an invitation waiting here \(member\)$") as e:
        book.decline("team")
    assert e.value.code == "not_invited"
    other = book.find("other")
    assert book.decline(bytes(16).hex()) == [Forget(other)]
    assert bytes(16) not in book.groups
    assert book.gms_refused(g, "gms_unreachable") == [] and g.status == "member"
    assert book.gms_refused(g, "not_member") == [Save(g)] and g.status == "removed"


def test_decode_view_refuses_nonsense():
    """Adversary: a GMS (or what claims to be one) answering nonsense: `malformed`, nothing taken."""
    typed = view([(2, 1, [A, M])])
    good = messages.encode(typed)
    assert gs.decode_view(good) == typed
    for bad in (
        {**good, "epoch": -1},
        {**good, "members": ["0x12"]},
        {**good, "more": 1},
        [],
        "x",
        {**good, "epochs": [good["epochs"][0]] * (messages.GROUP_EPOCHS_PER_ANSWER + 1)},
    ):
        with pytest.raises(GroupError, match="^GMS answer: malformed GmsView") as e:
            gs.decode_view(bad)
        assert e.value.code == "malformed"


def test_admin_bookkeeping():
    """The admin makes the RN1 of a generation a departure started, stages a removal's RN1 before
    the GMS hears of it, and hands the current RN1 to exactly the members that lack it."""
    book = GroupBook(ADMIN, FakeClock())
    g = GroupState(GID, "team", A, GMS, "member", rn1={1: RN1[1]})
    book.groups[GID] = g
    gs.apply_view(g, view([(1, 1, [A]), (2, 1, [A, M, B])], me=ADMIN), ADMIN)
    assert g.rn1 == {1: RN1[1]} and book.knows(B)
    note1, lacking = gs.rn1_lacking(g, A)
    assert note1 == messages.Rn1Note(GID.hex(), 1, RN1[1].hex()) and lacking == sorted([M, B])
    g.rn1_sent = {M: 1, B: 1}
    assert gs.rn1_lacking(g, A) is None
    g.rn1[5] = RN1[2]  # a generation staged before, never started at the GMS: the epoch's counts
    gs.stage_removal(g, B)
    assert g.pending_remove == (B, 2) and len(g.rn1[2]) == 32
    del g.rn1[5]
    fresh = GroupState(GID, "t", A, GMS, "member", rn1={1: RN1[1], 3: RN1[2]})
    gs.stage_removal(fresh, B)  # no epoch known yet: after the newest RN1 we have
    assert fresh.pending_remove == (B, 4)
    gs.apply_view(g, view([(3, 3, [A, M])], me=ADMIN), ADMIN)  # B left meanwhile: generation 3
    assert 3 in g.rn1 and g.rn1[3] != g.rn1[2]
    assert gs.rn1_lacking(g, A)[1] == [M]
    assert gs.rn1_lacking(GroupState(GID, "t", A, GMS, "member"), A) is None
    with pytest.raises(GroupError, match="only the admin of group t") as e:
        book.need_admin(GroupState(GID, "t", B, GMS, "member"))
    assert e.value.code == "not_admin"
    g.parked, g.invited = [b"\x01\x02"], {X}
    back = GroupState.from_json(json.loads(json.dumps(g.to_json())))
    assert back.to_json() == g.to_json() and back.pending_remove == (B, 2)
    assert (back.parked, back.invited, back.rn1, back.epochs) == ([b"\x01\x02"], {X}, g.rn1, g.epochs)
    plain = GroupState(GID, "t", A, GMS, "member")  # a member's state: no removal pending, as most are
    assert GroupState.from_json(json.loads(json.dumps(plain.to_json()))).pending_remove is None


def test_describe_and_find():
    """What `ntm group members`/`list` show, and groups found by ID (any case, 0x or not) or name."""
    book, g, _ = member_book()
    assert book.describe(g) == {
        "gid": GID.hex(),
        "name": "team",
        "admin": keys.checksum(A),
        "gms": GMS,
        "status": "member",
        "epoch": 2,
        "rn1_gen": 1,
        "has_key": True,
        "members": sorted(keys.checksum(m) for m in (A, M, B)),
        "you": keys.checksum(M),
        "pending_removal": None,
    }
    g.pending_remove, g.epoch = (B, 2), 3
    d = book.describe(g)
    assert (d["rn1_gen"], d["has_key"], d["members"], d["pending_removal"]) == (None, False, [], keys.checksum(B))
    for ref in ("0x" + GID.hex(), GID.hex().upper(), "TEAM"):
        assert book.find(ref) is g
    for ref, says in (("nope", "no group 'nope' here"), ("0x" + bytes(16).hex(), "no group")):
        with pytest.raises(GroupError, match=says) as e:
            book.find(ref)
        assert e.value.code == "unknown_group"


def test_gms_urls():
    """Adversary: an invitation naming a GMS that is no web server of ours to ask (any scheme,
    no host, a huge string, not a string): `malformed`."""
    assert gs.check_gms_url("https://dc.test:8330/") == "https://dc.test:8330"
    assert gs.check_gms_url("http://X/") == "http://X"
    longest = "http://" + "a" * (200 - 7)
    assert gs.check_gms_url(longest) == longest
    for bad in (longest + "a", 42, None, "ftp://dc.test", "http://", "dc.test"):
        with pytest.raises(GroupError, match="not a GMS URL") as e:
            gs.check_gms_url(bad)
        assert e.value.code == "malformed"


# --- the GMS's decisions -------------------------------------------------------------------------
def gms_group(members=(A, M), invited=(B,), epoch: int = 2, gen: int = 1) -> GmsGroup:
    return GmsGroup(GID, "team", A, epoch, gen, tuple(members), frozenset(invited))


def gms_refused(code: str, f, *args, says: str = "") -> None:
    """`f(*args)` is refused with `code` and a message that says why (`says`: a regular expression)."""
    with pytest.raises(GmsRefused) as e:
        f(*args)
    assert e.value.code == code and str(e.value) not in ("", "None") and re.search(says, str(e.value)), str(e.value)


def test_gms_create_and_registration():
    gs.gms_create(A, GID, False, gs.MAX_GROUPS_PER_ADMIN - 1)
    gms_refused("exists", gs.gms_create, A, GID, True, 0)
    gms_refused("too_many", gs.gms_create, A, GID, False, gs.MAX_GROUPS_PER_ADMIN)
    gs.gms_registered(A, 1, False)
    gms_refused("revoked", gs.gms_registered, A, 1, True)
    gms_refused("unregistered", gs.gms_registered, A, 0, False)


def test_gms_invite_and_accept():
    """Adversary: a node accepting what nobody invited it to, a non-admin inviting; caps hold."""
    g = gms_group()
    assert gs.gms_invite(g, A, X) == gs.Change(f"invited {keys.checksum(X)}", invite=X)
    assert gs.gms_invite(g, A, M) is None and gs.gms_invite(g, A, B) is None  # member, invited already
    gms_refused("not_admin", gs.gms_invite, g, M, X)
    full = gms_group(invited=[n.to_bytes(20, "big") for n in range(messages.GROUP_MAX_INVITES)])
    gms_refused("too_many", gs.gms_invite, full, A, X)
    assert gs.gms_accept(g, B) == gs.Change(f"joined {keys.checksum(B)}", (A, M, B), 1, uninvite=B)
    assert gs.gms_accept(g, M) is None  # accepted before, the answer was lost
    gms_refused("not_invited", gs.gms_accept, g, X)
    crowded = gms_group(members=[n.to_bytes(20, "big") for n in range(messages.GROUP_MAX_MEMBERS)])
    gms_refused("too_many", gs.gms_accept, crowded, B)


def test_gms_leave_and_remove():
    """Adversary: a non-admin removing, the admin removing itself or skipping a generation; a
    repeated removal (its answer lost) and a withdrawn invitation are no new epoch."""
    g = gms_group(members=(A, M, B), invited=(X,), gen=3)
    assert gs.gms_leave(g, M) == gs.Change(f"left {keys.checksum(M)}", (A, B), 4)
    gms_refused("bad_request", gs.gms_leave, g, A, says="^the admin cannot leave its group$")
    gms_refused("not_member", gs.gms_leave, g, X)
    assert gs.gms_remove(g, A, B, 4) == gs.Change(f"removed {keys.checksum(B)}", (A, M), 4)
    gms_refused("bad_request", gs.gms_remove, g, A, B, 5, says="a removal starts RN1 generation 4, not 5")
    gms_refused("bad_request", gs.gms_remove, g, A, B, 3)
    gms_refused("bad_request", gs.gms_remove, g, A, A, 4, says="^the admin cannot remove itself$")
    gms_refused("not_admin", gs.gms_remove, g, M, B, 4)
    assert gs.gms_remove(g, A, X, 0) == gs.Change(f"uninvited {keys.checksum(X)}", uninvite=X)
    gone = keys.node_id_of(keys.private_key(bytes([9]) * 32))
    assert gs.gms_remove(g, A, gone, 3) is None
    gms_refused("not_member", gs.gms_remove, g, A, gone, 4)
    gs.need_member(g, B)
    gms_refused("not_member", gs.need_member, g, X, says="is not a member of group team")
