"""Tunnel handshake (docs/PROTOCOL.md §6): Tunnel Request / Tunnel Response, one round trip.

Noise-KK shape on secp256k1 with HKDF-SHA256 and AES-256-GCM:

    pre-messages:  -> s   <- s          (both statics known: the DC delivered them, IDs check them)
    Request:       -> e, es, ss, {timestamp}
    Response:      <- e, ee, se, {}

The static-static ECDH is NTMobile's "end key"; the ephemeral terms add forward secrecy. The
prologue binds the path ID and both node IDs. Sans-I/O: no sockets, no clock reads (callers pass
`now`, monotonic seconds, and the wall time for the Request timestamp), randomness injectable (`rand(n) -> bytes`) for test vectors.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from collections import deque
from dataclasses import dataclass
from typing import Callable, ClassVar, TypeVar

import coincurve
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ntm import keys
from ntm.errors import NtmError, ParseError, SignatureError
from ntm.packet import MAC1_LEN, PATH_ID_LEN, HandshakeRequest, HandshakeResponse
from ntm.ratelimit import TokenBucket

PROTOCOL_NAME = b"NTM1_Noise_KK_secp256k1_AESGCM_SHA256"
MAC1_LABEL = b"ntm mac1"
#: Requests with a valid mac1 a responder takes through the ECDHs per path: a burst of 10, then
#: 10 per second (a peer retransmits 4/s). Only the two nodes can make a valid mac1, so this
#: bounds what a replay of captured Requests (on-path) can cost; outsiders never get this far.
MAC1_VALID_PER_S = (10.0, 10.0)
#: mac1 values of recent Requests remembered per path: a replayed copy is dropped without ECDH.
RECENT_MAC1S = 64
PROLOGUE_LABEL = b"NTMobile tunnel v1"
ZERO_NONCE = bytes(12)  # each handshake AEAD key encrypts exactly once
#: Pending attempts an initiator remembers: it sends a fresh Request on every retransmission
#: (a repeated one would be refused as a replay), and a late Response to any of the last few
#: must still complete the handshake.
MAX_PENDING_ATTEMPTS = 8
#: Minimum spacing of accepted Requests per path (WireGuard's 50/s): bounds the work a flood of
#: valid-but-stale-looking initiations can cause; retransmissions are 250 ms apart.
HANDSHAKE_MIN_INTERVAL = 0.02

Rand = Callable[[int], bytes]


class HandshakeError(NtmError):
    """A Tunnel Request/Response that must be refused."""


class PeerIdentityError(HandshakeError):
    """The public key offered for a peer does not hash to the node ID we expected."""


class HandshakeAuthError(HandshakeError):
    """AEAD tag check failed: wrong keys, tampered message, or not for this handshake."""


class HandshakeReplayError(HandshakeError):
    """A Request whose timestamp is not newer than the last accepted one."""


class HandshakeMacError(HandshakeError):
    """mac1 does not verify: not made by the peer of this path (checked before any ECDH)."""


class HandshakeRateError(HandshakeError):
    """A valid Request arriving less than HANDSHAKE_MIN_INTERVAL after the previous one."""


class UnknownPathError(HandshakeError):
    """A message for a path ID this handshake does not serve."""


class NoPendingHandshakeError(HandshakeError):
    """A Response arrived but this side has no Request outstanding."""


@dataclass(frozen=True, slots=True)
class Keys:
    """Result of a handshake: two directional AES-256-GCM keys and the transcript hash."""

    send: bytes
    recv: bytes
    initiator: bool  # True on the side that sent the Request
    handshake_hash: bytes  # final h: channel binding, equal on both sides
    timestamp: int  # the Request's timestamp (ns)


def _hkdf(salt: bytes, ikm: bytes, info: bytes, length: int = 64) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


class _Symmetric:
    """Noise SymmetricState: chaining key ck, handshake hash h, current key k."""

    __slots__ = ("ck", "h", "k")

    def __init__(self, ck: bytes, h: bytes, k: bytes | None = None) -> None:
        self.ck, self.h, self.k = ck, h, k

    def copy(self) -> _Symmetric:
        """A branch of the transcript for one message: chaining key and hash. Every message mixes
        a new key (mix_key) before it encrypts, so the cipher key is not carried over."""
        return _Symmetric(self.ck, self.h)

    def mix_hash(self, data: bytes) -> None:
        self.h = hashlib.sha256(self.h + data).digest()

    def mix_key(self, dh: bytes, label: bytes) -> None:
        out = _hkdf(self.ck, dh, b"ntm1 " + label)
        self.ck, self.k = out[:32], out[32:]

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        ct = AESGCM(self.k).encrypt(ZERO_NONCE, plaintext, self.h)
        self.mix_hash(ct)
        return ct

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        try:
            pt = AESGCM(self.k).decrypt(ZERO_NONCE, ciphertext, self.h)
        except InvalidTag:
            raise HandshakeAuthError("handshake message failed authentication") from None
        self.mix_hash(ciphertext)
        return pt

    def split(self) -> tuple[bytes, bytes]:
        out = _hkdf(self.ck, b"", b"ntm1 transport")
        return out[:32], out[32:]  # (initiator -> responder, responder -> initiator)


def _checked_peer(peer_id: bytes, peer_pub: bytes) -> bytes:
    """Uncompressed peer key, after checking it hashes to the node ID we asked for."""
    try:
        point = keys.parse_public(peer_pub)
    except SignatureError as exc:
        raise PeerIdentityError(f"peer public key is invalid: {exc}") from None
    got = keys.node_id(point)
    if got != bytes(peer_id):
        raise PeerIdentityError(f"peer key belongs to {keys.checksum(got)}, expected {keys.checksum(bytes(peer_id))}")
    return point.format(False)


def initial_state(path_id: bytes, init_id: bytes, init_pub: bytes, resp_id: bytes, resp_pub: bytes) -> _Symmetric:
    """State after protocol name, prologue (label || path ID || both node IDs) and both statics."""
    h = hashlib.sha256(PROTOCOL_NAME).digest()
    st = _Symmetric(h, h)
    st.mix_hash(PROLOGUE_LABEL + path_id + init_id + resp_id)
    st.mix_hash(init_pub)
    st.mix_hash(resp_pub)
    return st


def mac1_key(ss: bytes, path_id: bytes) -> bytes:
    """SHA-256("ntm mac1" || static-static ECDH || path ID): only the path's two nodes have it."""
    return hashlib.sha256(MAC1_LABEL + ss + path_id).digest()


def mac1(key: bytes, body: bytes) -> bytes:
    return hmac.new(key, body, hashlib.sha256).digest()[:MAC1_LEN]


def _ephemeral(rand: Rand) -> coincurve.PrivateKey:
    while True:
        try:
            return coincurve.PrivateKey(rand(32))
        except ValueError:  # zero or >= group order: draw again (probability ~2^-128)
            continue


def _check_path(path_id: bytes) -> bytes:
    path_id = bytes(path_id)
    if len(path_id) != PATH_ID_LEN:
        raise ValueError(f"path ID must be {PATH_ID_LEN} bytes")
    return path_id


M = TypeVar("M", HandshakeRequest, HandshakeResponse)


class _Party:
    """What both ends of a handshake hold: identities checked, transcript base, static-static ECDH,
    and the newest timestamp (sent by an initiator, accepted by a responder). Long-lived per path."""

    INITIATOR: ClassVar[bool]

    def __init__(
        self,
        static_key: coincurve.PrivateKey,
        peer_id: bytes,
        peer_pub: bytes,
        path_id: bytes,
        *,
        rand: Rand = os.urandom,
    ) -> None:
        self.path_id = _check_path(path_id)
        self.static_key = static_key
        self.local_pub = keys.public_bytes(static_key)
        self.local_id = keys.node_id(self.local_pub)
        self.peer_id = bytes(peer_id)
        self.peer_pub = _checked_peer(peer_id, peer_pub)
        self._rand = rand
        me, peer = (self.local_id, self.local_pub), (self.peer_id, self.peer_pub)
        self._base = initial_state(self.path_id, *(me + peer if self.INITIATOR else peer + me))
        self._ss = keys.ecdh(static_key, self.peer_pub)
        self._mac1_key = mac1_key(self._ss, self.path_id)
        self.last_timestamp = 0

    def _check_mac1(self, kind: type[M], data: bytes) -> None:
        """Length, type, path and mac1 from the raw bytes: the cheap gate before any curve
        operation (a forged or garbled message costs one HMAC)."""
        data = bytes(data)
        if len(data) != kind.LEN or data[0] != kind.TYPE:
            raise HandshakeError(f"malformed {kind.NAME}: {len(data)} bytes or wrong type")
        if data[1 : PATH_ID_LEN + 1] != self.path_id:
            raise UnknownPathError(f"{kind.NAME} for path {data[1:9].hex()}, expected {self.path_id.hex()}")
        if not hmac.compare_digest(data[-MAC1_LEN:], mac1(self._mac1_key, data[:-MAC1_LEN])):
            raise HandshakeMacError(f"{kind.NAME} mac1 does not verify")

    def _parse(self, kind: type[M], data: bytes) -> M:
        """The message, once _check_mac1 passed (length, type and path are checked there);
        HandshakeError if its contents do not parse (an ephemeral key off the curve)."""
        try:
            return kind.parse(data)
        except ParseError as exc:
            raise HandshakeError(f"malformed {kind.NAME}: {exc}") from None


class Initiator(_Party):
    """Sends Tunnel Requests for one path and completes on the matching Tunnel Response.

    Call `request(now, wall)` for every (re)transmission and every rekey.
    """

    INITIATOR = True

    def __init__(self, *args, **kw) -> None:  # noqa: ANN002, ANN003 - as _Party
        super().__init__(*args, **kw)
        self._pending: list[tuple[coincurve.PrivateKey, _Symmetric, int, float]] = []

    @property
    def pending(self) -> bool:
        return bool(self._pending)

    def cancel(self) -> None:
        """Forget outstanding Requests (the peer's own initiation won a collision)."""
        self._pending.clear()

    def sent_at(self) -> float | None:
        """`now` of the oldest outstanding Request (for the handshake RTT)."""
        return self._pending[0][3] if self._pending else None

    def request(self, now: float, wall: float | None = None) -> bytes:
        """A fresh Tunnel Request (new ephemeral key, timestamp > every earlier one).

        `now` (monotonic) dates the attempt for the RTT; `wall` (Unix seconds, default `now`) is
        the timestamp on the wire, which must grow across restarts of the initiator."""
        ts = max(int((now if wall is None else wall) * 1_000_000_000), self.last_timestamp + 1)
        self.last_timestamp = ts
        e = _ephemeral(self._rand)
        e_pub = e.public_key.format(compressed=True)
        st = self._base.copy()
        st.mix_hash(e_pub)
        st.mix_key(keys.ecdh(e, self.peer_pub), b"es")
        st.mix_key(self._ss, b"ss")
        sealed = st.encrypt_and_hash(struct.pack("!Q", ts))
        self._pending.append((e, st, ts, now))
        del self._pending[:-MAX_PENDING_ATTEMPTS]
        body = HandshakeRequest(self.path_id, e_pub, sealed).body()
        return body + mac1(self._mac1_key, body)

    def response(self, data: bytes) -> Keys:
        """Keys from a Tunnel Response to one of the outstanding Requests; HandshakeError otherwise."""
        self._check_mac1(HandshakeResponse, data)
        msg = self._parse(HandshakeResponse, data)
        if not self._pending:
            raise NoPendingHandshakeError("Tunnel Response but no Request outstanding")
        for e, st0, ts, _ in reversed(self._pending):
            st = st0.copy()
            st.mix_hash(msg.ephemeral)
            st.mix_key(keys.ecdh(e, msg.ephemeral), b"ee")
            st.mix_key(keys.ecdh(self.static_key, msg.ephemeral), b"se")
            try:
                st.decrypt_and_hash(msg.sealed)
            except HandshakeAuthError:
                continue
            self._pending.clear()
            send, recv = st.split()
            return Keys(send, recv, True, st.h, ts)
        raise HandshakeAuthError("Tunnel Response failed authentication (tampered, or wrong responder key)")


class Responder(_Party):
    """Answers Tunnel Requests for one path. Long-lived per path: keeps the last accepted
    timestamp so a replayed Request is refused."""

    INITIATOR = False

    def __init__(self, *args, **kw) -> None:  # noqa: ANN002, ANN003 - as _Party
        super().__init__(*args, **kw)
        self.last_accepted: float | None = None
        self._recent: deque[bytes] = deque(maxlen=RECENT_MAC1S)
        self._valid_rate = TokenBucket(MAC1_VALID_PER_S[1], MAC1_VALID_PER_S[0])

    def from_peer(self, data: bytes) -> bool:
        """A Request whose mac1 verifies (so it was made by the peer, or copied from it) — one
        HMAC, no state: what a node may act on without answering (a lost simultaneous open)."""
        try:
            self._check_mac1(HandshakeRequest, data)
        except HandshakeError:
            return False
        return True

    def respond(self, data: bytes, now: float) -> tuple[bytes, Keys]:
        """(Tunnel Response bytes, Keys) for a valid fresh Request; HandshakeError otherwise.

        Checks, in order: length, type, path ID and mac1 (one HMAC: nothing else is spent on a
        forgery), not a copy of a recent Request, the valid-mac1 rate, curve point (parse), AEAD
        tag (proves the initiator's static key), timestamp strictly newer, the per-path interval.
        Only the duplicate filter and the rate remember anything before all pass.
        """
        self._check_mac1(HandshakeRequest, data)
        tag = bytes(data[-MAC1_LEN:])
        if tag in self._recent:
            raise HandshakeReplayError("a copy of a recent Tunnel Request")
        self._recent.append(tag)
        if not self._valid_rate.take(now):
            raise HandshakeRateError("more Tunnel Requests with a valid mac1 than the per-path rate")
        msg = self._parse(HandshakeRequest, data)
        st = self._base.copy()
        st.mix_hash(msg.ephemeral)
        st.mix_key(keys.ecdh(self.static_key, msg.ephemeral), b"es")
        st.mix_key(self._ss, b"ss")
        try:
            (ts,) = struct.unpack("!Q", st.decrypt_and_hash(msg.sealed))
        except HandshakeAuthError:
            raise HandshakeAuthError(
                "Tunnel Request failed authentication (tampered, or not from the expected peer)"
            ) from None
        if ts <= self.last_timestamp:
            raise HandshakeReplayError(f"Tunnel Request timestamp {ts} is not newer than {self.last_timestamp}")
        if self.last_accepted is not None and 0 <= now - self.last_accepted < HANDSHAKE_MIN_INTERVAL:
            raise HandshakeRateError("Tunnel Requests arriving faster than the per-path limit")
        e = _ephemeral(self._rand)
        e_pub = e.public_key.format(compressed=True)
        st.mix_hash(e_pub)
        st.mix_key(keys.ecdh(e, msg.ephemeral), b"ee")
        st.mix_key(keys.ecdh(e, self.peer_pub), b"se")
        sealed = st.encrypt_and_hash(b"")
        self.last_timestamp = ts
        self.last_accepted = now
        i2r, r2i = st.split()
        body = HandshakeResponse(self.path_id, e_pub, sealed).body()
        return body + mac1(self._mac1_key, body), Keys(r2i, i2r, False, st.h, ts)
