"""Process plumbing shared by the daemons (ntm-dc, ntm-rs): logging, signals, exit codes, sockets.

The one I/O module in ntm/: it lives here because dc/ and rs/ must not import each other.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import socket
import sys
from pathlib import Path
from typing import Awaitable, Callable

from ntm.errors import NtmError
from ntm.registry import Registry

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(verbose: bool) -> None:
    """One line per event on stderr; stdout stays free for the JSON ready line."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format=LOG_FORMAT, stream=sys.stderr)


def stop_on_signals() -> asyncio.Event:
    """An event set by SIGINT or SIGTERM (call inside the running loop)."""
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    return stop


def run(name: str, serve: Callable[[asyncio.Event], Awaitable[None]]) -> int:
    """Run `serve(stop)` until a signal; a project error or OS error becomes one line and exit 1."""

    async def main() -> None:
        await serve(stop_on_signals())

    try:
        asyncio.run(main())
    except (NtmError, OSError) as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return 1
    return 0


def prometheus_text(metrics: dict[str, int | float]) -> str:
    """Prometheus exposition format; names ending in _total are counters, the rest gauges."""
    return "".join(f"# TYPE {k} {'counter' if k.endswith('_total') else 'gauge'}\n{k} {v}\n" for k, v in metrics.items())


def udp_socket(host: str, port: int) -> socket.socket:
    """A bound UDP socket: dual-stack on '::' (IPV6_V6ONLY=0) so IPv4-only and IPv6-only hosts reach
    the same port; an IPv4 host ('0.0.0.0') gives an IPv4-only socket for machines without IPv6."""
    if ":" in host:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((host, port))
    return sock


def load_deployment(path: Path) -> dict:
    """The deployment file written by scripts/deploy.py: chain id, registry address, deploy block."""
    try:
        dep = json.loads(Path(path).read_text())
        return {"chain_id": int(dep["chain_id"]), "registry": dep["registry"], "block": int(dep.get("block", 0))}
    except FileNotFoundError:
        raise NtmError(f"deployment file {path} not found (run scripts/deploy.py)") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise NtmError(f"deployment file {path} is invalid: {exc}") from None


async def connect_registry(rpc_url: str, deployment: Path, key: bytes | None = None) -> tuple[Registry, dict]:
    """The registry of a deployment, refusing a chain whose id differs from the deployment's."""
    dep = load_deployment(deployment)
    registry = await Registry.connect(rpc_url, dep["registry"], key)
    if registry.chain_id != dep["chain_id"]:
        await registry.close()
        raise NtmError(f"chain at {rpc_url} has id {registry.chain_id}, deployment says {dep['chain_id']}")
    return registry, dep
