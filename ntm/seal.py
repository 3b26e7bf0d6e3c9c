"""Sealed items for the Cache Server: end-to-end encrypted, sender-signed, streamed.

No server ever holds a key that opens an item. One random data key (DK, the seed's "data
encryption key") encrypts the item; it is wrapped for each recipient under a key derived from an
ephemeral-static ECDH with the recipient's public key (the seed's "temporal key", here known only
to the sender and that recipient). The sender's signature travels inside the ciphertext, so the
recipient knows who sent the item and a Cache Server cannot swap senders. Spec and test vector:
docs/PROTOCOL.md §11.

    plaintext stream  = len(meta) u32be || meta (canonical JSON) || content || signature (65)
    signature         = sender signs sha256("ntm-cs-item-v1" || header_hash || sha256(meta || content))
    chunk i           = AES-256-GCM(DK, nonce = i u88be || final u8, aad = header_hash), CHUNK bytes
                        of plaintext each, the last one (final = 1) shorter or equal

`Sealer` and `Opener` take and give bytes in any pieces (sans-I/O): memory stays at one chunk
whatever the item's size. An `Opener` releases content before the signature at the end has been
checked; its caller keeps it aside (a temporary file) until `finish()` succeeds.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass

import coincurve
import msgspec
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ntm import keys
from ntm.envelope import canonical
from ntm.errors import NtmError, SignatureError

VERSION = 1
# Plaintext bytes per AEAD chunk: 16 bytes of tag per 64 KiB (0.02%), and what an Opener or a
# Sealer holds in memory at most.
CHUNK = 64 * 1024
TAG_LEN = 16
SIG_LEN = 65
ITEM_ID_LEN = 16
# Recipients per item: a wrap is 48 bytes; 16 keeps the signed upload header small.
MAX_RECIPIENTS = 16
# The notification text a recipient sees before fetching (the seed's push message): short.
MAX_NOTICE_CHARS = 140
MAX_FIELD_CHARS = 64  # application, service and service item IDs
MAX_META_BYTES = 2048
HEADER_TAG = b"ntm-cs-header-v1"
ITEM_TAG = b"ntm-cs-item-v1"
WRAP_INFO = b"ntm-cs-wrap-v1"


class SealError(NtmError):
    """An item that cannot be opened: not for us, tampered with, truncated, or badly signed."""

    CODE = "bad_item"
    DEFAULT_STATUS = 400


class Meta(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What the item is for (the seed's fields), encrypted with the content."""

    app_id: str
    service_id: str = ""
    service_item_id: str = ""
    notice: str = ""
    name: str = ""  # e.g. a file name


@dataclass(frozen=True)
class Header:
    """The item's public part: what the Cache Server stores in its index and can read."""

    item: bytes
    sender: bytes
    eph: bytes  # 33-byte compressed ephemeral public key
    wraps: dict[bytes, bytes]  # recipient node ID -> wrapped DK (48 bytes)
    created_ms: int

    def to_json(self) -> dict:
        return {
            "v": VERSION,
            "item": self.item.hex(),
            "sender": keys.checksum(self.sender),
            "eph": self.eph.hex(),
            "wraps": {keys.checksum(r): w.hex() for r, w in sorted(self.wraps.items())},
            "created": self.created_ms,
        }

    @classmethod
    def from_json(cls, obj: object) -> "Header":
        try:
            if not isinstance(obj, dict) or set(obj) != {"v", "item", "sender", "eph", "wraps", "created"}:
                raise ValueError("header must have exactly v, item, sender, eph, wraps, created")
            if obj["v"] != VERSION:
                raise ValueError(f"unknown version {obj['v']!r}")
            item, eph = bytes.fromhex(obj["item"]), bytes.fromhex(obj["eph"])
            wraps = {keys.parse_node_id(r): bytes.fromhex(w) for r, w in obj["wraps"].items()}
            created = obj["created"]
            if len(item) != ITEM_ID_LEN or len(eph) != 33 or not isinstance(created, int) or isinstance(created, bool):
                raise ValueError("bad item id, ephemeral key or created time")
            if not 1 <= len(wraps) <= MAX_RECIPIENTS or any(len(w) != 32 + TAG_LEN for w in wraps.values()):
                raise ValueError(f"1 to {MAX_RECIPIENTS} recipients, 48-byte wraps")
            keys.parse_public(eph)
            return cls(item, keys.parse_node_id(obj["sender"]), eph, wraps, created)
        except (ValueError, TypeError, AttributeError, KeyError, NtmError) as exc:
            raise SealError(f"malformed item header: {exc}") from None

    def digest(self) -> bytes:
        """header_hash: binds every chunk and the signature to this header."""
        return hashlib.sha256(HEADER_TAG + canonical(self.to_json())).digest()


def sealed_size(plain_len: int) -> int:
    """Ciphertext bytes for `plain_len` bytes of plaintext stream (meta and signature included)."""
    return plain_len + TAG_LEN * max(1, -(-plain_len // CHUNK))


def _kek(shared: bytes, item: bytes, eph: bytes, recipient: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=item, info=WRAP_INFO + eph + recipient).derive(shared)


def _nonce(index: int, final: bool) -> bytes:
    return index.to_bytes(11, "big") + (b"\x01" if final else b"\x00")


def check_meta(meta: Meta) -> bytes:
    """The canonical bytes of valid metadata; ValueError naming the field that is not."""
    if not meta.app_id or max(len(meta.app_id), len(meta.service_id), len(meta.service_item_id)) > MAX_FIELD_CHARS:
        raise ValueError(f"app_id is required; IDs are at most {MAX_FIELD_CHARS} characters")
    if len(meta.notice) > MAX_NOTICE_CHARS:
        raise ValueError(f"the notice is at most {MAX_NOTICE_CHARS} characters")
    raw = msgspec.json.encode(meta)
    if len(raw) > MAX_META_BYTES:
        raise ValueError(f"item metadata is over {MAX_META_BYTES} bytes")
    return raw


class Sealer:
    """Encrypts one item for `recipients` (node ID -> 65-byte public key) as it is fed."""

    def __init__(
        self,
        sender: coincurve.PrivateKey,
        recipients: dict[bytes, bytes],
        meta: Meta,
        created_ms: int,
        *,
        item: bytes | None = None,
        eph: coincurve.PrivateKey | None = None,
        dk: bytes | None = None,
    ) -> None:
        """`item`, `eph`, `dk` are random unless given (test vectors only)."""
        if not 1 <= len(recipients) <= MAX_RECIPIENTS:
            raise ValueError(f"an item has 1 to {MAX_RECIPIENTS} recipients")
        for rid, pub in recipients.items():
            if keys.node_id(pub) != rid:
                raise ValueError(f"public key does not belong to {keys.checksum(rid)}")
        meta_raw = check_meta(meta)
        self._key = sender
        self._dk = dk or os.urandom(32)
        item = item or os.urandom(ITEM_ID_LEN)
        eph = eph or keys.generate()
        eph_pub = eph.public_key.format(True)
        wraps = {
            rid: AESGCM(_kek(keys.ecdh(eph, pub), item, eph_pub, rid)).encrypt(bytes(12), self._dk, item + rid)
            for rid, pub in recipients.items()
        }
        self.header = Header(item, keys.node_id_of(sender), eph_pub, wraps, created_ms)
        self._hash = self.header.digest()
        self._aead = AESGCM(self._dk)
        self._content = hashlib.sha256(meta_raw)
        self._meta_len = len(meta_raw)
        self._buf = bytearray(struct.pack(">I", len(meta_raw)) + meta_raw)
        self._index = 0

    def size_for(self, content_len: int) -> int:
        """The ciphertext size of this item once `content_len` bytes of content are fed."""
        return sealed_size(4 + self._meta_len + content_len + SIG_LEN)

    def _chunk(self, data: bytes, final: bool) -> bytes:
        out = self._aead.encrypt(_nonce(self._index, final), data, self._hash)
        self._index += 1
        return out

    def _full_chunks(self) -> bytes:
        """Every chunk of the buffer that more bytes follow (a chunk is held back until they do)."""
        out = bytearray()
        while len(self._buf) > CHUNK:
            out += self._chunk(bytes(self._buf[:CHUNK]), False)
            del self._buf[:CHUNK]
        return bytes(out)

    def feed(self, data: bytes) -> bytes:
        """Content in; the ciphertext chunks now complete out."""
        self._content.update(data)
        self._buf += data
        return self._full_chunks()

    def finish(self) -> bytes:
        """The rest: the signature goes in, the final chunk(s) come out."""
        digest = hashlib.sha256(ITEM_TAG + self._hash + self._content.digest()).digest()
        self._buf += keys.sign_digest(self._key, digest)
        out = self._full_chunks() + self._chunk(bytes(self._buf), True)
        self._buf.clear()
        return out


class Opener:
    """Decrypts one item addressed to `key` as its ciphertext is fed."""

    def __init__(self, key: coincurve.PrivateKey, header: Header) -> None:
        me = keys.node_id_of(key)
        wrap = header.wraps.get(me)
        if wrap is None:
            raise SealError(f"item {header.item.hex()} is not addressed to {keys.checksum(me)}")
        try:
            dk = AESGCM(_kek(keys.ecdh(key, header.eph), header.item, header.eph, me)).decrypt(
                bytes(12), wrap, header.item + me
            )
        except (InvalidTag, SignatureError):
            raise SealError("the item's key does not unwrap: not for this key, or tampered with") from None
        self.header = header
        self._hash = header.digest()
        self._aead = AESGCM(dk)
        self._ct = bytearray()
        self._plain = bytearray()  # decrypted, not yet released: the meta prefix, the last SIG_LEN bytes
        self._index = 0
        self._meta_len: int | None = None
        self.meta: Meta | None = None
        self._content = hashlib.sha256()
        self._done = False

    def _open(self, data: bytes, final: bool) -> None:
        try:
            self._plain += self._aead.decrypt(_nonce(self._index, final), data, self._hash)
        except InvalidTag:
            raise SealError(
                f"chunk {self._index} of item {self.header.item.hex()} is tampered with or truncated"
            ) from None
        self._index += 1

    def _release(self) -> bytes:
        if self._meta_len is None and len(self._plain) >= 4:
            self._meta_len = struct.unpack(">I", self._plain[:4])[0]
            if self._meta_len > MAX_META_BYTES:
                raise SealError("item metadata is too large")
        if self.meta is None and self._meta_len is not None and len(self._plain) >= 4 + self._meta_len:
            raw = bytes(self._plain[4 : 4 + self._meta_len])
            try:
                self.meta = msgspec.json.decode(raw, type=Meta)
            except msgspec.DecodeError as exc:
                raise SealError(f"item metadata is malformed: {exc}") from None
            self._content.update(raw)
            del self._plain[: 4 + self._meta_len]
        if self.meta is None or len(self._plain) <= SIG_LEN:
            return b""
        out = bytes(self._plain[:-SIG_LEN])
        del self._plain[:-SIG_LEN]
        self._content.update(out)
        return out

    def feed(self, data: bytes) -> bytes:
        """Ciphertext in; content out (not yet authenticated as the sender's: see finish())."""
        if self._done:
            raise SealError("data after the end of the item")
        self._ct += data
        while len(self._ct) > CHUNK + TAG_LEN:
            self._open(bytes(self._ct[: CHUNK + TAG_LEN]), False)
            del self._ct[: CHUNK + TAG_LEN]
        return self._release()

    def finish(self) -> tuple[bytes, Meta]:
        """The last content bytes and the item's metadata, once the final chunk and the sender's
        signature check out; SealError otherwise."""
        if self._done:
            raise SealError("item already finished")
        self._open(bytes(self._ct), True)
        self._ct.clear()
        self._done = True
        out = self._release()
        if self.meta is None or len(self._plain) != SIG_LEN:
            raise SealError("item is truncated")
        digest = hashlib.sha256(ITEM_TAG + self._hash + self._content.digest()).digest()
        try:
            signer = keys.recover_node_id(digest, bytes(self._plain))
        except SignatureError:
            signer = b""
        if signer != self.header.sender:
            raise SealError(f"item is not signed by its sender {keys.checksum(self.header.sender)}")
        return out, self.meta
