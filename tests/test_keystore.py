"""Key files: what daemon/keystore.py reads is what eth-account writes, and the other way round;
wrong passphrases and damaged files are refused with one clear error."""

from __future__ import annotations

import json

import pytest
from eth_account import Account

from daemon import keystore
from ntm import keys
from ntm.errors import KeystoreError


@pytest.mark.parametrize("kdf", ["scrypt", "pbkdf2"])
def test_reads_what_eth_account_writes(tmp_path, kdf):
    key = keys.generate()
    path = tmp_path / "k.json"
    path.write_text(json.dumps(Account.encrypt(key.secret, "pw", kdf=kdf, iterations=2 if kdf == "scrypt" else 1000)))
    assert keystore.load_keystore(path, "pw").secret == key.secret
    with pytest.raises(KeystoreError, match="wrong passphrase"):
        keystore.load_keystore(path, "other")


def test_eth_account_reads_what_we_write(tmp_path):
    key = keys.generate()
    keystore.save_keystore(key, tmp_path / "k.json", "pw")
    blob = json.loads((tmp_path / "k.json").read_text())
    assert bytes(Account.decrypt(blob, "pw")) == key.secret
    assert keystore.load_keystore(tmp_path / "k.json", "pw").secret == key.secret
    assert (tmp_path / "k.json").stat().st_mode & 0o777 == 0o600


def test_damaged_files_are_refused(tmp_path):
    key = keys.generate()
    keystore.save_keystore(key, tmp_path / "k.json", "pw")
    good = json.loads((tmp_path / "k.json").read_text())
    bad_mac = json.loads(json.dumps(good))
    bad_mac["crypto"]["ciphertext"] = "00" * 32
    cases = {
        "[]": "invalid",
        "{}": "invalid",
        "not json": "unreadable",
        json.dumps({**good, "version": 4}): "invalid",
        json.dumps(bad_mac): "wrong passphrase",
    }
    for text, what in cases.items():
        (tmp_path / "bad.json").write_text(text)
        with pytest.raises(KeystoreError, match=what):
            keystore.load_keystore(tmp_path / "bad.json", "pw")
    with pytest.raises(KeystoreError, match="no key file"):
        keystore.load_keystore(tmp_path / "missing.json", "pw")
