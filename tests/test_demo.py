"""`make demo` end to end (scripts/demo.py as a subprocess): every step must have happened."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_demo_runs_end_to_end():
    proc = subprocess.run(
        [sys.executable, "-m", "scripts.demo"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=90,
        stdin=subprocess.DEVNULL,
    )
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    assert out.count("status: confirmed") == 2  # alice at dc1, bob at dc2
    assert "at DC dc1" in out and "at DC dc2" in out
    assert "reply: hello from B" in out and "reply: hello via the relay" in out
    assert out.count("3/3 replies") == 2
    assert "route direct" in out and "route relay" in out
    assert "confirmed on chain" in out and "PEER" in out  # alice's daemon's peers table
    assert out.count(") stopping") == 2 and "hello via the relay" in out.split("ntm recv")[1]  # both daemons down
    assert "Demo OK" in out and "Traceback" not in out + proc.stderr
