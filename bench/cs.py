"""Cache Server: real anvil, two DCs, two Cache Servers, nodes in-process (~40 s).

Prints one `metric: value` line per figure:
  cs_upload_mbps_1mb / cs_download_mbps_1mb      content Mbit/s, seal+upload / download+open+confirm,
                                                 median of 5 (the client does the crypto)
  cs_upload_mbps_100mb / cs_download_mbps_100mb  the same for one 100 MB item (a file on disk)
  cs_notify_ms_p50                               upload acknowledged by cs1 → the recipient's node,
                                                 online at dc2, has the notice (cross-DC), p50 of 10
  cs_rss_mb_100mb_item                           the CS process's peak RSS growth (VmRSS sampled every
                                                 5 ms) while a 100 MB item streams in and out
`--quick`: one round, 2 notices, a 4 MB "big" item (the names stay): the same code paths (make test).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from node.agent import Node  # noqa: E402
from node.cs_client import CsClient, bytes_chunks, file_chunks  # noqa: E402
from ntm import keys, seal  # noqa: E402
from labkit.dcnet import cs_federation, register  # noqa: E402

ROUNDS = 5
NOTIFY_ROUNDS = 10
BIG = 100 * 1000 * 1000


def sealer(sender, recipient) -> seal.Sealer:
    return seal.Sealer(
        sender, {keys.node_id_of(recipient): keys.public_bytes(recipient)}, seal.Meta("bench"), int(time.time() * 1000)
    )


def mbps(size: int, seconds: float) -> float:
    return size * 8 / seconds / 1e6


def rss_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


async def transfer(cs_url: str, sender, recipient, source, size: int, out: Path) -> tuple[float, float]:
    """(upload s, download s) of one item."""
    async with CsClient(sender, cs_url) as up, CsClient(recipient, cs_url) as down:
        t0 = time.perf_counter()
        item = (await up.put(sealer(sender, recipient), source, size))["item"]
        t1 = time.perf_counter()
        got = await down.fetch(item, out)
        t2 = time.perf_counter()
    assert got.size == size
    got.path.unlink()
    return t1 - t0, t2 - t1


async def run(
    tmp: Path, rounds: int = ROUNDS, big_size: int = BIG, notify_rounds: int = NOTIFY_ROUNDS
) -> dict[str, float]:
    out: dict[str, float] = {}
    async with cs_federation(
        tmp, ("--max-item-mb", "200", "--sender-quota-mb", "1000", "--recipient-quota-mb", "1000")
    ) as net:
        alice, bob = keys.generate(), keys.generate()
        await register(net.urls[0], alice)
        await register(net.urls[1], bob)
        small = os.urandom(1_000_000)
        times = [
            await transfer(net.cs_url(0), alice, bob, bytes_chunks(small), len(small), tmp / "in")
            for _ in range(rounds)
        ]
        out["cs_upload_mbps_1mb"] = mbps(len(small), statistics.median(t[0] for t in times))
        out["cs_download_mbps_1mb"] = mbps(len(small), statistics.median(t[1] for t in times))
        big = tmp / "big.bin"
        with open(big, "wb") as fh:
            for _ in range(big_size // 1_000_000):
                fh.write(os.urandom(1_000_000))
        pid = net.css[0].pid
        before = rss_kb(pid, "VmRSS")
        peak = [before]

        async def sample() -> None:  # VmHWM would count the keystore's scrypt at start-up (256 MB)
            while True:
                peak[0] = max(peak[0], rss_kb(pid, "VmRSS"))
                await asyncio.sleep(0.005)

        sampler = asyncio.create_task(sample())
        up_s, down_s = await transfer(net.cs_url(0), alice, bob, file_chunks(big), big_size, tmp / "in")
        sampler.cancel()
        out["cs_upload_mbps_100mb"] = mbps(big_size, up_s)
        out["cs_download_mbps_100mb"] = mbps(big_size, down_s)
        out["cs_rss_mb_100mb_item"] = (peak[0] - before) / 1024
        node = await Node.start(bob, net.urls[1], host="127.0.0.1", port=0, inbox=tmp / "bob")
        try:
            await asyncio.sleep(1.0)  # its start-up sweep is done
            lags = []
            for _ in range(notify_rounds):
                async with CsClient(alice, net.cs_url(0)) as c:
                    item = (await c.put(sealer(alice, bob), bytes_chunks(b"ping"), 4))["item"]
                acked = time.perf_counter()
                while not any(n.item == item for n in node.mailbox.notices):
                    await asyncio.sleep(0.001)
                lags.append((time.perf_counter() - acked) * 1000)
                await asyncio.wait_for(node.next_item(), 10)
            out["cs_notify_ms_p50"] = statistics.median(lags)
        finally:
            await node.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, same code paths (CI)")
    sizes = (1, 4_000_000, 2) if ap.parse_args().quick else (ROUNDS, BIG, NOTIFY_ROUNDS)
    with tempfile.TemporaryDirectory(prefix="ntm-bench-cs-") as tmp:
        results = asyncio.run(run(Path(tmp), *sizes))
    for name, value in results.items():
        print(f"{name}: {round(value, 2)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
