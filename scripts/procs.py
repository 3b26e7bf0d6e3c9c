"""Child processes of the system (DCs, relays) for tests, benchmarks and the devnet.

Each child prints one JSON "ready" line on stdout once it serves; `start()` waits for it and the
process is stopped by its own PID. Logs go to a file next to the child's data.
"""

from __future__ import annotations

import ctypes
import json
import os
import random
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

# Starting a DC connects to the chain and reads the whole registry before its ready line (§5); a
# limit, not a wait: 60 s covers a slow CI machine running two test workers (20 s did not, at load 10+).
READY_TIMEOUT_S = 60.0
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def dying_with_parent() -> Callable[[], None]:
    """A Popen preexec_fn: the child gets SIGTERM when the process that starts it dies, even by
    SIGKILL (prctl PR_SET_PDEATHSIG, kept across exec). Start such children from the main thread:
    the signal follows the thread that forked."""
    parent = os.getpid()
    libc = ctypes.CDLL(None, use_errno=True)

    def preexec() -> None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID exists (signal 0 probes without sending anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def has_ipv6_loopback() -> bool:
    """Whether ::1 can be bound (some containers run without IPv6)."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


#: Where free_port draws from: below Linux's default ephemeral range (32768-60999).
FREE_PORT_RANGE = (20_000, 32_767)
FREE_PORT_TRIES = 50  # bind attempts before falling back to a kernel-chosen port
#: Slices of FREE_PORT_RANGE, one per pytest-xdist worker (and the processes it starts): a port
#: one worker's devnet picked is not drawn by another worker's test during the seconds before the
#: devnet binds it.
FREE_PORT_SLICES = 8
#: Ports this process's free_port returned: none is returned twice, so a caller drawing several
#: before binding any (the devnet's nine) never gets one port for two servers (seen twice in CI:
#: dc2 "Address already in use"; nine picks from a worker's slice of ~1,600 repeat one about 2% of
#: the time).
_handed_out: set[int] = set()


def _free_port_range() -> tuple[int, int]:
    """FREE_PORT_RANGE, or this pytest-xdist worker's slice of it (PYTEST_XDIST_WORKER=gwN)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if not worker.startswith("gw") or not worker[2:].isdigit():
        return FREE_PORT_RANGE
    low, high = FREE_PORT_RANGE
    width = (high - low + 1) // FREE_PORT_SLICES
    start = low + int(worker[2:]) % FREE_PORT_SLICES * width
    return start, start + width - 1


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port free right now on 127.0.0.1, for a server started a little later (tests, the
    devnet). Drawn below the kernel's ephemeral range, which outgoing connections and port-0 binds
    use: a port the kernel just handed us is the likeliest to be handed to one of them before the
    server binds it (seen: a DC's port taken by a connection in between)."""
    low, high = _free_port_range()
    if len(_handed_out) > high - low:
        _handed_out.clear()  # all of the range handed out: the oldest picks are long bound or gone
    for _ in range(FREE_PORT_TRIES):
        port = random.randint(low, high)
        if port in _handed_out:
            continue
        with socket.socket(socket.AF_INET, kind) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Child:
    """A Python module run as a child process that announces readiness with a JSON line."""

    def __init__(
        self,
        module: str,
        args: list[str],
        log_path: Path,
        env: dict | None = None,
        prefix: list[str] | None = None,
        die_with_parent: bool = False,
    ) -> None:
        self.module, self.args, self.log_path = module, args, Path(log_path)
        self.env = {**os.environ, **(env or {})}
        self.prefix = prefix or []  # e.g. ["ip", "netns", "exec", "ns1"] to run inside a namespace
        self.proc: subprocess.Popen | None = None
        self.ready: dict = {}
        self.die_with_parent = die_with_parent

    def start(self, timeout: float = READY_TIMEOUT_S) -> "Child":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [*self.prefix, sys.executable, "-m", self.module, *self.args],
            stdout=subprocess.PIPE,
            stderr=log,
            stdin=subprocess.DEVNULL,
            env=self.env,
            preexec_fn=dying_with_parent() if self.die_with_parent else None,
        )
        log.close()
        deadline = time.monotonic() + timeout
        line = b""
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"{self.module} did not start; log {self.log_path}:\n{self.log_tail()}")
            if select.select([self.proc.stdout], [], [], min(left, 0.2))[0]:
                chunk = os.read(self.proc.stdout.fileno(), 4096)
                if not chunk:
                    continue
                line += chunk
        self.ready = json.loads(line.split(b"\n")[0])
        return self

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL if it does not exit in time."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL: the crash test's way to stop a process."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def dc_child(
    workdir: Path,
    name: str,
    key_file: Path,
    rpc_url: str,
    deployment: Path,
    http_port: int,
    relays: list[str] = (),
    extra: list[str] = (),
    prefix: list[str] | None = None,
    http_host: str = "127.0.0.1",
    udp_host: str = "127.0.0.1",
    die_with_parent: bool = False,
) -> Child:
    args = [
        "--key-file",
        str(key_file),
        "--rpc-url",
        rpc_url,
        "--deployment",
        str(deployment),
        "--hostname",
        name,
        "--http-host",
        http_host,
        "--http-port",
        str(http_port),
        "--udp-host",
        udp_host,
        "--udp-port",
        "0",
        "--db",
        str(workdir / f"{name}.sqlite"),
        *extra,
    ]
    for r in relays:
        args += ["--relay", r]
    return Child("dc", args, workdir / f"{name}.log", prefix=prefix, die_with_parent=die_with_parent)


def rs_child(
    rpc_url: str, deployment: Path, data_dir: Path, *extra: str, udp_port: int = 0, log: str = "rs.log"
) -> Child:
    """A relay on loopback, every port but the UDP one ephemeral; its certificate made and kept in
    `data_dir`, its log there too. `extra`: more flags (--udp-host, --advertise, --capture ...)."""
    args = ["--rpc-url", rpc_url, "--deployment", str(deployment), "--udp-port", str(udp_port)]
    args += ["--http-port", "0", "--stream-port", "0", "--data-dir", str(data_dir), *extra]
    data_dir.mkdir(parents=True, exist_ok=True)
    return Child("rs", args, data_dir / log)
