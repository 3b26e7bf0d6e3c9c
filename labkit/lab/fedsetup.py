"""Deploy the registry and admit the DCs, run inside the lab's server namespace (where anvil is).

    python -m labkit.lab.fedsetup --rpc URL --workdir DIR --dcs N --host IP --base-port P

Waits for anvil, deploys NodeRegistry, admits DC i (anvil dev key 1+i, keystore DIR/dc<i>.key.json)
with endpoint https://IP:(P+i) (http:// for a --plain-dc), writes DIR/deployment.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import urllib.request
from pathlib import Path

from daemon import keystore
from ntm import keys
from chain.registry import Registry
from scripts.anvil import DEV_KEYS


def wait_for_chain(rpc: str, timeout: float = 10.0) -> None:
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "eth_chainId", "params": []}).encode()
    end = time.monotonic() + timeout
    while True:
        try:
            req = urllib.request.Request(rpc, body, {"Content-Type": "application/json"})
            urllib.request.urlopen(req, timeout=1).read()
            return
        except OSError:
            if time.monotonic() > end:
                raise
            time.sleep(0.05)


async def deploy(a) -> None:
    reg = await Registry.deploy(a.rpc, DEV_KEYS[0])
    workdir = Path(a.workdir)
    for i in range(a.dcs):
        key = keys.private_key(DEV_KEYS[1 + i])
        keystore.save_keystore(key, workdir / f"dc{i + 1}.key.json")
        scheme = "http" if i in a.plain_dc else "https"  # TLS bound to the DC's key unless in development mode
        await reg.admit_dc(keys.node_id_of(key), f"dc{i + 1}", f"{scheme}://{a.host}:{a.base_port + i}")
    (workdir / "deployment.json").write_text(
        json.dumps({"chain_id": reg.chain_id, "registry": keys.checksum(reg.address), "block": 0})
    )
    await reg.close()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rpc", required=True)
    p.add_argument("--workdir", required=True)
    p.add_argument("--dcs", type=int, default=2)
    p.add_argument("--plain-dc", type=int, action="append", default=[], help="DC index served over plain HTTP")
    p.add_argument("--host", required=True)
    p.add_argument("--base-port", type=int, required=True)
    a = p.parse_args()
    wait_for_chain(a.rpc)
    asyncio.run(deploy(a))


if __name__ == "__main__":
    main()
