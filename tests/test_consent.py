"""Consent before anything lands (docs/PROTOCOL.md §12.1), the pure decisions (ntm/consent.py)."""

from __future__ import annotations

from ntm import consent
from ntm.consent import HeldInvite, MAX_INBOX_BYTES, MAX_INVITES_HELD, MAX_INVITES_PER_STRANGER


def ids(n: int, start: int = 1) -> list[bytes]:
    return [i.to_bytes(20, "big") for i in range(start, start + n)]


def gid(i: int) -> bytes:
    return i.to_bytes(16, "big")


def test_a_stranger_keeps_its_first_few_invitations_and_never_evicts_anyones():
    """Adversary: one stranger inviting us to many groups, then a crowd of stranger identities
    filling the list; a genuine (admitted) inviter and the first strangers keep theirs."""
    mallory, friend = ids(2)
    held: list[HeldInvite] = []
    for i in range(MAX_INVITES_PER_STRANGER + 3):
        v = consent.invitation_verdict(held, mallory, admitted=False)
        if v.keep:
            held.append(HeldInvite(gid(i), mallory, False))
    assert len(held) == MAX_INVITES_PER_STRANGER
    assert consent.invitation_verdict(held, mallory, False) == consent.InviteVerdict(
        False, refusal="too_many_from_sender"
    )
    crowd = ids(MAX_INVITES_HELD, start=100)
    for n, sybil in enumerate(crowd):
        v = consent.invitation_verdict(held, sybil, admitted=False)
        assert v.evict is None  # a stranger never makes room for itself
        if v.keep:
            held.append(HeldInvite(gid(1000 + n), sybil, False))
    assert len(held) == MAX_INVITES_HELD
    assert consent.invitation_verdict(held, ids(1, 999)[0], False) == consent.InviteVerdict(
        False, refusal="invitations_full"
    )
    # the genuine inviter still lands: the oldest stranger's invitation makes room
    v = consent.invitation_verdict(held, friend, admitted=True)
    assert v.keep and v.evict == held[0].gid
    # a list full of admitted senders' invitations: nobody's is evicted, the new one is refused
    admitted_only = [HeldInvite(gid(i), friend, True) for i in range(MAX_INVITES_HELD)]
    assert not consent.invitation_verdict(admitted_only, friend, True).keep
    # an admitted sender has no per-sender cap
    assert consent.invitation_verdict([HeldInvite(gid(i), friend, True) for i in range(10)], friend, True).keep


def test_items_are_fetched_by_themselves_only_from_admitted_senders_and_while_there_is_room():
    assert consent.fetch_verdict(True, 1000, 0) is None
    assert consent.fetch_verdict(False, 10, 0) == "not_admitted"  # however small: it waits at the CS
    assert consent.fetch_verdict(True, 1000, MAX_INBOX_BYTES - 999) == "inbox_full"
    assert consent.fetch_verdict(True, 1000, MAX_INBOX_BYTES - 1000) is None
    assert consent.inbox_room(MAX_INBOX_BYTES + 1, 0) == "inbox_full"
    assert consent.inbox_room(0, MAX_INBOX_BYTES) is None  # an empty item still fits a full inbox
    assert consent.inbox_room(-5, MAX_INBOX_BYTES) is None  # a negative size frees nothing


def test_peer_text_cannot_drive_the_terminal_or_forge_lines():
    """Adversary: a peer's message, group name or notice text with escape sequences."""
    hostile = "hi\x1b]0;pwned\x07\x1b[2J\r\nroot# \u202egnp.exe\x9b\\x41\U000e0041"
    shown = consent.escape(hostile)
    assert all(ord(c) >= 0x20 and c != "\x7f" and not 0x80 <= ord(c) < 0xA0 for c in shown)
    assert "\u202e" not in shown and "\n" not in shown and "\r" not in shown
    assert shown == ("hi\\x1b]0;pwned\\x07\\x1b[2J\\x0d\\x0aroot# \\u202egnp.exe\\x9b\\\\x41\\U000e0041")
    assert consent.escape("plain text, ünïcode ✓") == "plain text, ünïcode ✓"
    # Unicode's own line and paragraph separators (Zl, Zp) break a terminal line as a newline does
    assert consent.escape("a\u2028b\u2029c") == "a\\u2028b\\u2029c"


async def test_an_invitation_admits_nobody_and_one_stranger_holds_only_its_share(tmp_path):
    """Adversary: a stranger sending many group invitations (sealed at a Cache Server, so signed by
    it: the sender is authenticated). The node holds a few as requests, never admits the stranger's
    tunnels, and still holds a friend's; the user declines the stranger's."""
    import json

    from node.groups import CONTROL, Groups
    from ntm import keys

    mallory, friend = ids(2)

    def invite(admin: bytes, n: int) -> bytes:
        return (
            CONTROL
            + json.dumps(
                {
                    "t": "invite",
                    "gid": gid(n).hex(),
                    "name": f"g{n}",
                    "admin": keys.checksum(admin),
                    "gms": "http://dc.test:8330",
                }
            ).encode()
        )

    groups = Groups(
        tmp_path,
        keys.generate(),
        lambda: "http://dc.test:8330",
        transport=None,  # type: ignore[arg-type]
        admits=lambda peer: peer == friend,
    )
    for n in range(MAX_INVITES_PER_STRANGER + 3):
        groups.on_payload(mallory, invite(mallory, n), "cs")
    groups.on_payload(friend, invite(friend, 99), "tunnel")
    held = groups.invitations()
    assert [(g["name"], g["admitted"]) for g in held] == [(f"g{n}", False) for n in range(MAX_INVITES_PER_STRANGER)] + [
        ("g99", True)
    ]
    assert groups.refused["too_many_from_sender"] == 3
    assert not groups.knows(mallory) and not groups.knows(friend)  # invited is not admitted, either way
    await groups.decline("g0")
    assert (
        "g0" not in [g["name"] for g in groups.invitations()]
        and not (tmp_path / "groups" / f"{gid(0).hex()}.json").exists()
    )
    # after a restart the held invitations are still there, still admitting nobody
    again = Groups(tmp_path, keys.generate(), lambda: "http://dc.test:8330", transport=None)  # type: ignore[arg-type]
    assert len(again.invitations()) == MAX_INVITES_PER_STRANGER and not again.knows(mallory)
