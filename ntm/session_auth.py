"""Proof of key possession for a node's WebSocket session with its DC (docs/PROTOCOL.md §5).

The DC sends a fresh random challenge; the node signs keccak(TAG || dc || challenge). Binding the
DC address stops a malicious DC from relaying the challenge of another DC to impersonate the node.
"""

from __future__ import annotations

import coincurve
from eth_utils import keccak

from ntm import keys

TAG = b"NTM-SESSION-v1\x00"
CHALLENGE_LEN = 32


def challenge_digest(dc: bytes, challenge: bytes) -> bytes:
    return keccak(TAG + dc + challenge)


def answer(key: coincurve.PrivateKey, dc: bytes, challenge: bytes) -> bytes:
    return keys.sign_digest(key, challenge_digest(dc, challenge))


def verify(node: bytes, dc: bytes, challenge: bytes, signature: bytes) -> None:
    """SignatureError unless `node` signed this DC's challenge."""
    if keys.recover_node_id(challenge_digest(dc, challenge), signature) != node:
        raise keys.SignatureError("session answer is not signed by the node")
