"""Registration Request: parse it and decide, without I/O, whether a DC may accept it.

A DC checks everything NodeRegistry.sol will check (so it never acknowledges a record the chain
will refuse) plus what only the DC sees: that the public key is the node's own and that the
addresses are well-formed. Spec: docs/PROTOCOL.md §5.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

import coincurve

from ntm import keys
from ntm.errors import NtmError, ParseError, SignatureError
from ntm.record import MAX_FUTURE_MS, Domain, NodeTransaction

# A node reports at most this many local addresses: enough for dual-stack multi-homing, small
# enough that one request cannot bloat the DC's store.
MAX_LOCAL_ADDRS = 8


class RegistrationError(NtmError):
    """A Registration Request the DC refuses; `code` is a stable machine-readable reason."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class RegistrationRequest:
    record: NodeTransaction
    signature: bytes
    pubkey: bytes
    local_addrs: tuple[str, ...]

    @classmethod
    def signed(cls, key: coincurve.PrivateKey, info: dict, timestamp: int, local_addrs: tuple[str, ...] = (),
               revoked: bool = False) -> "RegistrationRequest":
        """A request signed by the node `key`, naming the DC that `info` (its GET /v1/info) describes."""
        domain = Domain(info["chain_id"], keys.parse_node_id(info["registry"]))
        rec = NodeTransaction(keys.node_id_of(key), keys.parse_node_id(info["dc"]), timestamp, revoked)
        return cls(rec, rec.sign(key, domain), keys.public_bytes(key), tuple(local_addrs))

    def to_json(self) -> dict:
        return {
            "record": self.record.to_json(),
            "signature": self.signature.hex(),
            "pubkey": self.pubkey.hex(),
            "local_addrs": list(self.local_addrs),
        }


def parse_endpoint(text: str) -> tuple[str, int]:
    """`ip:port` or `[ipv6]:port` → (ip, port); ValueError if not an IP literal with a valid port."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"endpoint {text!r} is not ip:port")
    return str(ipaddress.ip_address(host)), int(port)


def format_endpoint(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def parse_request(obj: Any) -> RegistrationRequest:
    """Registration Request from decoded JSON; ParseError with a readable reason otherwise."""
    try:
        if not isinstance(obj, dict):
            raise ValueError("request must be a JSON object")
        record = NodeTransaction.from_json(obj["record"])
        signature = bytes.fromhex(obj["signature"])
        pubkey = bytes.fromhex(obj["pubkey"])
        addrs = obj.get("local_addrs", [])
        if not isinstance(addrs, list) or len(addrs) > MAX_LOCAL_ADDRS:
            raise ValueError(f"local_addrs must be a list of at most {MAX_LOCAL_ADDRS} endpoints")
        local = tuple(format_endpoint(*parse_endpoint(a)) for a in addrs)
    except KeyError as exc:
        raise ParseError(f"missing field {exc}") from None
    except (ValueError, TypeError, AttributeError) as exc:
        raise ParseError(str(exc)) from None
    return RegistrationRequest(record, signature, pubkey, local)


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
        raise RegistrationError(
            "wrong_dc", f"record names DC {keys.checksum(rec.dc)}, this DC is {keys.checksum(dc)}"
        )
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
    if rec.timestamp > now_ms + MAX_FUTURE_MS:
        raise RegistrationError("future", "record timestamp is too far in the future (check the clock)")
