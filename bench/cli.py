"""The command line's start-up (~10 s).

Prints one `metric: value` line per figure, each the median of 5 runs, process start to exit:
  cli_help_s        `ntm --help`
  cli_id_s          `ntm id` (a node key exists; id.json answers without decrypting it)
  cli_status_s      `ntm status` of a node that is not registered (imports the commands, opens the key)
`--quick`: one run each (make test).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROUNDS = 5


def seconds(*args: str, home: Path, rounds: int) -> float:
    runs = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "node.cli", "--home", str(home), *args], check=True,
                       stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one run each, same code paths (CI)")
    rounds = 1 if ap.parse_args().quick else ROUNDS
    os.environ.setdefault("NTM_PASSPHRASE", "")
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        subprocess.run([sys.executable, "-m", "node.cli", "--home", str(home), "keygen"], check=True,
                       stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        print(f"cli_help_s: {seconds('--help', home=home, rounds=rounds):.3f}")
        print(f"cli_id_s: {seconds('id', home=home, rounds=rounds):.3f}")
        print(f"cli_status_s: {seconds('status', home=home, rounds=rounds):.3f}")


if __name__ == "__main__":
    main()
