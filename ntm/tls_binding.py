"""A DC's TLS certificate bound to its chain key (issue 29 item 1; docs/PROTOCOL.md §5 "Channel
authenticated to the chain"): no CA, the registry already says which keys are DCs.

The DC signs, with its chain key, the SHA-256 of the certificate it serves (DER):

    digest  = keccak("NTM-DC-TLS-v1\\x00" || SHA-256(certificate DER))
    binding = {"cert_sha256": hex32, "sig": 65-byte low-s signature of digest (§1), hex}

and hands the binding out in `GET /v1/info` (`tls`). A client that expects DC `dc` (its on-chain
address) checks that the certificate the TLS handshake presented hashes to `cert_sha256` and that
`sig` recovers to `dc`; then it pins that hash for every later connection. An on-path attacker
presenting its own certificate cannot produce a binding for it.
"""

from __future__ import annotations

import hashlib

import coincurve
from eth_utils import keccak

from ntm import keys, messages
from ntm.errors import SignatureError

DOMAIN_TAG = b"NTM-DC-TLS-v1\x00"


def digest(cert_sha256: bytes) -> bytes:
    return keccak(DOMAIN_TAG + cert_sha256)


def bind(key: coincurve.PrivateKey, cert_der: bytes) -> messages.TlsBinding:
    """The DC's binding of the certificate `cert_der` to its chain key."""
    h = hashlib.sha256(cert_der).digest()
    return messages.TlsBinding(h.hex(), keys.sign_digest(key, digest(h)).hex())


def signer(binding: messages.TlsBinding, presented_der: bytes) -> bytes:
    """The chain address that vouches for the certificate presented (not yet a DC: the caller
    compares it with the one it expects); SignatureError if the binding is for another certificate."""
    h = hashlib.sha256(presented_der).digest()
    if bytes.fromhex(binding.cert_sha256) != h:
        raise SignatureError("the TLS certificate presented is not the one the DC's key vouches for")
    return keys.recover_node_id(digest(h), bytes.fromhex(binding.sig))


def check(binding: messages.TlsBinding | None, presented_der: bytes, dc: bytes) -> bytes:
    """The pinned certificate hash if `binding` is DC `dc`'s for the certificate presented;
    SignatureError otherwise (no binding, another certificate, another signer)."""
    if binding is None:
        raise SignatureError("the DC sent no TLS binding")
    if signer(binding, presented_der) != dc:
        raise SignatureError(f"the TLS binding is not signed by DC {keys.checksum(dc)}")
    return hashlib.sha256(presented_der).digest()
