"""Process plumbing shared by the daemons (ntm-dc, ntm-rs) and the node: logging, signals, exit
codes, sockets.

Its own package at the edge: dc/ and rs/ must not import each other, and ntm/ stays free of I/O.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import fcntl
import gc
import ipaddress
import logging
import os
import signal
import socket
import sys
from collections import Counter
from pathlib import Path
from typing import Awaitable, Callable, Literal

from aiohttp import web

from daemon import startup
from daemon.startup import INTERRUPTED
from ntm import messages
from ntm.addr import unmapped
from ntm.clock import Clock
from ntm.errors import NtmError

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
log = logging.getLogger("ntm.tasks")


# An HTTP connection that has not completed a request within this many seconds is closed: a
# client that connects and sends nothing, or its headers a byte at a time (slowloris), holds a
# socket for at most this long. (A WebSocket session, once open, is kept by its heartbeat.)
HTTP_IDLE_TIMEOUT_S = 15.0

# Who may read the operator endpoints (metrics, per-path counters) unless told otherwise: the
# host itself. They show traffic volumes and node activity, which outsiders have no need to see.
DEFAULT_ADMIN_ALLOW = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
ADMIN_ALLOW = web.AppKey("admin_allow", tuple)


def network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """A CIDR network for --admin-allow (argparse type)."""
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def from_admin(request: web.Request) -> bool:
    """The client is in the app's admin networks (ADMIN_ALLOW, default loopback)."""
    nets = request.app.get(ADMIN_ALLOW) or DEFAULT_ADMIN_ALLOW
    try:
        ip = ipaddress.ip_address(unmapped(request.remote or ""))
    except ValueError:
        return False
    return any(ip in n for n in nets)


def admin_only(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
    """Serve an operator endpoint only to clients in the admin networks; anyone else gets 403
    and learns nothing."""

    async def guarded(request: web.Request) -> web.StreamResponse:
        if not from_admin(request):
            return web.json_response(
                {"error": "forbidden", "message": "operator endpoint: not for this address"}, status=403
            )
        return await handler(request)

    return guarded


async def read_json(request: web.Request):
    """A request's JSON body; ParseError if it is not JSON, nests too deep or holds an integer
    beyond 64 bits (messages.loads); the app's client_max_size still raises
    HTTPRequestEntityTooLarge, which daemon/httpapp.py answers 413."""
    return messages.loads(await request.read())


def daemon_parser(prog: str, description: str, chain_required: bool) -> argparse.ArgumentParser:
    """The flags every daemon shares: where the chain is, which deployment, who may read the
    operator endpoints, and -v."""
    p = startup.OneLineParser(prog=prog, description=description)
    p.add_argument(
        "--admin-allow",
        action="append",
        type=network,
        metavar="CIDR",
        help="network allowed to read /metrics and other operator endpoints (repeatable; default: loopback only)",
    )
    p.add_argument(
        "--rpc-url",
        action="append",
        required=chain_required,
        metavar="URL",
        type=startup.ws_or_http_url,
        help="Ethereum JSON-RPC URL of the chain; repeat for fallbacks (the first, your own node, "
        "is preferred; the next is used when it fails)",
    )
    p.add_argument(
        "--deployment",
        type=startup.readable_file,
        required=chain_required,
        help="deployment JSON written by scripts/deploy.py",
    )
    idle_timeout_arg(p)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def http_listen_args(p: argparse.ArgumentParser, what: str, port: int) -> None:
    """--http-host (loopback by default: opening a server to others is a choice) and --http-port."""
    p.add_argument("--http-host", default="127.0.0.1", help=f"{what} listen address (default 127.0.0.1)")
    p.add_argument("--http-port", type=startup.port, default=port, help=f"{what} port (default {port}; 0 = any)")


def idle_timeout_arg(p: argparse.ArgumentParser) -> None:
    """--http-idle-timeout, for every HTTP daemon (the CS has a parser of its own)."""
    p.add_argument(
        "--http-idle-timeout",
        type=startup.positive,
        metavar="S",
        help=f"close HTTP connections idle or stalled this long (default {HTTP_IDLE_TIMEOUT_S:.0f} s)",
    )


class LockHeld(NtmError):
    """Another live process holds the lock (`pid`: what it wrote there, 0 if unknown)."""

    def __init__(self, path: Path, pid: int) -> None:
        super().__init__(f"{path} is in use by another running process (pid {pid or '?'})")
        self.pid = pid


def hold_lock(path: Path) -> int:
    """An exclusive flock on `path` for as long as the returned descriptor stays open: the kernel
    releases it when the process dies, even by SIGKILL, so a stale lock never blocks a restart.
    The file holds our pid, for the message another process gets (LockHeld)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        other = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            raise LockHeld(path, int(other) if other.isdigit() else 0) from None
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def setup_logging(verbose: bool, level: str = "info") -> None:
    """One line per event on stderr at `level` (debug if `verbose`); stdout stays free for the
    JSON ready line."""
    logging.basicConfig(level="DEBUG" if verbose else level.upper(), format=LOG_FORMAT, stream=sys.stderr)


def stop_on_signals() -> asyncio.Event:
    """An event set by SIGINT or SIGTERM (call inside the running loop)."""
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    return stop


def sd_notify(state: str) -> bool:
    """Tell systemd (a Type=notify unit: packaging/systemd/) `state`, e.g. "READY=1", over the
    datagram socket in $NOTIFY_SOCKET (a path, or "@name" in the abstract namespace); False when
    not run by systemd. The protocol is one datagram of KEY=VALUE lines: no library needed."""
    where = os.environ.get("NOTIFY_SOCKET", "")
    if not where:
        return False
    address = "\0" + where[1:] if where.startswith("@") else where
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), address)
    except OSError as exc:
        logging.warning("cannot tell systemd %s at %s: %s", state, where, exc.strerror or exc)
        return False
    return True


class StartingStop(asyncio.Event):
    """The stop event of service.run: it knows whether the server waits on it yet (is serving).
    Waiting on it is being ready: systemd is told so (READY=1), and told STOPPING=1 once it is set."""

    serving = False

    async def wait(self) -> Literal[True]:
        if not self.serving:
            self.serving = True
            sd_notify("READY=1")
        await super().wait()
        sd_notify("STOPPING=1")
        return True


def run(name: str, serve: Callable[[asyncio.Event], Awaitable[None]]) -> int:
    """Run `serve(stop)` until SIGINT or SIGTERM sets `stop`; a project error or OS error becomes
    one line and exit 1. A signal before `serve` waits on `stop` (still starting: the chain, the
    key, the sockets) cancels the start-up instead: its cleanup runs, then one line and exit 130."""

    async def main() -> bool:
        stop, task = StartingStop(), asyncio.current_task()

        def signalled() -> None:
            stop.set()
            if not stop.serving:
                task.cancel()

        for sig in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(sig, signalled)
        try:
            await serve(stop)
        except asyncio.CancelledError:
            if stop.serving:
                raise
            return False
        return True

    try:
        served = asyncio.run(main())
    except (NtmError, OSError) as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return 1
    if not served:
        print(f"{name}: interrupted", file=sys.stderr)
        return INTERRUPTED
    return 0


#: Buffers of a tunnel socket (a node's, a relay exit's): large enough to absorb a burst of ~1000
#: full-size datagrams.
# Young collections every this many container allocations, not Python's 700: one direction allocates
# hundreds, so under load the default ran one every direction or two (with the freeze below, 4 pairs
# of bench/scale.py --directions: CPU per direction 0.285 -> 0.26 ms at the requester's DC, 0.30 ->
# 0.28 at the peer's; p99 98 -> 60 ms); the garbage it lets wait is a few MB at most.
GC_YOUNG_OBJECTS = 20_000


def settle_heap() -> None:
    """Once a daemon is ready: what is loaded by then (imports; a DC's registry cache, most of its
    heap, kept for the process's life) is frozen out of the collector's walks, so a full collection
    does not walk every record while requests wait; young collections run every GC_YOUNG_OBJECTS."""
    gc.freeze()
    gc.set_threshold(GC_YOUNG_OBJECTS, *gc.get_threshold()[1:])


SOCKET_BUFFER = 4 * 1024 * 1024


def udp_socket(host: str | None, port: int, buffer: int | None = None) -> socket.socket:
    """A bound UDP socket. `host` "::" is dual-stack (IPV6_V6ONLY=0) so IPv4-only and IPv6-only
    hosts reach the same port; None is the same, falling back to IPv4 on a host without IPv6; an
    IPv4 host ("0.0.0.0") gives an IPv4-only socket. `buffer`: SO_RCVBUF/SO_SNDBUF, best effort.
    A port that cannot be bound is named in the error."""
    sock = _bound(host, port, socket.SOCK_DGRAM, "UDP")
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF) if buffer else ():
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, buffer)
        except OSError:
            pass
    return sock


def tcp_listener(host: str | None, port: int) -> socket.socket:
    """A listening TCP socket, with the addresses of udp_socket: one socket, so port 0 gives one
    port for both families (two sockets would each get their own)."""
    sock = _bound(host, port, socket.SOCK_STREAM, "TCP")
    sock.listen(socket.SOMAXCONN)
    return sock


def _bound(host: str | None, port: int, kind: int, name: str) -> socket.socket:
    try:
        return _bind(host, port, kind)
    except OSError as exc:
        where = f"[{host}]:{port}" if host and ":" in host else f"{host or '*'}:{port}"
        raise OSError(exc.errno, f"cannot bind {name} {where}: {exc.strerror or exc}") from None


def _bind(host: str | None, port: int, kind: int) -> socket.socket:
    if host is None or ":" in host:
        sock = socket.socket(socket.AF_INET6, kind)
        try:
            if kind == socket.SOCK_STREAM:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind((host or "::", port))
        except OSError:
            sock.close()
            if host is not None:
                raise
            return _bind("0.0.0.0", port, kind)
        return sock
    sock = socket.socket(socket.AF_INET, kind)
    if kind == socket.SOCK_STREAM:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


class BackgroundTasks:
    """Tasks started in the background, each referenced until it ends (asyncio keeps only weak
    references: an unreferenced task may be collected mid-flight), and cancelled together."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task] = set()

    def spawn(self, coro) -> asyncio.Task:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._ended)
        return task

    def _ended(self, task: asyncio.Task) -> None:
        """Forget `task`; one that died of an exception says so in one line (a loop that stops
        silently, e.g. a watcher, is otherwise noticed only by what it no longer does)."""
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("background task %s ended: %s: %.200s", task.get_coro().__qualname__, type(exc).__name__, exc)

    def __len__(self) -> int:
        """Tasks still running."""
        return len(self._tasks)

    async def cancel(self, *more: asyncio.Task | None) -> None:
        """Cancel every task still running (and `more`), and wait until they have ended."""
        tasks = [*self._tasks, *(t for t in more if t is not None)]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class LogLimiter:
    """Counts events an outsider can trigger at will (forged packets) and logs them as one summary
    line per `interval` seconds at most, so a flood costs the attacker more than our log."""

    def __init__(self, logger: logging.Logger, what: str, interval: float, clock: Clock) -> None:
        self.logger, self.what, self.interval, self.clock = logger, what, interval, clock
        self.pending: Counter[str] = Counter()
        self._last = -interval

    def note(self, reason: str) -> None:
        self.pending[reason] += 1
        now = self.clock.now()
        if now - self._last >= self.interval:
            self._last = now
            summary = ", ".join(f"{n} {r}" for r, n in sorted(self.pending.items()))
            self.logger.info("%s refused: %s (in the last %.0f s at most)", self.what, summary, self.interval)
            self.pending.clear()


# Documentation addresses, routed by the default route: what the host would use "towards the
# Internet" for each IP version (a UDP connect() to them sends nothing).
ROUTE_PROBES = {4: "192.0.2.1", 6: "2001:db8::1"}


def source_address(target: str) -> str | None:
    """The local IP the OS would send from towards `target` (an IP or a name), or None if no route."""
    try:
        info = socket.getaddrinfo(target, 9, type=socket.SOCK_DGRAM)[0]
        with socket.socket(info[0], socket.SOCK_DGRAM) as s:
            s.connect(info[4])  # UDP connect sends nothing; it only picks the route
            return s.getsockname()[0]
    except OSError:
        return None
