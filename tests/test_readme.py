"""The README's by-hand walk-through, run verbatim with bash (in a scratch directory that has the
clone's .venv): chain, deployment with a funded DC key, relay, DC, a node registered and confirmed.
The README's claims about what it prints are asserted here too."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PORTS = (8545, 8330, 8340)  # the walk-through uses the defaults


def walk_through() -> str:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- by-hand: begin -->\n```bash\n(.*?)```\n<!-- by-hand: end -->", text, re.S)
    assert block, "README.md lost its by-hand block"
    return block.group(1)


def port_busy(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.skipif(any(port_busy(p) for p in PORTS), reason=f"a default port ({PORTS}) is in use here")
def test_the_by_hand_walk_through_runs_verbatim(tmp_path):
    (tmp_path / ".venv").symlink_to(ROOT / ".venv")
    script = tmp_path / "by-hand.sh"
    script.write_text("set -e\n" + walk_through())
    env = {k: v for k, v in os.environ.items() if not k.startswith("NTM_")}
    env["PYTHONPATH"] = str(ROOT)  # this checkout's code, whichever one the shared venv was installed from
    proc = subprocess.Popen(
        ["bash", str(script)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    left: list[str] = []
    try:
        out, err = proc.communicate(timeout=180)
        left = leftovers(proc.pid)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever the script left behind
        except ProcessLookupError:
            pass
    logs = {p.name: p.read_text()[-1500:] for p in (tmp_path / "by-hand").glob("*.log")}
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out}\n{err}\n{logs}"
    assert "Traceback" not in out + err
    assert re.search(r"funded 0x[0-9a-fA-F]{40} with 1 ETH", out), out
    assert "status: confirmed (block" in out, out
    assert "record    confirmed on chain, home DC" in out, out
    assert (tmp_path / "by-hand" / "chain.json").exists()
    assert not left, f"the block's own stop step left these running: {left}"  # e.g. anvil, adopted by PID 1


def leftovers(group: int) -> list[str]:
    """Command lines of processes still in process group `group` (the script's session)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == group:  # after the state and the parent PID: the process group
                found.append((stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip())
        except (OSError, IndexError, ValueError):
            continue
    return found
