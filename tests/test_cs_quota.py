"""The Cache Server's quota ledger (cs/quota.py), pure and fast (issue 29 item 6)."""

from __future__ import annotations

import pytest

from cs.errors import CsError
from cs.quota import SOURCE_BYTES_PER_HOUR, SOURCE_UPLOADS_AT_ONCE, Caps, Ledger, Stored

SENDER, OTHER, BOB, CAROL = b"s" * 20, b"o" * 20, b"b" * 20, b"c" * 20
CAPS = Caps(sender_items=100, sender_bytes=1000, recipient_bytes=1500, total_bytes=3000)
NOTHING = Stored(0, 0, {}, 0)


def code(fn) -> str:
    with pytest.raises(CsError) as exc:
        fn()
    return exc.value.code


def test_concurrent_uploads_are_checked_against_each_other():
    """Adversary: one sender starting 12 uploads at once, each within its quota alone (they stored
    4.8× the quota when each was checked against the store only)."""
    ledger = Ledger(CAPS)
    got = []
    for _ in range(12):
        try:
            got.append(ledger.reserve(SENDER, (BOB,), None, 300, NOTHING, 0.0))
        except CsError as exc:
            assert exc.code == "over_quota"
    assert len(got) == 3 and sum(r.size for r in got) <= CAPS.sender_bytes
    ledger.release(got[0])  # a failed upload gives its share back
    assert ledger.reserve(SENDER, (BOB,), None, 300, NOTHING, 0.0)


def test_stored_and_reserved_add_up_per_party_and_in_all():
    ledger = Ledger(CAPS)
    assert code(lambda: ledger.reserve(SENDER, (BOB,), None, 300, Stored(0, 800, {}, 0), 0.0)) == "over_quota"
    assert code(lambda: ledger.reserve(SENDER, (BOB,), None, 300, Stored(100, 0, {}, 0), 0.0)) == "over_quota"
    ledger.reserve(OTHER, (BOB,), None, 1000, NOTHING, 0.0)
    assert code(lambda: ledger.reserve(SENDER, (CAROL, BOB), None, 600, NOTHING, 0.0)) == "over_quota"  # bob's
    assert code(lambda: ledger.reserve(SENDER, (CAROL,), None, 900, Stored(0, 0, {}, 1200), 0.0)) == "cs_full"
    assert ledger.sender_bytes == {OTHER: 1000} and ledger.total_bytes == 1000  # refusals reserve nothing


def test_release_forgets_parties_with_nothing_in_flight():
    ledger = Ledger(CAPS)
    r = ledger.reserve(SENDER, (BOB, CAROL), "203.0.113.0/24", 10, NOTHING, 0.0)
    ledger.release(r)
    assert not ledger.sender_items and not ledger.sender_bytes and not ledger.recipient_bytes
    assert ledger.total_bytes == 0 and ledger.uploads.held("203.0.113.0/24") == 0


def test_a_source_network_has_its_uploads_at_once_and_its_byte_rate():
    """Adversary: many identities behind one network uploading together."""
    ledger = Ledger(Caps(10**6, 1 << 40, 1 << 40, 1 << 42))
    src = "203.0.113.0/24"
    held = [ledger.reserve(bytes([i]) * 20, (BOB,), src, 1, NOTHING, 0.0) for i in range(SOURCE_UPLOADS_AT_ONCE)]
    assert code(lambda: ledger.reserve(b"x" * 20, (BOB,), src, 1, NOTHING, 0.0)) == "busy"
    assert ledger.reserve(b"x" * 20, (BOB,), "198.51.100.0/24", 1, NOTHING, 0.0)  # another network
    for r in held:
        ledger.release(r)
    big = ledger.reserve(b"y" * 20, (BOB,), src, SOURCE_BYTES_PER_HOUR - 4, NOTHING, 0.0)
    ledger.release(big)
    assert code(lambda: ledger.reserve(b"z" * 20, (BOB,), src, 1 << 20, NOTHING, 1.0)) == "busy"
    assert ledger.uploads.held(src) == 0  # the refused one holds no slot
    assert ledger.reserve(b"z" * 20, (BOB,), src, 1 << 20, NOTHING, 3600.0)  # refilled an hour later


def refusal(fn) -> CsError:
    with pytest.raises(CsError) as exc:
        fn()
    return exc.value


def test_every_cap_is_reached_exactly_never_passed():
    """Hostile condition: a sender, a recipient and the CS filled to the byte (or item) of their
    caps by what is stored plus what is in flight: the upload that meets a cap is taken, one byte
    or one item more is refused. A cap checked with >= (or stored usage counted twice) would refuse
    a legitimate last item; one checked loosely would let a sender past its quota."""
    caps = Caps(sender_items=3, sender_bytes=1000, recipient_bytes=1500, total_bytes=3000)
    ledger = Ledger(caps)
    ledger.reserve(SENDER, (BOB,), None, 100, NOTHING, 0.0)  # one item of the sender's in flight
    one_stored = Stored(1, 0, {}, 0)
    assert ledger.reserve(SENDER, (CAROL,), None, 100, one_stored, 0.0)  # 1 stored + 2 in flight = 3
    assert code(lambda: ledger.reserve(SENDER, (CAROL,), None, 1, one_stored, 0.0)) == "over_quota"
    fresh = Ledger(caps)
    assert fresh.reserve(SENDER, (BOB,), None, 1000, NOTHING, 0.0)  # the sender's bytes to the byte
    assert fresh.reserve(OTHER, (BOB,), None, 500, NOTHING, 0.0)  # bob's 1500 to the byte, nothing stored for him
    assert code(lambda: fresh.reserve(b"t" * 20, (BOB,), None, 1, NOTHING, 0.0)) == "over_quota"
    assert fresh.reserve(b"t" * 20, (CAROL,), None, 1000, Stored(0, 0, {}, 500), 0.0)  # 500 + 1500 + 1000 = 3000
    assert code(lambda: fresh.reserve(b"u" * 20, (CAROL,), None, 1, Stored(0, 0, {}, 500), 0.0)) == "cs_full"


def test_items_in_flight_count_per_sender():
    """Adversary: a sender starting many tiny uploads at once to pass its item cap (bytes never
    bind): each in-flight item counts once, for its own sender only."""
    ledger = Ledger(Caps(sender_items=2, sender_bytes=10**6, recipient_bytes=10**6, total_bytes=10**7))
    ledger.reserve(SENDER, (BOB,), None, 1, NOTHING, 0.0)
    second = ledger.reserve(SENDER, (BOB,), None, 1, NOTHING, 0.0)
    assert ledger.sender_items == {SENDER: 2}
    assert code(lambda: ledger.reserve(SENDER, (BOB,), None, 1, NOTHING, 0.0)) == "over_quota"
    assert ledger.reserve(OTHER, (BOB,), None, 1, NOTHING, 0.0)  # another sender is not held up
    ledger.release(second)
    assert ledger.sender_items == {SENDER: 1, OTHER: 1}


def test_each_refusal_says_which_limit_and_how_full():
    """Hostile condition: a user (or an operator reading logs) told `over_quota` or `busy` must
    learn which limit it hit and how far it is used, else a refused upload cannot be told from a
    bug; a transient refusal says to retry later."""
    caps = Caps(sender_items=5, sender_bytes=1000, recipient_bytes=1500, total_bytes=3000)
    ledger = Ledger(caps)
    ledger.reserve(SENDER, (BOB,), None, 100, NOTHING, 0.0)
    sender = refusal(lambda: ledger.reserve(SENDER, (CAROL,), None, 800, Stored(2, 200, {}, 0), 0.0))
    assert str(sender) == "sender quota: 3 items, 300 bytes stored or uploading of 5 items, 1000 bytes"
    recipient = refusal(lambda: ledger.reserve(OTHER, (CAROL,), None, 10, Stored(0, 0, {CAROL: 1495}, 0), 0.0))
    assert str(recipient) == f"recipient {CAROL.hex()} already has 1500 bytes waiting"
    full = refusal(lambda: ledger.reserve(OTHER, (CAROL,), None, 10, Stored(0, 0, {}, 2900), 0.0))
    assert (full.code, str(full)) == ("cs_full", "this CS stores at most 3000 bytes in all; try later")
    big = Ledger(Caps(10**6, 1 << 40, 1 << 40, 1 << 42))
    src = "203.0.113.0/24"
    for i in range(SOURCE_UPLOADS_AT_ONCE):
        big.reserve(bytes([i]) * 20, (BOB,), src, 1, NOTHING, 0.0)
    at_once = refusal(lambda: big.reserve(b"x" * 20, (BOB,), src, 1, NOTHING, 0.0))
    assert str(at_once) == f"{SOURCE_UPLOADS_AT_ONCE} uploads from this network at once at most"
    rate = refusal(lambda: big.reserve(b"x" * 20, (BOB,), "198.51.100.0/24", SOURCE_BYTES_PER_HOUR + 1, NOTHING, 0.0))
    assert (rate.code, str(rate)) == ("busy", "this network uploaded too much lately; retry later")
