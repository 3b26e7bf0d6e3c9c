"""Registration benchmark: latency node → DC → durable / → confirmed, and throughput with 1,000 nodes.

Real anvil (automine), one real DC process, aiohttp clients on loopback. Prints `metric: value`:
  register_durable_p50_ms / _p95_ms     POST /v1/register → acknowledged durable (LATENCY_SAMPLES)
  register_confirmed_p50_ms / _p95_ms   ... → confirmed on chain
  registrations_per_s                   THROUGHPUT_NODES registering, CONCURRENCY in flight
  registrations_confirmed_blocks_for_1000  blocks their records went into
`--quick`: 10 samples, 50 nodes (the names stay): the same code paths (make test).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ntm import keys  # noqa: E402
from ntm.record import Domain, NodeTransaction  # noqa: E402
from ntm.registration import RegistrationRequest  # noqa: E402
from scripts.anvil import Anvil  # noqa: E402
from labkit.dcnet import DcNet, raw_http  # noqa: E402

LATENCY_SAMPLES = 100
THROUGHPUT_NODES = 1000
CONCURRENCY = 200  # clients in flight at once, like many nodes arriving together


def pct(values: list[float], p: float) -> float:
    return statistics.quantiles(values, n=100)[p - 1] if len(values) > 1 else values[0]


async def main(samples: int = LATENCY_SAMPLES, nodes: int = THROUGHPUT_NODES) -> None:
    with tempfile.TemporaryDirectory() as tmp, Anvil() as chain:
        net = DcNet(Path(tmp), chain)
        await net.deploy(1)
        net.start_dc(0, extra=("--new-nodes-per-hour", "1e9"))  # throughput, not the gas budget, is measured
        url = net.urls[0]
        try:
            async with raw_http() as http:
                async with http.get(url + "/v1/info") as r:
                    info = await r.json()
                domain = Domain(info["chain_id"], keys.parse_node_id(info["registry"]))
                dc = keys.parse_node_id(info["dc"])

                def body(wait: bool) -> dict:
                    key = keys.generate()
                    rec = NodeTransaction(keys.node_id_of(key), dc, int(time.time() * 1000))
                    b = RegistrationRequest(rec, rec.sign(key, domain), keys.public_bytes(key), ()).to_json()
                    return {**b, "wait": "confirmed"} if wait else b

                async def post(b: dict) -> dict:
                    async with http.post(url + "/v1/register", json=b) as r:
                        assert r.status == 200, await r.text()
                        return await r.json()

                for _ in range(min(10, samples)):  # warm up connections and code paths
                    await post(body(True))
                durable, confirmed = [], []
                for _ in range(samples):
                    b = body(False)
                    t0 = time.perf_counter()
                    await post(b)
                    durable.append((time.perf_counter() - t0) * 1000)
                for _ in range(samples):
                    b = body(True)
                    t0 = time.perf_counter()
                    res = await post(b)
                    assert res["status"] == "confirmed", res
                    confirmed.append((time.perf_counter() - t0) * 1000)

                bodies = [body(True) for _ in range(nodes)]
                sem = asyncio.Semaphore(CONCURRENCY)

                async def limited(b):
                    async with sem:
                        return await post(b)

                t0 = time.perf_counter()
                results = await asyncio.gather(*(limited(b) for b in bodies))
                elapsed = time.perf_counter() - t0
                assert all(r["status"] == "confirmed" for r in results)
                blocks = len({r["block"] for r in results})
        finally:
            net.stop()
    print(f"register_durable_p50_ms: {pct(durable, 50):.2f}")
    print(f"register_durable_p95_ms: {pct(durable, 95):.2f}")
    print(f"register_confirmed_p50_ms: {pct(confirmed, 50):.2f}")
    print(f"register_confirmed_p95_ms: {pct(confirmed, 95):.2f}")
    print(f"registrations_per_s: {nodes / elapsed:.0f}")
    print(f"registrations_confirmed_blocks_for_1000: {blocks}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, same code paths (CI)")
    asyncio.run(main(10, 50) if ap.parse_args().quick else main())
