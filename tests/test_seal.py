"""Sealed items (ntm/seal.py, docs/PROTOCOL.md §11): round trips at every size and split, several
recipients, the test vector, and every way a Cache Server or an outsider could tamper."""

from __future__ import annotations

import hashlib
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ntm import keys, seal

SENDER, R1, R2, R3, EPH = (keys.private_key(bytes([i]) * 32) for i in (1, 2, 7, 6, 3))
META = seal.Meta("chat", "msg", "42", "hello from 0x1a64")


def recipients(*ks) -> dict[bytes, bytes]:
    return {keys.node_id_of(k): keys.public_bytes(k) for k in ks}


def sealed(content: bytes, *to, meta: seal.Meta = META, pieces: int = 1) -> tuple[seal.Header, bytes]:
    s = seal.Sealer(SENDER, recipients(*(to or (R1,))), meta, 1_700_000_000_000)
    step = max(1, len(content) // pieces)
    ct = b"".join(s.feed(content[i : i + step]) for i in range(0, len(content), step)) + s.finish()
    return seal.Header.from_json(s.header.to_json()), ct  # through JSON, as the CS stores it


def opened(key, header: seal.Header, ct: bytes, step: int = 1 << 30) -> tuple[bytes, seal.Meta]:
    o = seal.Opener(key, header)
    out = b"".join(o.feed(ct[i : i + step]) for i in range(0, len(ct), step))
    tail, meta = o.finish()
    return out + tail, meta


def test_vector():
    """docs/PROTOCOL.md §11: fixed keys, data key, item ID; the signature is RFC 6979 (deterministic)."""
    s = seal.Sealer(SENDER, recipients(R1), META, 1_700_000_000_000, item=bytes([5]) * 16, eph=EPH, dk=bytes([4]) * 32)
    ct = s.feed(b"hello, offline world") + s.finish()
    h = s.header
    assert keys.checksum(keys.node_id_of(R1)) == "0x5050A4F4b3f9338C3472dcC01A87C76A144b3c9c"
    assert h.eph.hex() == "02531fe6068134503d2723133227c867ac8fa6c83c537e9a44c3c5bdbdcb1fe337"
    assert h.wraps[keys.node_id_of(R1)].hex() == (
        "ffd429de3ffc2e1821652a6bee08d94507803d4be80384bc10598a3d137490f068d79093f07a5db457f38fb3791045c1"
    )
    assert h.digest().hex() == "24508497a92c9d1b742c6301c8ebcb7af0d5e9fade604b0a8d9193a16f1d388d"
    assert len(ct) == 203
    assert hashlib.sha256(ct).hexdigest() == "d26304e397c8c4405aaaa21284281044ac119666684fbd6974df71f4089cf8f6"
    assert opened(R1, h, ct) == (b"hello, offline world", META)


@pytest.mark.parametrize("size", [0, 1, seal.CHUNK - 100, seal.CHUNK, seal.CHUNK + 1, 3 * seal.CHUNK + 5])
def test_round_trip_at_chunk_edges(size):
    content = os.urandom(size)
    header, ct = sealed(content, pieces=7)
    meta_len = len(
        b'{"app_id":"chat","service_id":"msg","service_item_id":"42","notice":"hello from 0x1a64","name":""}'
    )
    assert len(ct) == seal.sealed_size(4 + meta_len + size + seal.SIG_LEN)
    assert opened(R1, header, ct, step=4096) == (content, META)


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=3 * seal.CHUNK // 2), st.integers(1, 5), st.integers(1, seal.CHUNK + 200))
def test_any_split_of_the_streams(content, pieces, step):
    header, ct = sealed(content, pieces=pieces)
    assert opened(R1, header, ct, step=step)[0] == content


def test_every_recipient_opens_it_and_nobody_else():
    header, ct = sealed(b"for three", R1, R2, R3)
    for k in (R1, R2, R3):
        assert opened(k, header, ct)[0] == b"for three"
    with pytest.raises(seal.SealError, match="not addressed to"):
        seal.Opener(keys.generate(), header)


def test_a_swapped_wrap_does_not_unwrap():
    """The CS gives R2's wrap to R1 (e.g. to make R1 read R2's copy): the wrap is bound to R1's key and ID."""
    header, _ = sealed(b"x", R1, R2)
    r1, r2 = keys.node_id_of(R1), keys.node_id_of(R2)
    swapped = seal.Header(header.item, header.sender, header.eph, {r1: header.wraps[r2]}, header.created_ms)
    with pytest.raises(seal.SealError, match="^the item's key does not unwrap: not for this key, or tampered with$"):
        seal.Opener(R1, swapped)


@pytest.mark.parametrize("where", ["first", "middle", "last", "tag"])
def test_a_flipped_byte_anywhere_is_refused(where):
    header, ct = sealed(os.urandom(2 * seal.CHUNK + 10))
    i = {"first": 3, "middle": seal.CHUNK + 20, "last": len(ct) - 30, "tag": len(ct) - 1}[where]
    bad = ct[:i] + bytes([ct[i] ^ 1]) + ct[i + 1 :]
    with pytest.raises(seal.SealError, match="tampered"):
        opened(R1, header, bad)


def test_truncation_reordering_and_appending_are_refused():
    header, ct = sealed(os.urandom(2 * seal.CHUNK + 10))
    n = seal.CHUNK + seal.TAG_LEN
    for bad in (
        ct[: 2 * n],  # the final chunk dropped: the last one kept was not final
        ct[:n] + ct[2 * n :],  # a middle chunk dropped
        ct[n : 2 * n] + ct[:n] + ct[2 * n :],  # two chunks swapped
        ct + b"\0" * 20,
    ):  # bytes appended
        with pytest.raises(seal.SealError):
            opened(R1, header, bad)


def test_the_cs_cannot_swap_the_sender():
    """A header naming another sender changes the header hash every chunk is bound to; even with
    that fixed, the signature inside the ciphertext is the real sender's."""
    header, ct = sealed(b"from SENDER")
    forged = seal.Header(header.item, keys.node_id_of(R3), header.eph, header.wraps, header.created_ms)
    with pytest.raises(seal.SealError, match="tampered"):
        opened(R1, forged, ct)


def test_a_sender_signing_with_another_key_is_refused(monkeypatch):
    real = keys.sign_digest
    monkeypatch.setattr(seal.keys, "sign_digest", lambda key, d: real(R3, d))  # signs with the wrong key
    header, ct = sealed(b"who am I")
    monkeypatch.setattr(seal.keys, "sign_digest", real)
    with pytest.raises(seal.SealError, match="not signed by its sender"):
        opened(R1, header, ct)


def test_bad_headers_and_metadata_are_refused():
    header, _ = sealed(b"x")
    obj = header.to_json()
    for bad in (
        {**obj, "v": 2},
        {**obj, "item": "00"},
        {**obj, "eph": "02" + "00" * 32},
        {**obj, "wraps": {}},
        {**obj, "extra": 1},
        {k: v for k, v in obj.items() if k != "created"},
        "not a dict",
        {**obj, "wraps": {keys.checksum(bytes(20)): "00" * 47}},
    ):
        with pytest.raises(seal.SealError, match="malformed item header"):
            seal.Header.from_json(bad)
    with pytest.raises(ValueError, match="notice"):
        sealed(b"x", meta=seal.Meta("chat", notice="n" * (seal.MAX_NOTICE_CHARS + 1)))
    with pytest.raises(ValueError, match="app_id is required"):
        sealed(b"x", meta=seal.Meta(""))
    with pytest.raises(ValueError, match="1 to 16 recipients"):
        sealed(b"x", *[keys.generate() for _ in range(seal.MAX_RECIPIENTS + 1)])
    with pytest.raises(ValueError, match="does not belong"):
        seal.Sealer(SENDER, {keys.node_id_of(R1): keys.public_bytes(R2)}, META, 0)


# --- edges the mutation run found untested (make mutate) -----------------------------------------
META_RAW = len(seal.check_meta(META))


@pytest.mark.parametrize(
    "plain",
    [seal.CHUNK, 2 * seal.CHUNK, seal.CHUNK - 10, 2 * seal.CHUNK - 1, seal.CHUNK + 55, seal.CHUNK + seal.SIG_LEN],
)
def test_chunk_edges_of_the_whole_plaintext_stream(plain):
    """The plaintext stream (length, meta, content, signature) ends exactly at a chunk edge, or the
    signature spills into a chunk of its own; opened in one piece and byte by byte-ish."""
    content = os.urandom(plain - 4 - META_RAW - seal.SIG_LEN)
    header, ct = sealed(content)
    assert len(ct) == seal.sealed_size(plain) == plain + seal.TAG_LEN * -(-plain // seal.CHUNK)
    assert opened(R1, header, ct) == (content, META)
    assert opened(R1, header, ct, step=seal.CHUNK + seal.TAG_LEN)[0] == content


def test_the_sealer_knows_its_size_before_the_content_flows():
    """An upload announces the ciphertext size first (the CS checks it against what arrives)."""
    for size in (0, 1, seal.CHUNK, 3 * seal.CHUNK + 7):
        s = seal.Sealer(SENDER, recipients(R1), META, 0)
        announced = s.size_for(size)
        assert announced == len(s.feed(os.urandom(size)) + s.finish())


def test_sixteen_recipients_is_the_limit_on_both_sides():
    sixteen = [keys.generate() for _ in range(seal.MAX_RECIPIENTS)]
    header, ct = sealed(b"many", *sixteen)
    assert opened(sixteen[-1], header, ct)[0] == b"many"
    obj = header.to_json()
    extra = keys.generate()
    obj["wraps"][keys.checksum(keys.node_id_of(extra))] = "00" * 48
    with pytest.raises(seal.SealError, match="1 to 16 recipients"):
        seal.Header.from_json(obj)


@pytest.mark.parametrize(
    "field,value,why",
    [
        ("created", True, "bad item id, ephemeral key or created time"),
        ("created", "1", "bad item id, ephemeral key or created time"),
        ("item", "00" * 15, "bad item id"),
        ("eph", "02" * 32, "bad item id"),
        ("v", 2, "unknown version 2"),
        ("wraps", {}, "1 to 16 recipients"),
    ],
)
def test_header_fields_are_checked_one_by_one(field, value, why):
    obj = sealed(b"x")[0].to_json()
    with pytest.raises(seal.SealError, match=f"^malformed item header: {why}"):
        seal.Header.from_json({**obj, field: value})
    with pytest.raises(
        seal.SealError, match="^malformed item header: header must have exactly v, item, sender, eph, wraps, created$"
    ):
        seal.Header.from_json({**obj, "x": 1})


def test_metadata_fields_at_and_over_their_limits():
    """Every ID field and the notice may be exactly as long as its limit, not one character more
    (each checked on its own: a long service ID hidden behind a short app ID is refused)."""
    at, over = "i" * seal.MAX_FIELD_CHARS, "i" * (seal.MAX_FIELD_CHARS + 1)
    for field in ("app_id", "service_id", "service_item_id"):
        seal.check_meta(seal.Meta(**{"app_id": "a", field: at}))
        with pytest.raises(ValueError, match="IDs are at most"):
            seal.check_meta(seal.Meta(**{"app_id": "a", field: over}))
    seal.check_meta(seal.Meta("a", notice="n" * seal.MAX_NOTICE_CHARS))


def test_each_refusal_says_what_it_is():
    header, ct = sealed(b"once")
    o = seal.Opener(R1, header)
    o.feed(ct)
    o.finish()
    with pytest.raises(seal.SealError, match="^item already finished$"):
        o.finish()
    with pytest.raises(seal.SealError, match="^data after the end of the item$"):
        o.feed(b"more")
    o = seal.Opener(R1, header)
    o.feed(ct[: -seal.TAG_LEN - 1])
    with pytest.raises(seal.SealError, match="chunk 0 of item .* is tampered with or truncated"):
        o.finish()


def test_metadata_at_and_over_its_limit(monkeypatch):
    name = "n" * (seal.MAX_META_BYTES - len(seal.check_meta(seal.Meta("a"))))
    biggest = seal.Meta("a", name=name)
    assert len(seal.check_meta(biggest)) == seal.MAX_META_BYTES
    header, ct = sealed(b"x", meta=biggest)
    assert opened(R1, header, ct)[1] == biggest
    with pytest.raises(ValueError, match="over 2048 bytes"):
        seal.check_meta(seal.Meta("a", name=name + "n"))
    # a sender that skips the check: the opener refuses on its own
    monkeypatch.setattr(seal, "check_meta", lambda meta: b'{"app_id":"a","name":"' + b"n" * 3000 + b'"}')
    header, ct = sealed(b"x")
    with pytest.raises(seal.SealError, match="^item metadata is too large$"):
        opened(R1, header, ct)
    monkeypatch.setattr(seal, "check_meta", lambda meta: b"not json")
    header, ct = sealed(b"x")
    with pytest.raises(seal.SealError, match="item metadata is malformed"):
        opened(R1, header, ct)


def test_a_short_signature_is_a_truncated_item(monkeypatch):
    monkeypatch.setattr(seal.keys, "sign_digest", lambda key, digest: b"\x01" * 10)
    header, ct = sealed(b"")
    monkeypatch.undo()
    with pytest.raises(seal.SealError, match="^item is truncated$"):
        opened(R1, header, ct)


def test_chunk_nonces_are_the_documented_layout():
    """docs/PROTOCOL.md §11: chunk i is sealed under the nonce i (11 bytes, big-endian) || final
    (0/1), AAD the header hash. Another implementation holding DK opens each chunk with exactly that
    nonce; a flag set on every chunk (or a nonce of another shape) would still round-trip with our
    own Opener, so only the layout itself tells them apart."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    dk = bytes([4]) * 32
    s = seal.Sealer(SENDER, recipients(R1), META, 1_700_000_000_000, dk=dk)
    ct = s.feed(os.urandom(seal.CHUNK + 10)) + s.finish()
    first, last = ct[: seal.CHUNK + seal.TAG_LEN], ct[seal.CHUNK + seal.TAG_LEN :]
    aad = s.header.digest()
    assert len(AESGCM(dk).decrypt((0).to_bytes(11, "big") + b"\x00", first, aad)) == seal.CHUNK
    AESGCM(dk).decrypt((1).to_bytes(11, "big") + b"\x01", last, aad)


def test_a_metadata_length_past_2_gib_is_too_large_not_negative():
    """Adversary: a sender whose own Sealer claims a metadata length with the top bit set (read as
    signed it would be negative and pass the size check)."""
    s = seal.Sealer(SENDER, recipients(R1), META, 1_700_000_000_000)
    s._buf[:4] = (1 << 31).to_bytes(4, "big")
    ct = s.feed(b"x") + s.finish()
    with pytest.raises(seal.SealError, match="^item metadata is too large$"):
        opened(R1, seal.Header.from_json(s.header.to_json()), ct)


@pytest.mark.parametrize(
    "extra, why",
    [(0, "^item metadata is malformed: "), (1, "^item is truncated$"), (10, "^item is truncated$")],
)
def test_a_metadata_length_that_swallows_the_item_is_refused_for_what_it_is(extra, why):
    """Adversary: a sender whose own Sealer claims a metadata length reaching exactly to the end
    of the item (its content and signature read as metadata: malformed), or past it (the
    metadata never completes: truncated). Neither is taken for metadata followed by content."""
    s = seal.Sealer(SENDER, recipients(R1), META, 1_700_000_000_000)
    content = b"content"
    claim = len(s._buf) - 4 + len(content) + seal.SIG_LEN + extra
    s._buf[:4] = claim.to_bytes(4, "big")
    ct = s.feed(content) + s.finish()
    with pytest.raises(seal.SealError, match=why):
        opened(R1, seal.Header.from_json(s.header.to_json()), ct)


def test_several_chunks_fed_at_once_all_come_out():
    """Content of several chunks in one feed: every complete chunk comes out of that feed, in
    order (none overwritten by the next)."""
    content = os.urandom(3 * seal.CHUNK + 5)
    header, ct = sealed(content)
    assert opened(R1, header, ct) == (content, META)
