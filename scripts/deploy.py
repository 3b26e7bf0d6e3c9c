"""Deploy the NodeRegistry (or reuse the one in --out) and admit DCs; write deployment JSON.

    python -m scripts.deploy --rpc http://127.0.0.1:8545 --key HEX \\
        --dc 0xDC1ADDR,dc1.example,https://dc1.example:8443 --dc ... --out deployment.json
    ntm-deploy ...   (same, as a console script)

Idempotent: if --out exists and its registry has code on that chain, it is reused; DCs already
admitted with the same hostname/endpoint are skipped, changed ones are updated. Any failure is one
readable line on stderr and exit code 2.
"""

from __future__ import annotations

import daemon.ctrl_c  # noqa: F401 (first: Ctrl-C during the imports below is one line, exit 130)
import argparse
import asyncio
import json
import signal
import sys
from pathlib import Path
from typing import Callable

from eth_account import Account

from daemon import atomic_file, keystore, startup
from ntm import keys
from ntm.errors import NtmError
from chain.registry import Registry, RegistryError, fee_fields, load_artifact

KEY_PASSPHRASE_ENV = "NTM_KEY_PASSPHRASE"  # the deployer keystore's, apart from a DC's: another key


class DeployError(NtmError):
    pass


def parse_dc(spec: str) -> tuple[bytes, str, str]:
    parts = spec.split(",", 2)
    if len(parts) != 3 or not parts[1] or not parts[2]:
        raise DeployError(f"bad --dc {spec!r}: expected ADDRESS,HOSTNAME,ENDPOINT")
    try:
        address = keys.parse_node_id(parts[0].strip())
    except ValueError as exc:
        raise DeployError(f"bad --dc {spec!r}: {exc}") from None
    try:
        startup.http_url(parts[2].strip())
    except argparse.ArgumentTypeError as exc:
        raise DeployError(f"bad --dc {spec!r}: the endpoint: {exc}") from None
    return address, parts[1].strip(), parts[2].strip()


def load_key(
    hex_key: str | None = None, key_file: str | Path | None = None, passphrase_file: Path | None = None
) -> bytes:
    """The deployer key from hex, or from a keystore (passphrase from the file, else $NTM_KEY_PASSPHRASE)."""
    if hex_key:
        raw = hex_key[2:] if hex_key[:2] in ("0x", "0X") else hex_key
        try:
            key = bytes.fromhex(raw)
        except ValueError:
            raise DeployError("--key is not hex") from None
        if len(key) != 32:
            raise DeployError(f"--key is {len(key)} bytes, expected 32")
        return key
    return keystore.load_keystore(Path(key_file), keystore.passphrase(KEY_PASSPHRASE_ENV, passphrase_file)).secret  # type: ignore[arg-type]


def dcs_from(network: Path) -> list[tuple[bytes, str, str]]:
    """The DCs of a network.json written by scripts/besu_network.py (address, hostname, endpoint)."""
    try:
        return [
            (keys.parse_node_id(d["address"]), d["name"], d["endpoint"])
            for d in json.loads(Path(network).read_text())["dcs"]
        ]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DeployError(f"cannot read DCs from {network}: {exc}") from None


async def wait_for_chain(rpc: str, seconds: float) -> None:
    """Until the chain answers and has made a block (a validator network takes a while to start)."""
    loop = asyncio.get_running_loop()
    deadline, why = loop.time() + seconds, "no block yet"
    while True:
        probe = Registry._w3(rpc)
        try:
            if await probe.eth.block_number >= 1:
                return
        except Exception as exc:  # noqa: BLE001 - any failure here means "not yet"
            why = str(exc)
        finally:
            await probe.provider.disconnect()
        if loop.time() >= deadline:
            raise DeployError(f"the chain at {rpc} is not ready after {seconds:.0f} s: {why}")
        await asyncio.sleep(1.0)


async def _existing(out: Path, rpc: str, key: bytes) -> tuple[Registry, int] | None:
    """The registry named in an existing --out file, if it is live on this chain."""
    if not out.exists():
        return None
    try:
        dep = json.loads(out.read_text())
        address, chain_id, block = dep["registry"], int(dep["chain_id"]), int(dep.get("block", 0))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DeployError(f"existing {out} is unreadable ({exc}); move it away to deploy afresh") from None
    try:
        reg = await Registry.connect(rpc, address, key)
    except RegistryError as exc:
        if "cannot reach" in str(exc):
            raise
        return None  # e.g. a fresh devnet: the old address has no code -> deploy again
    if reg.chain_id != chain_id:
        await reg.close()
        return None
    return reg, block


async def deploy(
    rpc: str, key: bytes, out: Path, dcs: list[tuple[bytes, str, str]], report: Callable[[str], None] = print
) -> dict:
    """Deploy the registry (or reuse the live one named in `out`), admit or update `dcs`
    (address, hostname, endpoint), write `out`. Returns the deployment, with "action" saying
    whether the registry was "deployed" or "reused". Progress lines go to `report`."""
    load_artifact()  # fail early and clearly if it is missing
    deployer = Account.from_key(key).address
    out = Path(out)
    found = await _existing(out, rpc, key)
    if found:
        reg, block = found
        action = "reused"
    else:
        probe = Registry._w3(rpc)
        try:
            chain_id = await Registry._chain_id(probe)
            balance = await probe.eth.get_balance(deployer)
        finally:
            await probe.provider.disconnect()
        if balance == 0:
            raise DeployError(f"account {deployer} has insufficient funds (balance 0) on chain {chain_id}")
        reg = await Registry.deploy(rpc, key)
        block, action = reg.deploy_block, "deployed"
    try:
        report(f"registry {keys.checksum(reg.address)} on chain {reg.chain_id}: {action}")
        for address, hostname, endpoint in dcs:
            info = await reg.dc(address)
            if info and (info.hostname, info.endpoint) == (hostname, endpoint):
                report(f"DC {keys.checksum(address)} already admitted")
            elif info:
                await reg.update_dc(hostname, endpoint, address=address)
                report(f"DC {keys.checksum(address)} updated: {hostname} {endpoint}")
            else:
                await reg.admit_dc(address, hostname, endpoint)
                report(f"DC {keys.checksum(address)} admitted: {hostname} {endpoint}")
        all_dcs = await reg.dcs()
        deployment = {
            "chain_id": reg.chain_id,
            "registry": keys.checksum(reg.address),
            "block": block,
            "deployer": deployer,
            "dcs": [
                {"address": keys.checksum(d.address), "hostname": d.hostname, "endpoint": d.endpoint} for d in all_dcs
            ],
        }
    finally:
        await reg.close()
    atomic_file.replace_file(out, (json.dumps(deployment, indent=2) + "\n").encode())
    report(f"wrote {out}")
    return {**deployment, "action": action}


async def fund(rpc: str, deployer_key: bytes, addresses: list[bytes], amount: int) -> list[str]:
    """Top up each address from the deployer to `amount` wei if it holds less than a tenth of it."""
    from web3 import AsyncHTTPProvider, AsyncWeb3

    w3 = AsyncWeb3(AsyncHTTPProvider(rpc, exception_retry_configuration=None), middleware=[])
    acct = Account.from_key(deployer_key)
    done = []
    try:
        chain_id = await w3.eth.chain_id
        for address in addresses:
            to = keys.checksum(address)
            balance = await w3.eth.get_balance(to)
            if balance >= amount // 10:
                continue
            price = await w3.eth.gas_price
            tx = {
                "from": acct.address,
                "to": to,
                "value": amount - balance,
                "gas": 21_000,
                "chainId": chain_id,
                **fee_fields(price),
                "nonce": await w3.eth.get_transaction_count(acct.address, "pending"),
            }
            tx_hash = await w3.eth.send_raw_transaction(acct.sign_transaction(tx).raw_transaction)
            receipt = await w3.eth.wait_for_transaction_receipt(tx_hash, timeout=120)
            if receipt["status"] != 1:
                raise DeployError(f"funding {to} from {acct.address} failed on chain")
            done.append(to)
    except NtmError:
        raise
    except Exception as exc:  # web3 raises many types; one readable line is what a user needs
        raise DeployError(f"funding the DCs from {acct.address} failed: {exc}") from None
    finally:
        await w3.provider.disconnect()
    return done


def parser() -> argparse.ArgumentParser:
    ap = startup.OneLineParser(prog="ntm-deploy", description=__doc__.splitlines()[0])
    ap.add_argument("--rpc", required=True, type=startup.ws_or_http_url, help="chain JSON-RPC URL")
    who = ap.add_mutually_exclusive_group(required=True)
    who.add_argument("--key", help="deployer private key (hex)")
    who.add_argument("--key-file", help=f"deployer keystore (passphrase from ${KEY_PASSPHRASE_ENV})")
    ap.add_argument(
        "--dc", action="append", default=[], metavar="ADDRESS,HOSTNAME,ENDPOINT", help="admit this DC (repeatable)"
    )
    keystore.passphrase_file_arg(ap, KEY_PASSPHRASE_ENV)
    ap.add_argument(
        "--dcs-from",
        type=startup.readable_file,
        metavar="NETWORK_JSON",
        help="admit every DC listed in this network.json (scripts/besu_network.py)",
    )
    ap.add_argument(
        "--wait",
        type=startup.not_negative,
        default=0,
        metavar="S",
        help="wait up to S seconds for the chain to answer and make its first block",
    )
    ap.add_argument("--out", default="deployment.json", help="deployment file (reused if live)")
    ap.add_argument(
        "--fund",
        type=startup.not_negative,
        default=0.0,
        metavar="ETH",
        help="top up every DC given to ETH from the deployer (when it holds less than a tenth): "
        "a DC pays gas for its nodes' records",
    )
    return ap


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    startup.check_paths(p, args)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # from here on, Ctrl-C unwinds (asyncio cancels)
    try:
        dcs = [parse_dc(d) for d in args.dc] + (dcs_from(args.dcs_from) if args.dcs_from else [])
        key = load_key(args.key, args.key_file, args.passphrase_file)

        async def run() -> None:
            if args.wait:
                await wait_for_chain(args.rpc, args.wait)
            await deploy(args.rpc, key, Path(args.out), dcs)
            if args.fund > 0:
                for address in await fund(args.rpc, key, [d[0] for d in dcs], int(args.fund * 10**18)):
                    print(f"funded {address} with {args.fund:g} ETH")

        asyncio.run(run())
    except NtmError as exc:  # RegistryError, DeployError, KeystoreError
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ntm-deploy: interrupted", file=sys.stderr)
        return startup.INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
