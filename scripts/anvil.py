"""A local anvil devnode (from node_modules) for tests, benches and the demo.

    with Anvil() as chain:               # automine, chain id 31337, free port on 127.0.0.1
        chain.url, chain.ws_url, chain.keys[0]

    chain = Anvil(state_path="chain.json", block_time=1, chain_id=4330).start()
    ...
    chain.stop()

`python -m scripts.anvil [--state PATH] [--block-time S] [--chain-id N]` runs one in the
foreground and prints its URL.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

from scripts.procs import dying_with_parent

ROOT = Path(__file__).resolve().parent.parent
ANVIL_BIN = ROOT / "node_modules" / "@foundry-rs" / "anvil-linux-amd64" / "bin" / "anvil"

# anvil's default mnemonic "test test test test test test test test test test test junk",
# accounts m/44'/60'/0'/0/0..9, each funded with 10000 ETH on a fresh chain (well known, public:
# use them for local devnets only).
DEV_KEYS: tuple[bytes, ...] = tuple(
    bytes.fromhex(h)
    for h in (
        "ac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80",
        "59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d",
        "5de4111afa1a4b94908f83103eb1f1706367c2e68ca870fc3fb9a804cdab365a",
        "7c852118294e51e653712a81e05800f419141751be58f605c371e15141b007a6",
        "47e179ec197488593b187f80a00eb0da91f1b9d0b13f8733639f19c30a34926a",
        "8b3a350cf5c34c9194ca85829a2df0ec3153be0318b5e2d3348e872092edffba",
        "92db14e403b83dfe3df233f83dfa3a0d7096f21ca9b0d6d6b8d88b2b4ec1564e",
        "4bbbf85ce3377467afe5d46f804f221813b2bb87f24d81f60f1fcdbf7cbf4356",
        "dbda1821b80551c9d65939329250298aa3472ba22feea921c0cf5d620ea67b97",
        "2a871d0798f97d79848a013d4936a73bf4cc922c825d33c1cf7073dff6d409c6",
    )
)

_LISTENING = re.compile(rb"Listening on ([0-9.]+):(\d+)")


class AnvilError(RuntimeError):
    pass


def anvil_binary() -> Path:
    """Path of the anvil executable; AnvilError with a hint if node_modules is missing."""
    if ANVIL_BIN.exists():
        return ANVIL_BIN
    found = shutil.which("anvil")
    if found:
        return Path(found)
    raise AnvilError(f"anvil not found at {ANVIL_BIN}: run `make setup` (npm ci) first")


class Anvil:
    """One anvil process on 127.0.0.1 and a free port, stopped by its own PID."""

    def __init__(
        self,
        *,
        state_path: str | os.PathLike | None = None,
        block_time: float | None = None,
        chain_id: int | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        start_timeout: float = 10.0,
        extra_args: list[str] | None = None,
    ) -> None:
        self.state_path = Path(state_path) if state_path is not None else None
        self.block_time = block_time
        self.chain_id = chain_id
        self.host = host
        self.port = port
        self.start_timeout = start_timeout
        self.extra_args = list(extra_args or [])
        self.keys: tuple[bytes, ...] = DEV_KEYS
        self.proc: subprocess.Popen | None = None
        self.preexec: Callable[[], None] | None = None  # e.g. scripts/procs.py dying_with_parent()
        self._logdir: tempfile.TemporaryDirectory | None = None
        self.log_path: Path | None = None

    # -- lifecycle --------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}:{self.port}"

    def command(self) -> list[str]:
        cmd = [str(anvil_binary()), "--host", self.host, "--port", str(self.port)]
        if self.state_path is not None:
            # --state = load at start + dump on exit; --state-interval 1 also dumps every second,
            # so a SIGKILLed anvil loses at most ~1 s of chain.
            cmd += ["--state", str(self.state_path), "--state-interval", "1"]
        if self.block_time is not None:
            cmd += ["--block-time", str(self.block_time)]
        if self.chain_id is not None:
            cmd += ["--chain-id", str(self.chain_id)]
        return cmd + self.extra_args

    def start(self) -> "Anvil":
        if self.proc is not None:
            raise AnvilError("anvil already started")
        cmd = self.command()
        self._logdir = tempfile.TemporaryDirectory(prefix="ntm-anvil-")
        self.log_path = Path(self._logdir.name) / "anvil.log"
        # stdout/stderr go to a file, not a pipe: anvil logs every tx and would block on a full pipe.
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=self.preexec
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _log_text(self, limit: int = 4000) -> str:
        try:
            return self.log_path.read_bytes()[-limit:].decode(errors="replace").strip() if self.log_path else ""
        except OSError:
            return ""

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AnvilError(f"anvil exited with code {self.proc.returncode}:\n{self._log_text()}")
            if self.port == 0:
                m = _LISTENING.search(self.log_path.read_bytes())
                if m:
                    self.port = int(m.group(2))
            if self.port and self._answers():
                return
            time.sleep(0.02)
        raise AnvilError(f"anvil did not answer eth_chainId within {self.start_timeout} s:\n{self._log_text()}")

    def _answers(self) -> bool:
        try:
            self.rpc("eth_chainId", timeout=1.0)
            return True
        except (OSError, urllib.error.URLError, ValueError):
            return False

    def rpc(self, method: str, params: list | None = None, timeout: float = 5.0):
        """One blocking JSON-RPC call (handy for evm_mine, anvil_setBalance, ...)."""
        body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params or []}).encode()
        req = urllib.request.Request(self.url, body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            reply = json.loads(resp.read())
        if "error" in reply:
            raise AnvilError(f"{method}: {reply['error']}")
        return reply["result"]

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM (anvil dumps --state on exit), then SIGKILL if it lingers."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._logdir is not None:
            self._logdir.cleanup()
            self._logdir = None
            self.log_path = None

    def kill(self) -> None:
        """SIGKILL without a chance to dump state (crash simulation)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.stop()

    def __enter__(self) -> "Anvil":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __del__(self) -> None:  # last resort; never leave an orphan chain behind
        try:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.kill()
        except Exception:
            pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m scripts.anvil", description="run a local anvil devnode")
    ap.add_argument("--state", help="state file (loaded at start, dumped every second and on exit)")
    ap.add_argument("--block-time", type=float, help="seconds per block (default: automine)")
    ap.add_argument("--chain-id", type=int)
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args(argv)
    # `kill PID` (the README's by-hand block: `kill $(jobs -p)`) stops anvil too, saving its state,
    # and anvil follows this process if it dies without a word (SIGKILL): never an orphan chain.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    try:
        chain = Anvil(state_path=args.state, block_time=args.block_time, chain_id=args.chain_id, port=args.port)
        chain.preexec = dying_with_parent()
        chain.start()
    except AnvilError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"anvil pid {chain.pid} at {chain.url} (ws {chain.ws_url}); Ctrl-C stops it", flush=True)
    try:
        chain.proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        chain.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
