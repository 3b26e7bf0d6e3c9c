"""The Cache Server's decisions (cs/core.py), pure and on a FakeClock: every refusal and every
state change of an upload, a fetch and a confirmation, without HTTP, SQLite or a DC."""

from __future__ import annotations

import pytest

from cs.core import MIN_UPLOAD_BYTES_PER_S, CacheCore, Limits, admit, bad_recipient, notice_target
from cs.errors import CsError
from cs.quota import SOURCE_UPLOADS_AT_ONCE, Stored
from ntm import envelope, keys, messages, seal
from ntm.errors import ParseError, SignatureError
from tests.fakes import FakeClock

SENDER, BOB, CAROL, EVE = (keys.private_key(bytes([i]) * 32) for i in (1, 2, 3, 4))
LIMITS = Limits(
    max_item_bytes=1000, sender_bytes=1500, sender_items=10, recipient_bytes=2500, ttl_ms=60_000, total_bytes=4000
)
NOTHING = Stored(0, 0, {}, 0)
URL = "http://cs.test:8350"
SOURCE = "198.51.100.0/24"


def node(k) -> bytes:
    return keys.node_id_of(k)


def code(fn) -> str:
    with pytest.raises(CsError) as exc:
        fn()
    return exc.value.code


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def core(clock) -> CacheCore:
    return CacheCore(URL, LIMITS, clock, idle_s=15.0)


def put_env(core: CacheCore, size: int, to=(BOB,), by=SENDER, sealed_by=SENDER) -> envelope.Envelope:
    """A CS_PUT request, opened as the edge opens it."""
    header = seal.Sealer(
        sealed_by, {node(k): keys.public_bytes(k) for k in to}, seal.Meta("file", "f", "1", "x"), core.now_ms()
    ).header
    body = {"header": header.to_json(), "size": size}
    return core.open(envelope.seal(by, messages.CS_PUT, body, core.now_ms()), messages.CS_PUT)


def node_info(k, home, revoked: bool = False) -> messages.NodeInfo:
    """The DC's record of the node of key `k`, homed at the DC of key `home`."""
    return messages.NodeInfo(
        node=keys.checksum(node(k)),
        home_dc=keys.checksum(node(home)),
        timestamp=1,
        pubkey=keys.public_bytes(k).hex(),
        revoked=revoked,
        online=False,
    )


def ref(item: bytes) -> messages.CsItemRef:
    return messages.CsItemRef(item.hex())


def test_an_upload_is_reserved_received_accepted_and_announced(core, clock):
    """The whole life of an upload: reserved, bytes counted, accepted with its expiry and one
    notice per recipient, then its reservation released."""
    offer = core.offer(put_env(core, 600, to=(BOB, CAROL)))
    upload = core.reserve(offer, NOTHING, exists=False, source=SOURCE)
    assert core.uploading == {offer.header.item} and core.ledger.total_bytes == 600
    assert upload.deadline == clock.now() + 15.0 + 600 / MIN_UPLOAD_BYTES_PER_S
    core.received(upload, 600, done=False)
    core.received(upload, 600, done=True)
    clock.advance(2.0)
    accepted = core.accept(upload)
    assert accepted.created_ms == core.now_ms() and accepted.expires_ms == accepted.created_ms + LIMITS.ttl_ms
    assert sorted(n.node for n in accepted.notices) == sorted(keys.checksum(node(k)) for k in (BOB, CAROL))
    assert {(n.item, n.cs, n.sender, n.size, n.created) for n in accepted.notices} == {
        (offer.header.item.hex(), URL, keys.checksum(node(SENDER)), 600, accepted.created_ms)
    }
    core.end(upload)
    assert core.uploading == set() and core.ledger.total_bytes == 0 and not core.ledger.sender_bytes


def test_refused_uploads_reserve_nothing(core):
    """Adversaries: an oversize item, an item sealed by someone else, a size that lies, a second
    upload of one item (concurrent or stored), a sender over its quota, a recipient over its
    quota, a CS that is full, and a network with too many uploads at once. Each refusal leaves
    the core as it was."""
    assert code(lambda: core.offer(put_env(core, LIMITS.max_item_bytes + 1))) == "too_large"
    assert core.offer(put_env(core, LIMITS.max_item_bytes)).size == LIMITS.max_item_bytes  # the limit itself is taken
    assert code(lambda: core.offer(put_env(core, 10, by=EVE))) == "not_sender"
    with pytest.raises(ParseError):
        core.offer(put_env(core, 0))
    offer = core.offer(put_env(core, 600))
    assert code(lambda: core.reserve(offer, NOTHING, exists=True, source=None)) == "exists"
    assert code(lambda: core.reserve(offer, Stored(0, 1000, {}, 0), False, None)) == "over_quota"  # sender's bytes
    assert code(lambda: core.reserve(offer, Stored(10, 0, {}, 0), False, None)) == "over_quota"  # sender's items
    assert code(lambda: core.reserve(offer, Stored(0, 0, {node(BOB): 2000}, 0), False, None)) == "over_quota"
    assert code(lambda: core.reserve(offer, Stored(0, 0, {}, 3500), False, None)) == "cs_full"
    assert core.uploading == set() and core.ledger.total_bytes == 0
    upload = core.reserve(offer, NOTHING, exists=False, source=None)
    assert code(lambda: core.reserve(offer, NOTHING, exists=False, source=None)) == "exists"  # streaming in now
    core.end(upload)
    assert core.reserve(offer, NOTHING, exists=False, source=None)  # a failed upload may be retried


def test_concurrent_reservations_count_against_each_other(core):
    """Adversary: one sender starting several uploads at once, each within its quota alone."""
    first = core.reserve(core.offer(put_env(core, 900)), NOTHING, False, None)
    second = core.offer(put_env(core, 900))
    assert code(lambda: core.reserve(second, NOTHING, False, None)) == "over_quota"
    core.end(first)  # the first failed: its share is free again
    assert core.reserve(second, NOTHING, False, None)


def test_per_source_caps(core, clock):
    """Adversary: many identities behind one network, each uploading: at most
    SOURCE_UPLOADS_AT_ONCE at once; the operator's networks (source None) are exempt."""
    senders = [keys.private_key(bytes([40 + i]) * 32) for i in range(SOURCE_UPLOADS_AT_ONCE + 1)]
    offers = [core.offer(put_env(core, 100, by=k, sealed_by=k)) for k in senders]
    held = [core.reserve(o, NOTHING, False, SOURCE) for o in offers[:-1]]
    assert code(lambda: core.reserve(offers[-1], NOTHING, False, SOURCE)) == "busy"
    assert core.reserve(offers[-1], NOTHING, False, "203.0.113.0/24")  # another network is not held up
    core.end(held[0])
    assert core.reserve(core.offer(put_env(core, 100, by=senders[0], sealed_by=senders[0])), NOTHING, False, SOURCE)


def test_received_bytes_must_match_the_announced_size(core):
    """Adversary: an uploader sending more than it announced (to overrun its reservation) or less."""
    upload = core.reserve(core.offer(put_env(core, 100)), NOTHING, False, None)
    core.received(upload, 60, done=False)
    assert code(lambda: core.received(upload, 101, done=False)) == "incomplete"
    assert code(lambda: core.received(upload, 60, done=True)) == "incomplete"


def test_who_may_fetch_or_confirm(core, clock):
    """Adversaries: a stranger asking for someone else's item, a recipient replaying a request
    signed for another item, anyone asking for an item that has expired but is not swept yet.
    Each gets the same not_found as for an item that does not exist: no probing."""
    item, other = bytes(range(16)), bytes(16)
    expires = core.now_ms() + LIMITS.ttl_ms
    bob, eve = node(BOB), node(EVE)
    core.may_fetch(bob, item, ref(item), expires, waiting=True)
    nothing = code(lambda: core.may_fetch(eve, item, ref(item), None, waiting=False))
    with pytest.raises(CsError) as stranger:
        core.may_fetch(eve, item, ref(item), expires, waiting=False)
    with pytest.raises(CsError) as absent:
        core.may_fetch(eve, item, ref(item), None, waiting=False)
    assert nothing == "not_found" and str(stranger.value) == str(absent.value)
    assert code(lambda: core.may_fetch(bob, item, ref(other), expires, waiting=True)) == "not_found"
    assert code(lambda: core.may_fetch(bob, item, ref(item), expires, waiting=False)) == "not_found"  # confirmed
    clock.advance(LIMITS.ttl_ms / 1000 - 0.5)
    core.may_fetch(bob, item, ref(item), expires, waiting=True)
    clock.advance(0.5)
    assert code(lambda: core.may_fetch(bob, item, ref(item), expires, waiting=True)) == "not_found"


def test_who_may_use_the_cs(core, clock):
    """Adversaries: a replayed request, a stale one (a wall clock step past the envelope's
    freshness window), an unregistered or revoked signer, an unregistered recipient."""
    raw = envelope.seal(BOB, messages.CS_LIST, {}, core.now_ms())
    assert core.open(raw, messages.CS_LIST).sender == node(BOB)
    with pytest.raises(SignatureError):
        core.open(raw, messages.CS_LIST)  # replayed
    stale = envelope.seal(BOB, messages.CS_LIST, {}, core.now_ms())
    clock.step_wall(envelope.MAX_SKEW_MS / 1000 + 1)
    with pytest.raises(SignatureError):
        core.open(stale, messages.CS_LIST)
    info = node_info(BOB, home=CAROL)
    assert admit(node(BOB), info) is info
    assert code(lambda: admit(node(BOB), None)) == "unregistered"
    assert code(lambda: admit(node(BOB), node_info(BOB, home=CAROL, revoked=True))) == "revoked"
    with pytest.raises(CsError) as exc:
        admit(node(EVE), None)
    assert bad_recipient(exc.value).code == "bad_recipient"
    assert bad_recipient(exc.value).refusal() == (400, "bad_recipient")


def test_a_notice_goes_to_the_recipients_active_home_dc_only():
    """Hostile condition: a recipient whose home DC is no longer active (revoked from the
    federation): no notice is sent anywhere, the item still waits for `ntm inbox`."""
    home, other = node(CAROL), node(EVE)
    info = node_info(BOB, home=CAROL)
    assert notice_target(info, {home: "https://dc2.test:8330/", other: "https://x"}) == (home, "https://dc2.test:8330")
    assert notice_target(info, {home: "https://DC-X/"}) == (home, "https://DC-X")  # only the slash goes
    assert code(lambda: notice_target(info, {other: "https://x"})) == "home_dc_unknown"


def refused(fn) -> str:
    """The message of the CsError `fn` raises (what the user or the operator's log reads)."""
    with pytest.raises(CsError) as exc:
        fn()
    return str(exc.value)


def test_each_refusal_names_the_party_item_or_size_it_refused(core):
    """Hostile condition: a refusal the user cannot act on (which node, which item, which size,
    which limit) reads like a bug; each one names what it refused."""
    bob, eve = node(BOB), node(EVE)
    info = node_info(BOB, home=CAROL)
    assert refused(lambda: admit(eve, None)) == f"{keys.checksum(eve)} is not a registered node"
    assert refused(lambda: admit(bob, node_info(BOB, home=CAROL, revoked=True))) == f"{keys.checksum(bob)} is revoked"
    assert refused(lambda: notice_target(info, {})) == f"home DC {info.home_dc} is not active"
    with pytest.raises(CsError) as unregistered:
        admit(eve, None)
    assert str(bad_recipient(unregistered.value)) == f"recipient: {keys.checksum(eve)} is not a registered node"
    too_large = LIMITS.max_item_bytes + 1
    assert refused(lambda: core.offer(put_env(core, too_large))) == (
        f"item of {too_large} bytes; this CS takes at most {LIMITS.max_item_bytes}"
    )
    assert refused(lambda: core.offer(put_env(core, 10, by=EVE))) == "an item is uploaded by the node that sealed it"
    offer = core.offer(put_env(core, 100))
    item = offer.header.item.hex()
    assert (
        refused(lambda: core.reserve(offer, NOTHING, True, None)) == f"item {item} is already stored or being uploaded"
    )
    upload = core.reserve(offer, NOTHING, False, None)
    assert refused(lambda: core.received(upload, 101, False)) == "more than the announced 100 bytes"
    assert refused(lambda: core.received(upload, 60, True)) == "got 60 of the announced 100 bytes"
    assert refused(lambda: core.may_fetch(eve, offer.header.item, ref(offer.header.item), None, False)) == (
        f"no item {item} for {keys.checksum(eve)}"
    )


def test_each_sender_has_its_own_quota_in_flight(core):
    """Adversary: one sender holding uploads in flight up to its quota: another sender's upload is
    still taken (the reservation is the sender's, not a pool shared with everyone)."""
    mine = core.reserve(core.offer(put_env(core, 900)), NOTHING, False, None)
    theirs = core.offer(put_env(core, 900, by=CAROL, sealed_by=CAROL))
    assert core.reserve(theirs, NOTHING, False, None)
    assert core.ledger.sender_bytes == {node(SENDER): 900, node(CAROL): 900}
    core.end(mine)
