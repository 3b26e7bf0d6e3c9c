"""Key files: a node's or DC's secp256k1 key as Web3 Secret Storage JSON (eth-account keystore).

File I/O lives here, at the edge, so ntm/keys.py stays pure.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import coincurve
from eth_account import Account

from ntm.errors import KeystoreError


def save_keystore(key: coincurve.PrivateKey, path: Path, passphrase: str = "") -> None:
    """Write the key as Web3 Secret Storage JSON (eth-account keystore), mode 0600, atomically."""
    blob = Account.encrypt(key.secret, passphrase)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(blob, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def load_keystore(path: Path, passphrase: str = "") -> coincurve.PrivateKey:
    """Read a keystore; KeystoreError for a missing/corrupt file or a wrong passphrase."""
    try:
        blob = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise KeystoreError(f"no key file at {path} (create one with `ntm keygen`)") from None
    except (OSError, ValueError) as exc:
        raise KeystoreError(f"key file {path} is unreadable: {exc}") from None
    try:
        secret = Account.decrypt(blob, passphrase)
    except ValueError as exc:
        if "MAC mismatch" in str(exc):
            raise KeystoreError(f"wrong passphrase for {path}") from None
        raise KeystoreError(f"key file {path} is invalid: {exc}") from None
    return coincurve.PrivateKey(bytes(secret))


def passphrase(env: str, file: Path | None = None) -> str:
    """A keystore passphrase: from `file` if given (one line; what containers mount as a secret),
    else from the environment variable `env` (empty if unset)."""
    if file is None:
        return os.environ.get(env, "")
    try:
        return Path(file).read_text().rstrip("\r\n")
    except OSError as exc:
        raise KeystoreError(f"passphrase file {file} is unreadable: {exc.strerror or exc}") from None
