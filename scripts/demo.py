"""`make demo`: NTMobile end to end in under a minute, with the commands a user would type.

In a temporary directory: `ntm devnet` (anvil chain + registry + two DCs + one relay, on free
ports so a running devnet is not disturbed), two nodes with their own homes (alice, bob), alice
registered at dc1 and bob at dc2, both running `ntm up` (alice with --echo), bob looking her up through his own
DC, sending a message and pinging over a direct tunnel, then over the relay, alice's status with
both tunnels and the messages that reached her, and a clean stop (`ntm down`). Every command is the real `ntm` CLI run as a subprocess; each is
printed as `alice$ ntm ...` or `bob$ ntm ...` (two shells with their own NTM_HOME) before its output.

Exit code 0 when every step did what it should, 1 otherwise (the temp directory is then kept for
its logs).
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NTM = [sys.executable, "-m", "node.cli"]
STEP_TIMEOUT_S = 60.0

BOLD = "\033[1m" if sys.stdout.isatty() else ""
DIM = "\033[2m" if sys.stdout.isatty() else ""
RESET = "\033[0m" if sys.stdout.isatty() else ""


class DemoFailed(Exception):
    pass


def heading(n: int, text: str) -> None:
    print(f"\n{BOLD}{n}. {text}{RESET}", flush=True)


def show_cmd(who: str, args: list[str], suffix: str = "") -> None:
    shown = " ".join(f'"{a}"' if " " in a else a for a in args)
    print(f"{DIM}{who}${RESET} ntm {shown}{suffix}", flush=True)


def indent(text: str) -> str:
    return "\n".join("  " + line if line else "" for line in text.rstrip("\n").splitlines())


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_until(proc: subprocess.Popen, marker: bytes, timeout: float) -> str:
    """Raw reads from the child's stdout until `marker` appears (no text-wrapper buffering)."""
    buf = b""
    deadline = time.monotonic() + timeout
    while marker not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            raise DemoFailed(f"timed out waiting for {marker.decode()!r}; got:\n{buf.decode(errors='replace')}")
        if select.select([proc.stdout], [], [], min(left, 0.2))[0]:
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                raise DemoFailed(f"process exited ({proc.wait()}):\n{buf.decode(errors='replace')}{err}")
            buf += chunk
    return buf.decode(errors="replace")


class Demo:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.homes = {"alice": workdir / "alice", "bob": workdir / "bob"}
        self.devnet: subprocess.Popen | None = None
        self.daemons: dict[str, subprocess.Popen] = {}

    def ntm(self, who: str, *args: str, expect: tuple[str, ...] = ()) -> str:
        show_cmd(who, list(args))
        proc = self._run(who, *args)
        output = proc.stdout + proc.stderr
        print(indent(output), flush=True)
        if proc.returncode != 0:
            raise DemoFailed(f"`ntm {' '.join(args)}` exited with code {proc.returncode}")
        for text in expect:
            if text not in output:
                raise DemoFailed(f"`ntm {' '.join(args)}` did not print {text!r}")
        return proc.stdout

    def run(self) -> None:
        t0 = time.monotonic()
        data = self.workdir / "devnet"
        heading(1, "A local federation: anvil chain, NodeRegistry, two DCs, one relay server")
        args = ["devnet", "--data-dir", str(data), "--free-ports"]
        show_cmd("", args, "   # free ports, so a devnet you already run is left alone")
        self.devnet = subprocess.Popen(
            [*NTM, "--home", str(self.homes["alice"]), *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        table = read_until(self.devnet, b"Ctrl-C stops everything", 45.0)
        print(indent(table), flush=True)
        net = json.loads((self.homes["alice"] / "network.json").read_text())
        dc1, dc2 = (u.removeprefix("https://") for u in net["dcs"])
        dc2_address = net["dc_addresses"][net["dcs"][1]]  # bob's home has no network.json: he is told

        heading(2, "Two nodes, each with its own key (NTM_HOME=alice/ and bob/): node ID = keccak(pubkey)[12:]")
        alice = json.loads(self._quiet("alice", "--json", "keygen"))["node"]
        show_cmd("alice", ["keygen"])
        print(indent(f"new node key in {self.homes['alice'] / 'key.json'}\nnode ID {alice}"))
        bob = json.loads(self._quiet("bob", "--json", "keygen"))["node"]
        show_cmd("bob", ["keygen"])
        print(indent(f"new node key in {self.homes['bob'] / 'key.json'}\nnode ID {bob}"), flush=True)

        heading(3, "alice registers at dc1, bob at dc2 (signed Node Transactions, confirmed on chain)")
        self.ntm("alice", "register", "--dc", dc1, expect=("status: confirmed",))
        self.ntm("bob", "register", "--dc", dc2, "--dc-address", dc2_address, expect=("status: confirmed",))

        heading(4, "Both run the node daemon (`ntm up`; as root it also makes a TUN interface, here not)")
        self.daemons = {}
        for who, extra in (("alice", ["--accept-any", "--echo"]), ("bob", [])):
            up = ["up", "--no-tun", "--port", str(free_udp_port()), *extra]
            show_cmd(who, up, " &")
            self.daemons[who] = subprocess.Popen(
                [*NTM, *up],
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env={**os.environ, "NTM_HOME": str(self.homes[who])},
            )
            print(indent(read_until(self.daemons[who], b"control socket", 30.0)), flush=True)

        heading(5, "bob finds alice through his own DC (dc2 reads her home DC, dc1, from the registry)")
        self.ntm("bob", "whois", alice, expect=(alice, "online"))

        heading(6, "bob sends alice a message: the DCs direct a tunnel, its key comes from ECDH between the nodes")
        self.ntm("bob", "alias", "alice", alice, expect=("alice.ntm",))
        self.ntm("bob", "send", "alice", "hello from B", expect=("reply: hello from B",))
        self.ntm("bob", "ping", "alice", "-c", "3", expect=("route direct", "3/3 replies"))

        heading(7, "The same through the relay server (it forwards ciphertext only)")
        self.ntm("bob", "send", "alice", "hello via the relay", "--relay", expect=("reply: hello via the relay",))
        self.ntm("bob", "ping", "alice", "-c", "3", "--relay", expect=("route relay", "3/3 replies"))

        heading(8, "alice's view: registration, her daemon's peers, what reached her")
        self.ntm("alice", "status", expect=("confirmed on chain", "PEER", "relay"))
        self.ntm("alice", "recv", expect=("hello from B", "hello via the relay"))

        heading(9, "Clean stop")
        for who in ("bob", "alice"):
            self.ntm(who, "down", expect=("stopping",))
            rest = self._wait(self.daemons.pop(who))
            if "stopped" not in rest:
                raise DemoFailed(f"{who}'s daemon did not report a clean stop")
        print(f"{DIM}${RESET} ^C   # stops `ntm devnet`:", flush=True)
        rest = self._stop(self.devnet, signal.SIGINT)
        self.devnet = None
        print(indent(rest), flush=True)
        if "stopped" not in rest:
            raise DemoFailed("the devnet did not report a clean stop")
        print(
            f"\n{BOLD}Demo OK{RESET} in {time.monotonic() - t0:.1f} s: registration on a shared chain, "
            "lookup across DCs, direct and relayed encrypted tunnels.",
            flush=True,
        )

    def _run(self, who: str, *args: str) -> subprocess.CompletedProcess:
        """`ntm ARGS` as `who` (their NTM_HOME), its output captured."""
        env = {**os.environ, "NTM_HOME": str(self.homes[who])}
        cmd = [*NTM, *args]
        return subprocess.run(
            cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=STEP_TIMEOUT_S, stdin=subprocess.DEVNULL
        )

    def _quiet(self, who: str, *args: str) -> str:
        proc = self._run(who, *args)
        if proc.returncode != 0:
            raise DemoFailed(f"`ntm {' '.join(args)}` failed: {proc.stderr.strip()}")
        return proc.stdout

    @staticmethod
    def _stop(proc: subprocess.Popen, sig: int) -> str:
        proc.send_signal(sig)
        return Demo._wait(proc)

    @staticmethod
    def _wait(proc: subprocess.Popen) -> str:
        try:
            out, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        if proc.returncode != 0:
            raise DemoFailed(f"exit code {proc.returncode}:\n{(out + err).decode(errors='replace')}")
        return out.decode(errors="replace").strip()

    def cleanup(self) -> None:
        for proc in (*self.daemons.values(), self.devnet):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def main() -> int:
    workdir = Path(tempfile.mkdtemp(prefix="ntm-demo-"))
    demo = Demo(workdir)
    ok = False
    try:
        demo.run()
        ok = True
    except (DemoFailed, subprocess.TimeoutExpired, OSError, ValueError) as exc:
        print(f"\nDEMO FAILED: {exc}", file=sys.stderr)
        print(f"logs kept in {workdir}/devnet (dc1.log, dc2.log, rs.log)", file=sys.stderr)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
    finally:
        demo.cleanup()
        if ok:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
