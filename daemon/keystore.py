"""Key files: a node's or DC's secp256k1 key as Web3 Secret Storage JSON (eth-account keystore).

File I/O lives here, at the edge, so ntm/keys.py stays pure. Writing uses eth-account; reading
is the few lines of the v3 format (scrypt or PBKDF2, AES-128-CTR, keccak MAC) on hashlib and
cryptography, because importing eth-account costs ~0.5 s (its keyfile module loads a BLS
pairing library) on every command that opens a key. tests/test_keystore.py checks both ways.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
from pathlib import Path

import coincurve
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from eth_utils import keccak

from daemon import atomic_file, startup
from ntm.errors import KeystoreError

# hashlib.scrypt refuses more than maxmem; eth-account's default (n = 2^18, r = 8) needs 256 MiB.
SCRYPT_MAXMEM = 512 << 20


def save_keystore(key: coincurve.PrivateKey, path: Path, passphrase: str = "") -> None:
    """Write the key as Web3 Secret Storage JSON (eth-account keystore), mode 0600, atomically."""
    from eth_account import Account  # only here: see the module's docstring

    blob = Account.encrypt(key.secret, passphrase)
    atomic_file.replace_file(Path(path), json.dumps(blob).encode(), atomic_file.SECRET_FILE_MODE)


def read_blob(path: Path) -> dict:
    """The keystore's JSON, unopened (no passphrase needed); KeystoreError for a missing/corrupt file."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise KeystoreError(f"no key file at {path} (create one with `ntm keygen`)") from None
    except (OSError, ValueError) as exc:
        raise KeystoreError(f"key file {path} is unreadable: {exc}") from None


def load_keystore(path: Path, passphrase: str = "") -> coincurve.PrivateKey:
    """Read a keystore; KeystoreError for a missing/corrupt file or a wrong passphrase."""
    blob = read_blob(path)
    try:
        secret = decrypt(blob, passphrase)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise KeystoreError(f"key file {path} is invalid: {exc!r}") from None
    if secret is None:
        raise KeystoreError(f"wrong passphrase for {path}")
    return coincurve.PrivateKey(secret)


def decrypt(blob: dict, passphrase: str) -> bytes | None:
    """The secret of a v3 keystore, or None if the MAC says the passphrase is wrong."""
    if blob.get("version") != 3:
        raise ValueError(f"keystore version {blob.get('version')!r}, expected 3")
    crypto = blob.get("crypto") or blob["Crypto"]
    params, pw = crypto["kdfparams"], passphrase.encode()
    salt = bytes.fromhex(params["salt"])
    if crypto["kdf"] == "scrypt":
        derived = hashlib.scrypt(
            pw, salt=salt, n=params["n"], r=params["r"], p=params["p"], dklen=params["dklen"], maxmem=SCRYPT_MAXMEM
        )
    elif crypto["kdf"] == "pbkdf2" and params.get("prf") == "hmac-sha256":
        derived = hashlib.pbkdf2_hmac("sha256", pw, salt, params["c"], params["dklen"])
    else:
        raise ValueError(f"unsupported key derivation {crypto['kdf']!r}")
    if crypto["cipher"] != "aes-128-ctr" or len(derived) < 32:
        raise ValueError(f"unsupported cipher {crypto['cipher']!r}")
    ciphertext = bytes.fromhex(crypto["ciphertext"])
    if not hmac.compare_digest(keccak(derived[16:32] + ciphertext), bytes.fromhex(crypto["mac"])):
        return None
    iv = bytes.fromhex(crypto["cipherparams"]["iv"])
    dec = Cipher(algorithms.AES(derived[:16]), modes.CTR(iv)).decryptor()
    return dec.update(ciphertext) + dec.finalize()


def passphrase_file_arg(p: argparse.ArgumentParser, env: str) -> None:
    """--passphrase-file, for `passphrase(env, args.passphrase_file)`: every server's key file opens the same way."""
    p.add_argument(
        "--passphrase-file",
        type=startup.readable_file,
        metavar="FILE",
        help=f"read the key's passphrase from this file instead of ${env}",
    )


def passphrase(env: str, file: Path | None = None) -> str:
    """A keystore passphrase: from `file` if given (one line; what containers mount as a secret),
    else from the environment variable `env` (empty if unset)."""
    if file is None:
        return os.environ.get(env, "")
    try:
        return Path(file).read_text().rstrip("\r\n")
    except OSError as exc:
        raise KeystoreError(f"passphrase file {file} is unreadable: {exc.strerror or exc}") from None
