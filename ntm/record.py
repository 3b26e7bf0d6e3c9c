"""The Node Transaction: a node's signed statement "I live at DC x, as of time t (revoked or not)".

EIP-712 typed data, so the same 32-byte digest is computed here and by NodeRegistry.sol, and
wallets can show what is being signed. Spec and test vector: docs/PROTOCOL.md §2.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import coincurve
from eth_utils import keccak

from ntm import keys
from ntm.errors import SignatureError

DOMAIN_NAME = "NTMobile NodeRegistry"
DOMAIN_VERSION = "1"
DOMAIN_TYPE = b"EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"
RECORD_TYPE = b"NodeTransaction(address node,address dc,uint64 timestamp,bool revoked)"
DOMAIN_TYPEHASH = keccak(DOMAIN_TYPE)
RECORD_TYPEHASH = keccak(RECORD_TYPE)

# How far ahead of the chain's clock a record's timestamp may be: tolerates node clock skew and
# block-time lag, yet stops a record dated far ahead from freezing a node's later updates.
# NodeRegistry.sol checks it against the MINED block's timestamp (never a simulation's).
MAX_FUTURE_MS = 10 * 60 * 1000
# How far behind a DC's clock a validator's clock may be. A DC accepts a record only up to
# MAX_FUTURE_MS - this ahead of its own clock, so a record it acknowledges is still inside the
# contract's window in whatever later block mines it (block timestamps only grow), whatever the
# age of the latest block when the DC accepted it. One minute: NTP-synced servers are within ms.
MAX_VALIDATOR_CLOCK_LAG_MS = 60 * 1000
DC_ACCEPT_FUTURE_MS = MAX_FUTURE_MS - MAX_VALIDATOR_CLOCK_LAG_MS
UINT64_MAX = 2**64 - 1


def next_timestamp(now_ms: int, previous: int) -> int:
    """The timestamp of a node's next record: now, yet strictly newer than its previous record
    (the chain refuses anything else) even if the clock stepped back or two records are made in
    one millisecond."""
    return max(now_ms, previous + 1)


def _word(value: int | bytes) -> bytes:
    """One 32-byte ABI word: an int big-endian, or an address left-padded."""
    if isinstance(value, bytes):
        return value.rjust(32, b"\0")
    return value.to_bytes(32)


@dataclass(frozen=True)
class Domain:
    """Where a record is valid: one chain and one registry contract (no cross-chain replay)."""

    chain_id: int
    registry: bytes  # 20-byte contract address

    @functools.cached_property
    def _separator(self) -> bytes:
        return keccak(
            DOMAIN_TYPEHASH
            + keccak(DOMAIN_NAME.encode())
            + keccak(DOMAIN_VERSION.encode())
            + _word(self.chain_id)
            + _word(self.registry)
        )

    def separator(self) -> bytes:
        """The EIP-712 domain separator (computed once per Domain: it is on every verification)."""
        return self._separator


@dataclass(frozen=True)
class NodeTransaction:
    """node: node ID; dc: home DC address; timestamp: ms since the Unix epoch, strictly
    increasing per node; revoked: terminal once on chain."""

    node: bytes
    dc: bytes
    timestamp: int
    revoked: bool = False

    def __post_init__(self) -> None:
        if len(self.node) != 20 or len(self.dc) != 20:
            raise ValueError("node and dc must be 20-byte addresses")
        if not 0 <= self.timestamp <= UINT64_MAX:
            raise ValueError("timestamp must fit in uint64")

    def struct_hash(self) -> bytes:
        return keccak(
            RECORD_TYPEHASH + _word(self.node) + _word(self.dc) + _word(self.timestamp) + _word(int(self.revoked))
        )

    def digest(self, domain: Domain) -> bytes:
        """The EIP-712 digest the node signs and the contract recovers from."""
        return keccak(b"\x19\x01" + domain.separator() + self.struct_hash())

    def sign(self, key: coincurve.PrivateKey, domain: Domain) -> bytes:
        """65-byte low-s signature by the node key; refuses to sign for another node."""
        if keys.node_id_of(key) != self.node:
            raise ValueError("the key does not belong to this record's node")
        return keys.sign_digest(key, self.digest(domain))

    def verify(self, signature: bytes, domain: Domain) -> None:
        """Raise SignatureError unless the node itself signed this record for this domain."""
        if keys.recover_node_id(self.digest(domain), signature) != self.node:
            raise SignatureError("record is not signed by its node")

    def to_json(self) -> dict:
        return {
            "node": keys.checksum(self.node),
            "dc": keys.checksum(self.dc),
            "timestamp": self.timestamp,
            "revoked": self.revoked,
        }


def to_compact(signature: bytes) -> tuple[bytes, bytes]:
    """EIP-2098 compact form (r, yParity<<255 | s) that the contract takes: 64 bytes of calldata, not 96."""
    if len(signature) != keys.SIGNATURE_LEN:
        raise SignatureError("signature must be 65 bytes")
    r, s, v = signature[:32], int.from_bytes(signature[32:64]), signature[64]
    if v not in (27, 28):
        raise SignatureError("signature v must be 27 or 28")
    return r, ((v - 27) << 255 | s).to_bytes(32)
