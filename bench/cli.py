"""The command line's start-up (~20 s).

Prints one `metric: value` line per figure, each the median of 5 runs, process start to exit:
  cli_help_s        `ntm --help`
  cli_id_s          `ntm id` (a node key exists; id.json answers without decrypting it)
  cli_status_s      `ntm status` of a node that is not registered (imports the commands, opens the key)
  ntm_status_s      `ntm status` of a registered node whose daemon (`ntm up --no-tun`) runs, with a real
                    DC on anvil: the daemon answers, the key stays closed (target <= 0.3 s)
`--quick`: one run each (make test).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts.anvil import Anvil  # noqa: E402
from labkit.dcnet import DcNet  # noqa: E402

ROUNDS = 5


def seconds(*args: str, home: Path, rounds: int) -> float:
    runs = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "node.cli", "--home", str(home), *args],
            check=True,
            stdout=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
        )
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs)


def ntm(home: Path, *args: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "node.cli", "--home", str(home), *args],
        check=True,
        stdout=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )


async def status_with_daemon(home: Path, rounds: int) -> float:
    """`ntm status` while `ntm up` runs: anvil, one DC, the node registered and its daemon up."""
    with Anvil() as chain:
        net = DcNet(home.parent, chain)
        await net.deploy(1)
        net.start_dc(0)
        daemon = None
        try:
            ntm(home, "register", *net.dc_args(0))
            daemon = subprocess.Popen(
                [sys.executable, "-m", "node.cli", "--home", str(home), "up", "--no-tun", "--port", "0"],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                stdin=subprocess.DEVNULL,
                text=True,
            )
            assert daemon.stdout is not None and daemon.stdout.readline().startswith("up as "), "ntm up failed"
            seconds("status", home=home, rounds=1)  # warm: the daemon's first whois opens its connection
            return seconds("status", home=home, rounds=rounds)
        finally:
            if daemon is not None:
                daemon.terminate()
                daemon.wait(30)
            net.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one run each, same code paths (CI)")
    rounds = 1 if ap.parse_args().quick else ROUNDS
    os.environ.setdefault("NTM_PASSPHRASE", "")
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "node"
        ntm(home, "keygen")
        print(f"cli_help_s: {seconds('--help', home=home, rounds=rounds):.3f}")
        print(f"cli_id_s: {seconds('id', home=home, rounds=rounds):.3f}")
        print(f"cli_status_s: {seconds('status', home=home, rounds=rounds):.3f}")
        print(f"ntm_status_s: {asyncio.run(status_with_daemon(home, rounds)):.3f}")


if __name__ == "__main__":
    main()
