"""Group keys that no server knows (docs/PROTOCOL.md §13), without any I/O.

A group key mixes two 32-byte random numbers: RN1, made by the group's admin and handed to the
members end to end (over tunnels, or sealed at a Cache Server), and RN2, made by the Group
Management Server (GMS, a service of the admin's DC) and refreshed at every membership change.
Neither side alone can compute the key of an epoch:

    GK(epoch)  = HKDF-SHA256(ikm = RN1[gen] || RN2[epoch], salt = gid,
                             info = "ntm-group-key-v1" || epoch u32be || name)
    MK(sender) = HKDF-SHA256(ikm = GK, salt = "", info = "ntm-group-msg-key-v1" || sender id)

The GMS hands RN2 to each member wrapped to that member's public key (`wrap_secret`). On every
removal or departure the admin makes a new RN1 generation as well, so a former member, the GMS,
or both together cannot derive later keys.

A group message is signed by its sender (GK alone cannot tell members apart) and carries the
epoch and a per-sender counter for replay protection:

    header = 0x01 || gid (16) || epoch u32be || sender (20) || counter u64be        (49 bytes)
    body   = AES-256-GCM(MK(sender), nonce = 0^4 || counter u64be, text, aad = header)
    sig    = sender signs SHA-256("ntm-group-msg-v1" || header || body)            (65 bytes)
    wire   = header || body || sig
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
from dataclasses import dataclass

import coincurve
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ntm import keys
from ntm.errors import CodedError, SignatureError
from ntm.tunnel import ReplayWindow

VERSION = 1
GID_LEN = 16
RN_LEN = 32
TAG_LEN = 16
SIG_LEN = keys.SIGNATURE_LEN
KEY_INFO = b"ntm-group-key-v1"
MSG_KEY_INFO = b"ntm-group-msg-key-v1"
MSG_SIG_TAG = b"ntm-group-msg-v1"
WRAP_INFO = b"ntm-group-wrap-v1"
# Text of one group message: fits one tunnel datagram (path MTU 1500) with the 130 bytes of
# header, tag and signature and the framing; longer content belongs in a Cache Server item.
MAX_TEXT = 1024
# Group names: one label people type on a command line, also bound into every key.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# Per-sender replay window: messages reach members over tunnels and Cache Servers, so out of
# order by up to this many counters is accepted once.
REPLAY_WINDOW = 1024

_HEADER = struct.Struct("!B16sI20sQ")
HEADER_LEN = _HEADER.size  # 49
WRAPPED_LEN = 33 + RN_LEN + TAG_LEN  # ephemeral public key || AES-GCM(secret)


class GroupError(CodedError):
    """A group message or key that does not check out (`code` says why)."""


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ValueError("a group name is 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
    return name


def new_gid() -> bytes:
    return os.urandom(GID_LEN)


def new_rn() -> bytes:
    return os.urandom(RN_LEN)


def _hkdf(ikm: bytes, salt: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(ikm)


def group_key(rn1: bytes, rn2: bytes, gid: bytes, name: str, epoch: int) -> bytes:
    """GK of one epoch: the seed's h(RN1 | RN2 | group name), with the epoch and group ID bound in."""
    if len(rn1) != RN_LEN or len(rn2) != RN_LEN or len(gid) != GID_LEN:
        raise ValueError("RN1 and RN2 are 32 bytes, the group ID 16")
    return _hkdf(rn1 + rn2, gid, KEY_INFO + struct.pack("!I", epoch) + name.encode())


def message_key(gk: bytes, sender: bytes) -> bytes:
    """Each sender encrypts under its own key, so counters (nonces) of two senders never collide."""
    return _hkdf(gk, b"", MSG_KEY_INFO + sender)


def _wrap_key(shared: bytes, gid: bytes, epoch: int, eph: bytes, recipient: bytes) -> bytes:
    return _hkdf(shared, gid, WRAP_INFO + struct.pack("!I", epoch) + eph + recipient)


def wrap_secret(
    secret: bytes, recipient_pub: bytes, gid: bytes, epoch: int, eph: coincurve.PrivateKey | None = None
) -> bytes:
    """`secret` (RN2) for one member only: ephemeral-static ECDH with its key, as §11's wraps."""
    eph = eph or keys.generate()
    eph_pub = eph.public_key.format(compressed=True)
    recipient = keys.node_id(recipient_pub)
    kek = _wrap_key(keys.ecdh(eph, recipient_pub), gid, epoch, eph_pub, recipient)
    return eph_pub + AESGCM(kek).encrypt(bytes(12), secret, gid + struct.pack("!I", epoch) + recipient)


def unwrap_secret(key: coincurve.PrivateKey, wrapped: bytes, gid: bytes, epoch: int) -> bytes:
    if len(wrapped) != WRAPPED_LEN:
        raise GroupError("bad_wrap", f"a wrapped secret is {WRAPPED_LEN} bytes, got {len(wrapped)}")
    eph_pub, box = wrapped[:33], wrapped[33:]
    me = keys.node_id_of(key)
    try:
        kek = _wrap_key(keys.ecdh(key, eph_pub), gid, epoch, eph_pub, me)
        return AESGCM(kek).decrypt(bytes(12), box, gid + struct.pack("!I", epoch) + me)
    except (InvalidTag, ValueError) as exc:
        raise GroupError(
            "bad_wrap", f"the wrapped secret does not open for this node: {str(exc) or 'tag mismatch'}"
        ) from None


@dataclass(frozen=True)
class GroupMessage:
    gid: bytes
    epoch: int
    sender: bytes
    counter: int
    body: bytes  # AES-GCM ciphertext and tag
    sig: bytes

    @property
    def header(self) -> bytes:
        return _HEADER.pack(VERSION, self.gid, self.epoch, self.sender, self.counter)

    def encode(self) -> bytes:
        return self.header + self.body + self.sig

    def digest(self) -> bytes:
        return hashlib.sha256(MSG_SIG_TAG + self.header + self.body).digest()

    @classmethod
    def decode(cls, data: bytes) -> "GroupMessage":
        """Structure only (nothing verified yet); GroupError if it is not a group message."""
        if len(data) < HEADER_LEN + TAG_LEN + SIG_LEN or len(data) > HEADER_LEN + MAX_TEXT + TAG_LEN + SIG_LEN:
            raise GroupError(
                "malformed",
                f"a group message is {HEADER_LEN + TAG_LEN + SIG_LEN}.."
                f"{HEADER_LEN + MAX_TEXT + TAG_LEN + SIG_LEN} bytes, got {len(data)}",
            )
        version, gid, epoch, sender, counter = _HEADER.unpack_from(data)
        if version != VERSION:
            raise GroupError("malformed", f"group message version {version}, expected {VERSION}")
        return cls(gid, epoch, sender, counter, data[HEADER_LEN:-SIG_LEN], data[-SIG_LEN:])

    def check_signature(self) -> None:
        """The sender named in the header signed it: a member cannot speak as another."""
        try:
            signer = keys.recover_node_id(self.digest(), self.sig)
        except SignatureError as exc:
            raise GroupError("bad_signature", f"group message signature: {exc}") from None
        if signer != self.sender:
            raise GroupError(
                "impersonation",
                f"message claims to be from {keys.checksum(self.sender)} but was signed by {keys.checksum(signer)}",
            )

    def decrypt(self, gk: bytes) -> bytes:
        try:
            return AESGCM(message_key(gk, self.sender)).decrypt(_nonce(self.counter), self.body, self.header)
        except InvalidTag:
            raise GroupError("undecryptable", f"not encrypted under this node's key of epoch {self.epoch}") from None


def check_still_member(members: dict[int, set[bytes]], epoch: int, sender: bytes) -> None:
    """A sender that is no member of some epoch after `epoch` was removed (or left) since: its
    messages are refused from then on, whatever epoch they are sealed under, as its reads are. It
    keeps the key of its last epoch, so without this it could still write to the remaining members.
    `members` maps each epoch the receiver knows to that epoch's members."""
    gone = [e for e, who in members.items() if e > epoch and sender not in who]
    if gone:
        raise GroupError(
            "removed",
            f"{keys.checksum(sender)} is no member of epoch {min(gone)}, after epoch {epoch}: "
            "removed or departed, its messages are refused",
        )


def _nonce(counter: int) -> bytes:
    return bytes(4) + struct.pack("!Q", counter)


def seal_message(
    key: coincurve.PrivateKey, gk: bytes, gid: bytes, epoch: int, counter: int, text: bytes
) -> GroupMessage:
    """Encrypt under the epoch's key (the sender's MK) and sign; the caller never reuses `counter`."""
    if len(text) > MAX_TEXT:
        raise ValueError(f"a group message is at most {MAX_TEXT} bytes (larger content: a Cache Server item)")
    sender = keys.node_id_of(key)
    header = _HEADER.pack(VERSION, gid, epoch, sender, counter)
    body = AESGCM(message_key(gk, sender)).encrypt(_nonce(counter), text, header)
    unsigned = GroupMessage(gid, epoch, sender, counter, body, b"")
    return GroupMessage(gid, epoch, sender, counter, body, keys.sign_digest(key, unsigned.digest()))


class Replay:
    """Per (epoch, sender) sliding windows; persisted with the member's state as plain numbers."""

    def __init__(self) -> None:
        self.windows: dict[tuple[int, bytes], ReplayWindow] = {}

    def check(self, msg: GroupMessage) -> None:
        w = self.windows.get((msg.epoch, msg.sender))
        why = w.check(msg.counter) if w is not None else None
        if why is not None:
            raise GroupError(
                "replay", f"message {msg.counter} of {keys.checksum(msg.sender)} in epoch {msg.epoch}: {why}"
            )

    def update(self, msg: GroupMessage) -> None:
        """After the message checked out (signature, decryption)."""
        self.windows.setdefault((msg.epoch, msg.sender), ReplayWindow(REPLAY_WINDOW)).update(msg.counter)

    def dump(self) -> list[list]:
        return [[e, s.hex(), w.top, hex(w.bits)] for (e, s), w in self.windows.items()]

    @classmethod
    def load(cls, rows: list) -> "Replay":
        r = cls()
        for epoch, sender, top, bits in rows:
            w = ReplayWindow(REPLAY_WINDOW)
            w.top, w.bits = int(top), int(bits, 16)
            r.windows[(int(epoch), bytes.fromhex(sender))] = w
        return r
