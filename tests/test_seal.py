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
    ct = b"".join(s.feed(content[i:i + step]) for i in range(0, len(content), step)) + s.finish()
    return seal.Header.from_json(s.header.to_json()), ct  # through JSON, as the CS stores it


def opened(key, header: seal.Header, ct: bytes, step: int = 1 << 30) -> tuple[bytes, seal.Meta]:
    o = seal.Opener(key, header)
    out = b"".join(o.feed(ct[i:i + step]) for i in range(0, len(ct), step))
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
        "ffd429de3ffc2e1821652a6bee08d94507803d4be80384bc10598a3d137490f068d79093f07a5db457f38fb3791045c1")
    assert h.digest().hex() == "24508497a92c9d1b742c6301c8ebcb7af0d5e9fade604b0a8d9193a16f1d388d"
    assert len(ct) == 203
    assert hashlib.sha256(ct).hexdigest() == "d26304e397c8c4405aaaa21284281044ac119666684fbd6974df71f4089cf8f6"
    assert opened(R1, h, ct) == (b"hello, offline world", META)


@pytest.mark.parametrize("size", [0, 1, seal.CHUNK - 100, seal.CHUNK, seal.CHUNK + 1, 3 * seal.CHUNK + 5])
def test_round_trip_at_chunk_edges(size):
    content = os.urandom(size)
    header, ct = sealed(content, pieces=7)
    meta_len = len(b'{"app_id":"chat","service_id":"msg","service_item_id":"42","notice":"hello from 0x1a64","name":""}')
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
    with pytest.raises(seal.SealError, match="does not unwrap"):
        seal.Opener(R1, swapped)


@pytest.mark.parametrize("where", ["first", "middle", "last", "tag"])
def test_a_flipped_byte_anywhere_is_refused(where):
    header, ct = sealed(os.urandom(2 * seal.CHUNK + 10))
    i = {"first": 3, "middle": seal.CHUNK + 20, "last": len(ct) - 30, "tag": len(ct) - 1}[where]
    bad = ct[:i] + bytes([ct[i] ^ 1]) + ct[i + 1:]
    with pytest.raises(seal.SealError, match="tampered"):
        opened(R1, header, bad)


def test_truncation_reordering_and_appending_are_refused():
    header, ct = sealed(os.urandom(2 * seal.CHUNK + 10))
    n = seal.CHUNK + seal.TAG_LEN
    for bad in (ct[:2 * n],  # the final chunk dropped: the last one kept was not final
                ct[:n] + ct[2 * n:],  # a middle chunk dropped
                ct[n:2 * n] + ct[:n] + ct[2 * n:],  # two chunks swapped
                ct + b"\0" * 20):  # bytes appended
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
    for bad in ({**obj, "v": 2}, {**obj, "item": "00"}, {**obj, "eph": "02" + "00" * 32}, {**obj, "wraps": {}},
                {**obj, "extra": 1}, {k: v for k, v in obj.items() if k != "created"}, "not a dict",
                {**obj, "wraps": {keys.checksum(bytes(20)): "00" * 47}}):
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
