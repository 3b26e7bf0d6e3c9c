"""Generate a private Hyperledger Besu QBFT network for docker-compose.yml: one validator per DC.

    python -m scripts.besu_network                   # ./network with 4 validators and 4 DCs
    python -m scripts.besu_network --dcs 7 --out DIR

Every key is made here, on the operator's machine, from the OS's randomness: the validators' node
keys, the DCs' chain keys (keystores with a random passphrase beside them) and the registry
deployer's key. Nothing is a well-known dev key. The genesis funds the DCs and the deployer, and
names the validators in QBFT's extraData, RLP([32-byte vanity, [validators], no vote, round 0,
no seals]). Writes, with secrets mode 0600:

    genesis.json                 chain id, QBFT block period, validators, funded accounts
    network.json                 what the other parts read: validators (address, enode, IP) and DCs
    v<i>/key  v<i>/config.toml   validator i's node key and Besu configuration
    dc<i>/key.json  dc<i>/passphrase
    deployer/key.json  deployer/passphrase

QBFT tolerates f faulty validators out of 3f+1: 4 validators keep making blocks with one down.
Adding a DC and validator to a running network: docs in README ("Running on a real private
network"); `--add` makes the keys for one more without touching the genesis.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path

import rlp

from daemon import keystore
from ntm import keys

CHAIN_ID = 43301  # "4330" (NTM's port) + 1; any id no public chain uses
BLOCK_PERIOD_S = 2  # QBFT makes a block every 2 s: registrations confirm in ~2-4 s, finality at once
EPOCH_LENGTH = 30000  # blocks between QBFT vote resets (Besu's default)
REQUEST_TIMEOUT_S = 4  # a round's timeout: twice the block period
GAS_LIMIT = 30_000_000  # as mainnet: 1,000 records per block (~30k gas each)
FUND_WEI = 10**24  # a million ETH per DC: the chain's own money, gas for ~10^10 registrations at 1 gwei
SUBNET = "172.28.0."  # docker-compose.yml's network
VALIDATOR_IP_BASE = 11  # v1 = 172.28.0.11, v2 = .12, ...
P2P_PORT = 30303
RPC_PORT = 8545
DC_HTTP_PORT = 8330
QBFT_MIX_HASH = (
    "0x63746963616c2062797a616e74696e65206661756c7420746f6c6572616e6365"  # "ctical byzantine fault tolerance"
)
MIN_VALIDATORS = 4  # 3f+1 with f=1


@dataclass(frozen=True)
class Validator:
    name: str
    address: str
    enode: str
    ip: str


def _secret_file(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)


def extra_data(validators: list[str]) -> str:
    """QBFT genesis extraData for these validator addresses."""
    return "0x" + rlp.encode([b"\0" * 32, [keys.parse_node_id(v) for v in validators], [], b"", []]).hex()


def validators_of(extra: str) -> list[str]:
    """The validator addresses in a QBFT extraData (for checks)."""
    _, validators, _, _, _ = rlp.decode(bytes.fromhex(extra.removeprefix("0x")))
    return [keys.checksum(v) for v in validators]


def make_validator(out: Path, index: int) -> Validator:
    key = keys.generate()
    name, ip = f"v{index}", f"{SUBNET}{VALIDATOR_IP_BASE + index - 1}"
    _secret_file(out / name / "key", "0x" + key.secret.hex() + "\n")
    pub = keys.public_bytes(key)[1:].hex()
    return Validator(name, keys.checksum(keys.node_id_of(key)), f"enode://{pub}@{ip}:{P2P_PORT}", ip)


def make_account(out: Path, name: str) -> str:
    """A keystore and its random passphrase; returns the address."""
    key, passphrase = keys.generate(), secrets.token_urlsafe(24)
    _secret_file(out / name / "passphrase", passphrase + "\n")
    keystore.save_keystore(key, out / name / "key.json", passphrase)
    return keys.checksum(keys.node_id_of(key))


def besu_config(v: Validator, bootnodes: list[str]) -> str:
    """Validator v's Besu TOML: RPC without admin/personal APIs and no unlocked account."""
    return "\n".join(
        [
            f"# Besu validator {v.name} ({v.address}); written by scripts/besu_network.py",
            'data-path="/opt/besu/data"',
            'genesis-file="/network/genesis.json"',
            f'node-private-key-file="/network/{v.name}/key"',
            f'p2p-host="{v.ip}"',
            f"p2p-port={P2P_PORT}",
            "bootnodes=[" + ",".join(f'"{b}"' for b in bootnodes) + "]",
            "rpc-http-enabled=true",
            'rpc-http-host="0.0.0.0"',
            f"rpc-http-port={RPC_PORT}",
            'rpc-http-api=["ETH","NET","WEB3","QBFT"]',
            'host-allowlist=["*"]',
            'sync-mode="FULL"',
            "",
        ]
    )


def generate(out: Path, n_dcs: int, chain_id: int = CHAIN_ID, block_period: int = BLOCK_PERIOD_S) -> dict:
    if n_dcs < MIN_VALIDATORS:
        raise ValueError(f"at least {MIN_VALIDATORS} DCs (validators): QBFT needs 3f+1 to survive f failures")
    if (out / "genesis.json").exists():
        raise FileExistsError(
            f"{out}/genesis.json exists: a network is already generated there (use --add, or another --out)"
        )
    validators = [make_validator(out, i) for i in range(1, n_dcs + 1)]
    dcs = [
        {
            "name": f"dc{i}",
            "address": make_account(out, f"dc{i}"),
            "endpoint": f"https://dc{i}:{DC_HTTP_PORT}",
            "validator": f"v{i}",
        }
        for i in range(1, n_dcs + 1)
    ]
    deployer = make_account(out, "deployer")
    genesis = {
        "config": {
            "chainId": chain_id,
            "berlinBlock": 0,
            "londonBlock": 0,
            "qbft": {
                "blockperiodseconds": block_period,
                "epochlength": EPOCH_LENGTH,
                "requesttimeoutseconds": max(REQUEST_TIMEOUT_S, 2 * block_period),
            },
        },
        "nonce": "0x0",
        "timestamp": "0x0",
        "gasLimit": hex(GAS_LIMIT),
        "difficulty": "0x1",
        "mixHash": QBFT_MIX_HASH,
        "coinbase": "0x" + "00" * 20,
        "alloc": {
            a.removeprefix("0x").lower(): {"balance": hex(FUND_WEI)} for a in [d["address"] for d in dcs] + [deployer]
        },
        "extraData": extra_data([v.address for v in validators]),
    }
    (out / "genesis.json").write_text(json.dumps(genesis, indent=2) + "\n")
    bootnodes = [v.enode for v in validators]
    for v in validators:
        (out / v.name / "config.toml").write_text(besu_config(v, bootnodes))
    network = {
        "chain_id": chain_id,
        "block_period_s": block_period,
        "deployer": deployer,
        "validators": [v.__dict__ for v in validators],
        "dcs": dcs,
    }
    (out / "network.json").write_text(json.dumps(network, indent=2) + "\n")
    return network


def add(out: Path) -> dict:
    """Keys and config for one more DC + validator in an existing network (genesis unchanged)."""
    network = json.loads((out / "network.json").read_text())
    i = len(network["validators"]) + 1
    v = make_validator(out, i)
    (out / v.name / "config.toml").write_text(besu_config(v, [x["enode"] for x in network["validators"]] + [v.enode]))
    dc = {
        "name": f"dc{i}",
        "address": make_account(out, f"dc{i}"),
        "endpoint": f"https://dc{i}:{DC_HTTP_PORT}",
        "validator": v.name,
    }
    network["validators"].append(v.__dict__)
    network["dcs"].append(dc)
    (out / "network.json").write_text(json.dumps(network, indent=2) + "\n")
    return {"validator": v.__dict__, "dc": dc}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.besu_network", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("network"), help="directory to write (default ./network)")
    p.add_argument(
        "--dcs",
        type=int,
        default=MIN_VALIDATORS,
        help=f"DCs, one validator each (default and minimum {MIN_VALIDATORS})",
    )
    p.add_argument("--chain-id", type=int, default=CHAIN_ID, help=f"default {CHAIN_ID}")
    p.add_argument("--block-period", type=int, default=BLOCK_PERIOD_S, help=f"seconds (default {BLOCK_PERIOD_S})")
    p.add_argument("--add", action="store_true", help="add one DC + validator to the network in --out")
    args = p.parse_args(argv)
    try:
        if args.add:
            added = add(args.out)
            v, dc = added["validator"], added["dc"]
            print(f"added {v['name']} ({v['address']}) and {dc['name']} ({dc['address']}) in {args.out}/")
            print("now: a majority of the running validators vote it in, e.g. for each of v1..:")
            print(
                f"  curl -s -X POST -H 'Content-Type: application/json' --data "
                f'\'{{"jsonrpc":"2.0","id":1,"method":"qbft_proposeValidatorVote","params":["{v["address"]}",true]}}\' '
                f"http://127.0.0.1:8545"
            )
            print(
                f"then the registry owner admits the DC: ntm-deploy ... --dc {dc['address']},{dc['name']},{dc['endpoint']}"
            )
            return 0
        network = generate(args.out, args.dcs, args.chain_id, args.block_period)
    except (OSError, ValueError) as exc:
        print(f"besu_network: {exc}", file=sys.stderr)
        return 2
    print(
        f"wrote {args.out}/: chain {network['chain_id']}, {len(network['validators'])} validators, "
        f"{len(network['dcs'])} DCs, block every {network['block_period_s']} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
