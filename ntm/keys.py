"""secp256k1 identities: node IDs, low-s recoverable signatures, ECDH, keystore files.

A node ID is the Ethereum address of the node key (keccak256(pubkey)[12:]), so the chain's
`ecrecover` and Python agree on who signed what, and an ID certifies its own public key.
"""

from __future__ import annotations

import functools

import coincurve
from Crypto.Hash import keccak as _keccak
from eth_utils import to_checksum_address

from ntm.errors import SignatureError

# Order of the secp256k1 group; a signature with s > N/2 is the malleable twin of a valid one.
SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
HALF_N = SECP256K1_N // 2

NODE_ID_LEN = 20
SIGNATURE_LEN = 65  # r (32) || s (32) || v (1, 27 or 28), as Ethereum writes it
PUBKEY_LEN = 65  # uncompressed SEC1: 0x04 || x || y


def generate() -> coincurve.PrivateKey:
    """A fresh random private key."""
    return coincurve.PrivateKey()


def private_key(secret: bytes) -> coincurve.PrivateKey:
    """Private key from its 32 secret bytes."""
    return coincurve.PrivateKey(secret)


def public_bytes(key: coincurve.PrivateKey) -> bytes:
    """Uncompressed 65-byte public key of a private key."""
    return key.public_key.format(False)


def parse_public(data: bytes) -> coincurve.PublicKey:
    """Public key from SEC1 bytes; raises SignatureError for bytes that are not a curve point."""
    try:
        return coincurve.PublicKey(bytes(data))
    except (ValueError, TypeError) as exc:
        raise SignatureError(f"not a secp256k1 public key: {exc}") from None


def keccak(data: bytes) -> bytes:
    """Keccak-256 (Ethereum's), straight from pycryptodome: eth_utils' wrapper costs half again
    as much, and a Direction Request hashes ~20 times (issue 30)."""
    return _keccak.new(digest_bits=256, data=data).digest()


def node_id(public: bytes | coincurve.PublicKey) -> bytes:
    """Node ID (20 bytes) of a public key: keccak256 of the 64-byte uncompressed point, last 20 bytes."""
    point = public if isinstance(public, coincurve.PublicKey) else parse_public(public)
    return _node_id(point.format(False)[1:])


# Public keys whose node ID is kept: the DC's own (every envelope it seals) and its peers' (every
# envelope it opens) come back all the time. Bounded: fresh keys only evict.
NODE_IDS_KEPT = 16384


@functools.lru_cache(maxsize=NODE_IDS_KEPT)
def _node_id(point: bytes) -> bytes:
    return keccak(point)[12:]


def node_id_of(key: coincurve.PrivateKey) -> bytes:
    """Node ID of a private key."""
    return node_id(key.public_key)


# Node IDs and DC addresses whose EIP-55 form is kept: a DC writes the same few IDs into every
# message of a Direction Request (~36 times; 40% of its CPU uncached, issue 30). Bounded (~4 MB),
# so a stream of random IDs only evicts.
CHECKSUMS_KEPT = 16384


def checksum(nid: bytes) -> str:
    """Human form of a node ID or DC address (EIP-55 mixed-case hex)."""
    return _checksum(nid) if type(nid) is bytes else to_checksum_address(nid)


@functools.lru_cache(maxsize=CHECKSUMS_KEPT)
def _checksum(nid: bytes) -> str:
    return to_checksum_address(nid)


def parse_node_id(text: str) -> bytes:
    """Node ID from its 0x hex form (any case); raises ValueError with a readable message."""
    raw = text[2:] if text[:2] in ("0x", "0X") else text
    try:
        nid = bytes.fromhex(raw)
    except ValueError:
        raise ValueError(f"node ID {text!r} is not hex") from None
    if len(nid) != NODE_ID_LEN:
        raise ValueError(f"node ID {text!r} is {len(nid)} bytes, expected {NODE_ID_LEN}")
    return nid


def sign_digest(key: coincurve.PrivateKey, digest: bytes) -> bytes:
    """65-byte r||s||v signature of a 32-byte digest; libsecp256k1 always yields low s."""
    sig = key.sign_recoverable(digest, hasher=None)
    return sig[:64] + bytes([sig[64] + 27])


def recover(digest: bytes, signature: bytes) -> coincurve.PublicKey:
    """Public key that made `signature` over `digest`.

    Refuses what the contract refuses: wrong length, v not 27/28, r or s zero or out of
    range, and high s (the malleable twin), so Python never accepts a signature the chain rejects.
    """
    if len(signature) != SIGNATURE_LEN:
        raise SignatureError(f"signature is {len(signature)} bytes, expected {SIGNATURE_LEN}")
    r = int.from_bytes(signature[:32])
    s = int.from_bytes(signature[32:64])
    v = signature[64]
    if v not in (27, 28):
        raise SignatureError(f"signature v is {v}, expected 27 or 28")
    if not 0 < r < SECP256K1_N or not 0 < s < SECP256K1_N:
        raise SignatureError("signature r or s out of range")
    if s > HALF_N:
        raise SignatureError("signature has high s (malleable form refused)")
    try:
        return coincurve.PublicKey.from_signature_and_message(signature[:64] + bytes([v - 27]), digest, hasher=None)
    except ValueError as exc:
        raise SignatureError(f"signature does not recover: {exc}") from None


def recover_node_id(digest: bytes, signature: bytes) -> bytes:
    """Node ID of the key that signed `digest`."""
    return node_id(recover(digest, signature))


def ecdh(key: coincurve.PrivateKey, peer_public: bytes) -> bytes:
    """32-byte ECDH secret: SHA-256 of the compressed shared point (libsecp256k1's default)."""
    return key.ecdh(parse_public(peer_public).format())
