"""Gas cost of NodeRegistry registration paths, measured on a real anvil (total tx gas).

Prints one `metric: value` line per figure:
  gas_first_registration   register(): a node's first record (new storage slot)
  gas_update               register(): a newer record for an existing node
  gas_revoke               register(): a revoking record
  gas_batchN_per_record    registerBatch() of N new nodes: tx gas / N

All with the committed artifact (EVM target london, scripts/compile.py), then the same contract
compiled for cancun (PUSH0 and friends) for comparison:
  gas_first_registration_cancun, gas_batch50_per_record_cancun
  gas_london_extra_per_record     london minus cancun, per record of a 50-record batch
Gas does not depend on the machine: `--quick` (make test) runs the same few seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ntm import keys, record  # noqa: E402
from chain.registry import Registry  # noqa: E402
from scripts.anvil import Anvil  # noqa: E402
from scripts.compile import compile_artifact  # noqa: E402


def _signed(reg: Registry, dc: bytes, key, ts: int, revoked: bool = False):
    rec = record.NodeTransaction(keys.node_id_of(key), dc, ts, revoked)
    return rec, rec.sign(key, reg.domain)


async def measure(url: str, owner_key: bytes, dc_key: bytes, artifact: dict | None = None) -> dict[str, int]:
    owner = await Registry.deploy(url, owner_key, artifact)
    dc = await Registry.connect(url, owner.address, dc_key)
    try:
        await owner.admit_dc(dc.sender, "dc1.example", "https://dc1.example:8443")
        now = int(time.time() * 1000)
        out: dict[str, int] = {}
        key = keys.generate()
        out["gas_first_registration"] = (await dc.register([_signed(dc, dc.sender, key, now)])).gas_used
        out["gas_update"] = (await dc.register([_signed(dc, dc.sender, key, now + 1)])).gas_used
        out["gas_revoke"] = (await dc.register([_signed(dc, dc.sender, key, now + 2, True)])).gas_used
        for n in (1, 10, 50):
            items = [_signed(dc, dc.sender, keys.generate(), now) for _ in range(n)]
            res = await dc.submit(items)  # registerBatch, as the DC sends it
            assert res.accepted == n, res
            out[f"gas_batch{n}_per_record"] = res.gas_used // n
        return out
    finally:
        await dc.close()
        await owner.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="accepted for make test; the bench is quick already")
    ap.parse_args()
    cancun = compile_artifact(evm_version="cancun")
    with Anvil() as chain:
        results = asyncio.run(measure(chain.url, chain.keys[0], chain.keys[1]))
        other = asyncio.run(measure(chain.url, chain.keys[0], chain.keys[2], cancun))
    results["gas_first_registration_cancun"] = other["gas_first_registration"]
    results["gas_batch50_per_record_cancun"] = other["gas_batch50_per_record"]
    results["gas_london_extra_per_record"] = results["gas_batch50_per_record"] - other["gas_batch50_per_record"]
    for name, value in results.items():
        print(f"{name}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
