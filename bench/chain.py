"""The DC on a chain that misbehaves: real anvil, real DC processes (~15 s).

Prints one `metric: value` line per figure:
  confirmed_p50_ms                  registration → confirmed on a busy (not idle) anvil, p50 of 10
  idle_chain_confirmed_ms           the same for a lone record when the latest block is 20 min old
  dead_first_rpc_confirmed_p50_ms   p50 of 10 when the DC's first JSON-RPC URL refuses connections
  rollback_recovery_s               anvil restarted from an older state that lacks 20 confirmed
                                    records → all 20 back on chain (the DC re-sends them)
  chain_return_confirm_s            chain down, 20 registrations acknowledged "durable", chain back
                                    → all 20 confirmed
`--quick`: 2 rounds and 3 records instead of 10 and 20, the same code paths (make test).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ntm import keys  # noqa: E402
from scripts.anvil import Anvil  # noqa: E402
from scripts.procs import dc_child, free_port  # noqa: E402
from labkit.dcnet import DcNet, stateful_net  # noqa: E402
from labkit.load import all_on_chain, register_at, register_many  # noqa: E402

IDLE_S = 1200
ROUNDS = 10
RECORDS = 20


async def confirm_ms(url: str) -> float:
    start = time.perf_counter()
    _, status = await register_at(url, int(time.time() * 1000))
    assert status == "confirmed", status
    return (time.perf_counter() - start) * 1000


async def idle_and_dead_url(tmp: Path, rounds: int = ROUNDS) -> dict[str, float]:
    out: dict[str, float] = {}
    with Anvil(extra_args=["--timestamp", str(int(time.time()) - IDLE_S)]) as chain:
        net = DcNet(tmp, chain)
        await net.deploy(2)
        chain.rpc("evm_increaseTime", [IDLE_S])
        net.start_dc(0)
        net.dcs[1] = dc_child(
            tmp,
            "dc2",
            tmp / "dc2.key.json",
            f"http://127.0.0.1:{free_port()}",
            net.deployment,
            net.ports[1],
            extra=["--rpc-url", chain.url],
        ).start()
        try:
            out["idle_chain_confirmed_ms"] = await confirm_ms(net.urls[0])
            out["confirmed_p50_ms"] = statistics.median([await confirm_ms(net.urls[0]) for _ in range(rounds)])
            out["dead_first_rpc_confirmed_p50_ms"] = statistics.median(
                [await confirm_ms(net.urls[1]) for _ in range(rounds)]
            )
        finally:
            net.stop()
    return out


async def rollback_and_outage(tmp: Path, records: int = RECORDS) -> dict[str, float]:
    out: dict[str, float] = {}
    async with stateful_net(tmp) as net:
        net.chain.stop()
        shutil.copy(net.chain.state_path, tmp / "chain-old.json")
        net.restart_chain()
        net.start_dc(0)
        dc_addr = keys.node_id_of(net.dc_keys[0])
        nodes = await register_many(net.urls[0], records)
        await all_on_chain(net, nodes, dc_addr)
        net.restart_chain(tmp / "chain-old.json")
        start = time.perf_counter()
        await all_on_chain(net, nodes, dc_addr, timeout=60)
        out["rollback_recovery_s"] = time.perf_counter() - start
        net.chain.stop()
        during = await register_many(net.urls[0], records)
        await asyncio.sleep(1.0)
        net.restart_chain()
        start = time.perf_counter()
        await all_on_chain(net, during, dc_addr, timeout=60)
        out["chain_return_confirm_s"] = time.perf_counter() - start
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, same code paths (CI)")
    quick = ap.parse_args().quick
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="ntm-bench-chain-") as tmp:
        results |= asyncio.run(idle_and_dead_url(Path(tmp) / "a", 2 if quick else ROUNDS))
        results |= asyncio.run(rollback_and_outage(Path(tmp) / "b", 3 if quick else RECORDS))
    for name, value in results.items():
        print(f"{name}: {round(value, 2)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
