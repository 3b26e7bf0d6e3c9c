"""scripts/deploy.py end to end, as a subprocess against a real anvil."""

import json
import os
import subprocess
import sys
from pathlib import Path

from eth_account import Account

ROOT = Path(__file__).resolve().parent.parent
DC1 = Account.from_key(bytes.fromhex("59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d")).address
DC2 = Account.from_key(bytes.fromhex("5de4111afa1a4b94908f83103eb1f1706367c2e68ca870fc3fb9a804cdab365a")).address


def deploy(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "scripts.deploy", *args], cwd=ROOT, capture_output=True, text=True, timeout=60
    )


def test_deploy_admit_and_rerun(anvil, tmp_path):
    out = tmp_path / "deployment.json"
    key = anvil.keys[0].hex()
    args = [
        "--rpc",
        anvil.url,
        "--key",
        key,
        "--out",
        str(out),
        "--dc",
        f"{DC1},dc1.test,http://127.0.0.1:9001",
        "--dc",
        f"{DC2},dc2.test,http://127.0.0.1:9002",
    ]
    first = deploy(*args)
    assert first.returncode == 0, first.stderr
    dep = json.loads(out.read_text())
    assert dep["chain_id"] == 31337 and dep["deployer"] == Account.from_key(anvil.keys[0]).address
    assert dep["registry"].startswith("0x") and dep["registry"] != dep["registry"].lower()  # checksummed
    assert [d["address"] for d in dep["dcs"]] == [DC1, DC2] and dep["block"] >= 1
    second = deploy(*args)
    assert second.returncode == 0, second.stderr
    assert json.loads(out.read_text())["registry"] == dep["registry"]
    assert "reused" in second.stdout and second.stdout.count("already admitted") == 2
    # a changed endpoint is updated in place
    third = deploy(*args[:-1], f"{DC2},dc2.test,http://127.0.0.1:9999")
    assert third.returncode == 0, third.stderr
    assert json.loads(out.read_text())["dcs"][1]["endpoint"] == "http://127.0.0.1:9999"


def test_deploy_errors(anvil, tmp_path):
    out = tmp_path / "d.json"
    bad_url = deploy("--rpc", "http://127.0.0.1:1", "--key", anvil.keys[0].hex(), "--out", str(out))
    assert bad_url.returncode == 2 and "cannot reach the chain RPC" in bad_url.stderr
    assert len(bad_url.stderr.strip().splitlines()) == 1 and not out.exists()
    poor = deploy("--rpc", anvil.url, "--key", os.urandom(32).hex(), "--out", str(out))
    assert poor.returncode == 2 and "insufficient funds" in poor.stderr and not out.exists()
    bad_dc = deploy("--rpc", anvil.url, "--key", anvil.keys[0].hex(), "--out", str(out), "--dc", "0x1234,host")
    assert bad_dc.returncode == 2 and "bad --dc" in bad_dc.stderr and "Traceback" not in bad_dc.stderr


def test_deploy_a_generated_besu_network_with_its_own_keys(anvil, tmp_path):
    """What the compose deploy job runs, against anvil standing in for the validators: the deployer
    keystore and passphrase file, and the DCs of network.json (scripts/besu_network.py)."""
    from scripts import besu_network

    net = besu_network.generate(tmp_path / "network", 4)
    anvil.rpc("anvil_setBalance", [net["deployer"], hex(10**20)])  # the genesis alloc does this on Besu
    out = tmp_path / "deployment.json"
    args = [
        "--rpc",
        anvil.url,
        "--key-file",
        str(tmp_path / "network/deployer/key.json"),
        "--out",
        str(out),
        "--passphrase-file",
        str(tmp_path / "network/deployer/passphrase"),
        "--dcs-from",
        str(tmp_path / "network/network.json"),
        "--wait",
        "10",
    ]
    anvil.rpc("evm_mine")  # --wait waits for a first block
    run = deploy(*args)
    assert run.returncode == 0, run.stderr
    dep = json.loads(out.read_text())
    assert dep["deployer"] == net["deployer"]
    assert [(d["address"], d["hostname"], d["endpoint"]) for d in dep["dcs"]] == [
        (d["address"], d["name"], d["endpoint"]) for d in net["dcs"]
    ]
    wrong = tmp_path / "wrong"
    wrong.write_text("not the passphrase\n")
    refused = deploy(*args[:-6], "--passphrase-file", str(wrong), "--dcs-from", str(tmp_path / "network/network.json"))
    assert refused.returncode == 2 and "wrong passphrase" in refused.stderr and "Traceback" not in refused.stderr
