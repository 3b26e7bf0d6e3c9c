"""DC-signed envelopes: how one DC proves to another DC, a node or a relay that it said something.

An envelope is canonical JSON `{"kind", "from", "ts", "nonce", "body"}` plus a low-s signature by the
DC's chain key over keccak(DOMAIN_TAG || canonical JSON). The receiver checks the signer is an active
DC on chain (the caller supplies that check), that `ts` is fresh, and that `nonce` is new (ReplayGuard).
Spec: docs/PROTOCOL.md §4.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import coincurve

from ntm import keys, messages
from ntm.errors import ParseError, SignatureError

DOMAIN_TAG = b"NTM-DC-ENVELOPE-v1\x00"
# Envelopes older or newer than this are refused: covers clock skew between DCs yet keeps the
# replay cache small (it only has to remember nonces for this long).
MAX_SKEW_MS = 60_000
# Upper bound on remembered nonces; at 10k envelopes/s within MAX_SKEW_MS this would be too few,
# but a DC that busy evicts the oldest, which are about to expire anyway.
REPLAY_CACHE_SIZE = 100_000
NONCE_LEN = 16

T = TypeVar("T", bound=messages.Message)


def canonical(obj: Any) -> bytes:
    """One byte string per JSON value: sorted keys, no spaces, UTF-8."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass(frozen=True)
class Envelope:
    kind: str
    sender: bytes  # 20-byte DC address
    ts: int  # ms since the Unix epoch
    nonce: bytes
    body: dict

    def signed_part(self) -> dict:
        return {
            "kind": self.kind,
            "from": keys.checksum(self.sender),
            "ts": self.ts,
            "nonce": self.nonce.hex(),
            "body": self.body,
        }

    def digest(self) -> bytes:
        return keys.keccak(DOMAIN_TAG + canonical(self.signed_part()))


def seal(key: coincurve.PrivateKey, kind: str, body: dict, now_ms: int, nonce: bytes | None = None) -> dict:
    """Sign `body` as an envelope of `kind`; returns the JSON-ready dict."""
    env = Envelope(kind, keys.node_id_of(key), now_ms, nonce or os.urandom(NONCE_LEN), body)
    return {**env.signed_part(), "sig": keys.sign_digest(key, env.digest()).hex()}


def seal_body(
    key: coincurve.PrivateKey, kind: str, body: messages.Message, now_ms: int, nonce: bytes | None = None
) -> dict:
    """seal() of a struct: TypeError (a bug, not input) unless it is the body messages.BODY_OF names
    for `kind`, so no envelope leaves with a body its receiver cannot decode."""
    if type(body) is not messages.BODY_OF.get(kind):
        raise TypeError(f"a {kind!r} envelope carries a {messages.BODY_OF.get(kind)}, not {type(body).__name__}")
    return seal(key, kind, messages.encode(body), now_ms, nonce)


def body_of(env: Envelope, body: type[T]) -> T:
    """The envelope's body decoded as `body`, the struct messages.BODY_OF names for its kind
    (TypeError if the caller asked for another); ParseError naming the field if malformed."""
    if messages.BODY_OF.get(env.kind) is not body:
        raise TypeError(f"a {env.kind!r} envelope carries a {messages.BODY_OF.get(env.kind)}, not {body.__name__}")
    return messages.decode(body, env.body)


def signed(obj: dict) -> messages.SignedEnvelope:
    """A sealed envelope (seal's dict) as the struct that carries it inside other messages."""
    return messages.decode(messages.SignedEnvelope, obj)


def parse(obj: Any) -> tuple[Envelope, bytes]:
    """Envelope and signature from JSON (or a SignedEnvelope); ParseError for anything malformed."""
    if isinstance(obj, messages.SignedEnvelope):
        obj = messages.encode(obj)
    try:
        if not isinstance(obj, dict) or set(obj) != {"kind", "from", "ts", "nonce", "body", "sig"}:
            raise ValueError("envelope must have exactly kind, from, ts, nonce, body, sig")
        if not isinstance(obj["kind"], str) or not isinstance(obj["body"], dict):
            raise ValueError("kind must be a string and body an object")
        if not isinstance(obj["ts"], int) or isinstance(obj["ts"], bool):
            raise ValueError("ts must be an integer")
        nonce = bytes.fromhex(obj["nonce"])
        if len(nonce) != NONCE_LEN:
            raise ValueError("nonce must be 16 bytes")
        env = Envelope(obj["kind"], keys.parse_node_id(obj["from"]), obj["ts"], nonce, obj["body"])
        sig = bytes.fromhex(obj["sig"])
    except (ValueError, TypeError, AttributeError) as exc:
        raise ParseError(f"malformed envelope: {exc}") from None
    return env, sig


class ReplayGuard:
    """Remembers (sender, nonce) pairs seen within the freshness window."""

    def __init__(self, size: int = REPLAY_CACHE_SIZE) -> None:
        self._seen: OrderedDict[tuple[bytes, bytes], int] = OrderedDict()
        self._size = size

    def check_and_add(self, env: Envelope, now_ms: int) -> None:
        while self._seen and next(iter(self._seen.values())) < now_ms - 2 * MAX_SKEW_MS:
            self._seen.popitem(last=False)
        key = (env.sender, env.nonce)
        if key in self._seen:
            raise SignatureError("envelope replayed")
        self._seen[key] = now_ms
        if len(self._seen) > self._size:
            self._seen.popitem(last=False)


def open_envelope(
    obj: Any,
    kind: str,
    now_ms: int,
    is_trusted: Callable[[bytes], bool],
    guard: ReplayGuard | None = None,
) -> Envelope:
    """Verify and return an envelope: right kind, signed by its sender, sender trusted, fresh, new.

    Raises ParseError (malformed) or SignatureError (forged, untrusted, stale, replayed).
    """
    env, sig = parse(obj)
    if env.kind != kind:
        raise ParseError(f"expected a {kind!r} envelope, got {env.kind!r}")
    if keys.recover_node_id(env.digest(), sig) != env.sender:
        raise SignatureError("envelope signature does not match its sender")
    if not is_trusted(env.sender):
        raise SignatureError(f"{keys.checksum(env.sender)} is not an active DC")
    if abs(now_ms - env.ts) > MAX_SKEW_MS:
        raise SignatureError("envelope timestamp outside the freshness window")
    if guard is not None:
        guard.check_and_add(env, now_ms)
    return env


def open_body(
    obj: Any,
    kind: str,
    body: type[T],
    now_ms: int,
    is_trusted: Callable[[bytes], bool],
    guard: ReplayGuard | None = None,
) -> tuple[Envelope, T]:
    """open_envelope(), then its body as the struct `body` (body_of): one call where a receiver
    used to check the kind and decode the dict by hand."""
    env = open_envelope(obj, kind, now_ms, is_trusted, guard)
    return env, body_of(env, body)
