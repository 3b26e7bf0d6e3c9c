"""Registration Request: parse it and decide, without I/O, whether a DC may accept it.

A DC checks everything NodeRegistry.sol will check (so it never acknowledges a record the chain
will refuse) plus what only the DC sees: that the public key is the node's own and that the
addresses are well-formed. Spec: docs/PROTOCOL.md §5.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import coincurve

from ntm import keys, messages
from ntm.addr import format_endpoint, parse_endpoint
from ntm.errors import CodedError, SignatureError
from ntm.record import DC_ACCEPT_FUTURE_MS, Domain, NodeTransaction

# A node reports at most this many local addresses (messages.MAX_ENDPOINTS): enough for
# dual-stack multi-homing, small enough that one request cannot bloat the DC's store.
MAX_LOCAL_ADDRS = messages.MAX_ENDPOINTS


class RegistrationError(CodedError):
    """A Registration Request the DC refuses; `code` is a stable machine-readable reason."""

    STATUS = {"revoked": 403, "stale": 409, "dc_inactive": 503, "rate_limited": 429, "over_budget": 503}


@dataclass(frozen=True)
class RegistrationRequest:
    record: NodeTransaction
    signature: bytes
    pubkey: bytes
    local_addrs: tuple[str, ...]

    @classmethod
    def signed(
        cls,
        key: coincurve.PrivateKey,
        info: messages.DcInfoReply,
        timestamp: int,
        local_addrs: Sequence[str] = (),
        revoked: bool = False,
    ) -> "RegistrationRequest":
        """A request signed by the node `key`, naming the DC that `info` (its GET /v1/info) describes."""
        domain = Domain(info.chain_id, keys.parse_node_id(info.registry))
        rec = NodeTransaction(keys.node_id_of(key), keys.parse_node_id(info.dc), timestamp, revoked)
        return cls(rec, rec.sign(key, domain), keys.public_bytes(key), tuple(local_addrs))

    def body(self, wait_confirmed: bool = False) -> messages.RegisterBody:
        """The request as the struct the DC decodes (parse_request), so both ends share one shape."""
        r = self.record
        return messages.RegisterBody(
            messages.RecordJson(keys.checksum(r.node), keys.checksum(r.dc), r.timestamp, r.revoked),
            self.signature.hex(),
            self.pubkey.hex(),
            list(self.local_addrs),
            "confirmed" if wait_confirmed else None,
        )

    def to_json(self) -> dict:
        return messages.encode(self.body())


def parse_request(obj: Any) -> tuple[RegistrationRequest, bool]:
    """Registration Request from decoded JSON (or JSON text), and whether the node asked to wait
    for confirmation; ParseError with a readable reason otherwise."""
    body = messages.decode(messages.RegisterBody, obj)
    r = body.record
    record = NodeTransaction(keys.parse_node_id(r.node), keys.parse_node_id(r.dc), r.timestamp, r.revoked)
    local = tuple(format_endpoint(*parse_endpoint(a)) for a in body.local_addrs)
    req = RegistrationRequest(record, bytes.fromhex(body.signature), bytes.fromhex(body.pubkey), local)
    return req, body.wait == "confirmed"


def check_request(
    req: RegistrationRequest,
    dc: bytes,
    domain: Domain,
    now_ms: int,
    latest_timestamp: int,
    revoked: bool,
) -> None:
    """Raise RegistrationError unless the chain would accept `req` submitted by DC `dc`.

    `latest_timestamp`/`revoked`: the newest state of this node the DC knows, on chain or pending.
    """
    rec = req.record
    try:
        if keys.node_id(req.pubkey) != rec.node:
            raise RegistrationError("bad_pubkey", "public key does not hash to the record's node ID")
    except SignatureError:
        raise RegistrationError("bad_pubkey", "public key is not a secp256k1 point") from None
    if rec.dc != dc:
        raise RegistrationError("wrong_dc", f"record names DC {keys.checksum(rec.dc)}, this DC is {keys.checksum(dc)}")
    try:
        rec.verify(req.signature, domain)
    except SignatureError as exc:
        raise RegistrationError("bad_signature", f"bad signature: {exc}") from None
    if revoked:
        raise RegistrationError("revoked", "node is revoked; a revoked node ID can never register again")
    if rec.timestamp <= latest_timestamp:
        raise RegistrationError(
            "stale", f"record timestamp {rec.timestamp} is not newer than {latest_timestamp} (replay?)"
        )
    if rec.timestamp > now_ms + DC_ACCEPT_FUTURE_MS:
        raise RegistrationError("future", "record timestamp is too far in the future (check the clock)")
