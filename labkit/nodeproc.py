"""`ntm up --no-tun` as a child process on loopback: the daemon as a user runs it, for tests and benches."""

from __future__ import annotations

import json
import select
import subprocess
import sys
from pathlib import Path


def ntm(home: Path, *args: str, check: bool = True, timeout: float = 60.0):
    """`ntm --json ARGS` for the node in `home`: its parsed output; with check=False the
    CompletedProcess, whatever its exit code."""
    proc = subprocess.run(
        [sys.executable, "-m", "node.cli", "--home", str(home), "--json", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    if not check:
        return proc
    if proc.returncode:
        raise RuntimeError(f"ntm {' '.join(args)}: exit {proc.returncode}: {proc.stderr}")
    return json.loads(proc.stdout)


def start_up(home: Path, *extra: str, stderr: int = subprocess.PIPE) -> subprocess.Popen:
    """The daemon of the node in `home`, datagram mode (no TUN, no root) on an ephemeral loopback port;
    its stdout carries one JSON line per event (read the first with `read_json_line`)."""
    return subprocess.Popen(
        [sys.executable, "-m", "node.cli", "--home", str(home), "--json", "up", "--no-tun"]
        + ["--host", "127.0.0.1", "--port", "0", *extra],
        stdout=subprocess.PIPE,
        stderr=stderr,
        stdin=subprocess.DEVNULL,
        text=True,
    )


def read_json_line(proc: subprocess.Popen, timeout: float = 20.0) -> dict:
    """First line only: later lines may sit in the text wrapper's buffer where select cannot see them."""
    if not select.select([proc.stdout], [], [], timeout)[0]:
        err = proc.stderr.read() if proc.stderr is not None and proc.poll() is not None else ""
        raise AssertionError(f"no output from ntm up: {err}")
    return json.loads(proc.stdout.readline())
