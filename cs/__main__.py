"""`ntm-cs` / `python -m cs`: a Cache Server beside a DC, until SIGINT/SIGTERM.

It signs notices with its DC's key (so other DCs accept them as that DC's) and asks that DC who
may use it. On start it prints one JSON line on stdout ({"event": "ready", "http", "url", ...});
logs go to stderr.
"""

from __future__ import annotations

import daemon.ctrl_c  # noqa: F401 (first: Ctrl-C during the imports below is one line, exit 130)
import argparse
import asyncio
import json
import os
import socket
import sys
from pathlib import Path

from aiohttp import web

from cs.dclink import DcLink
from cs.core import Limits
from cs.server import CacheServer, make_app
from cs.store import Store
from daemon import httpapp, keystore, service, startup
from ntm import keys
from ntm.clock import Clock

DEFAULT_HTTP_PORT = 8350  # next to the DC's 8330 and the relay's 8340
PASSPHRASE_ENV = "NTM_DC_PASSPHRASE"
MB = 1 << 20


def parser() -> argparse.ArgumentParser:
    lim = Limits()
    p = startup.OneLineParser(
        prog="ntm-cs",
        description="Run a Cache Server: stores end-to-end sealed items for nodes that are offline, beside a DC.",
    )
    p.add_argument(
        "--dc",
        required=True,
        metavar="URL",
        type=startup.http_url,
        help="this CS's DC (HTTP), e.g. http://127.0.0.1:8330",
    )
    p.add_argument(
        "--key-file",
        type=startup.readable_file,
        required=True,
        help=f"the DC's key (keystore; passphrase ${PASSPHRASE_ENV})",
    )
    keystore.passphrase_file_arg(p, PASSPHRASE_ENV)
    p.add_argument(
        "--data-dir",
        type=startup.creatable_path,
        default=Path("cs-data"),
        help="SQLite index and blobs (default ./cs-data)",
    )
    service.http_listen_args(p, "HTTP", DEFAULT_HTTP_PORT)
    p.add_argument(
        "--public-url", type=startup.http_url, help="the URL nodes reach this CS at (default http://HOST:PORT)"
    )
    p.add_argument("--max-item-mb", type=startup.positive, default=lim.max_item_bytes / MB, help="largest item")
    p.add_argument("--sender-quota-mb", type=startup.positive, default=lim.sender_bytes / MB, help="stored per sender")
    p.add_argument(
        "--sender-items", type=startup.positive_int, default=lim.sender_items, help="items stored per sender"
    )
    p.add_argument(
        "--recipient-quota-mb", type=startup.positive, default=lim.recipient_bytes / MB, help="waiting per recipient"
    )
    p.add_argument("--total-gb", type=startup.positive, default=lim.total_bytes / (1 << 30), help="stored in all")
    p.add_argument(
        "--ttl-hours", type=startup.positive, default=lim.ttl_ms / 3_600_000, help="undelivered items are deleted after"
    )
    p.add_argument(
        "--admin-allow",
        action="append",
        type=service.network,
        metavar="CIDR",
        help="network allowed to read /metrics (default loopback)",
    )
    service.idle_timeout_arg(p)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


async def serve(args: argparse.Namespace, stop: asyncio.Event) -> None:
    key = keystore.load_keystore(args.key_file, keystore.passphrase(PASSPHRASE_ENV, args.passphrase_file))
    limits = Limits(
        int(args.max_item_mb * MB),
        int(args.sender_quota_mb * MB),
        args.sender_items,
        int(args.recipient_quota_mb * MB),
        int(args.ttl_hours * 3_600_000),
        int(args.total_gb * (1 << 30)),
    )
    store = Store(args.data_dir)
    clock = Clock()  # the real clock, built here and passed to the parts that read time
    link = DcLink(args.dc, key, clock)
    sock = socket.create_server((args.http_host, args.http_port))  # the port first: the URL may name it
    port = sock.getsockname()[1]
    url = args.public_url or f"http://{args.http_host}:{port}"
    cs = CacheServer(store, link, url, limits, args.http_idle_timeout or service.HTTP_IDLE_TIMEOUT_S, clock)
    runner = httpapp.runner(make_app(cs, tuple(args.admin_allow or ())), cs.idle_timeout_s)
    try:
        await runner.setup()
        await web.SockSite(runner, sock).start()
        janitor = asyncio.create_task(cs.expire_loop())
        print(
            json.dumps(
                {
                    "event": "ready",
                    "http": f"http://{args.http_host}:{port}",
                    "url": url,
                    "dc": keys.checksum(keys.node_id_of(key)),
                    "data_dir": str(args.data_dir),
                    "pid": os.getpid(),
                }
            ),
            flush=True,
        )
        await stop.wait()
        janitor.cancel()
        await cs.tasks.cancel()
    finally:
        await runner.cleanup()
        await link.close()
        store.close()


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    startup.check_paths(p, args)
    service.setup_logging(args.verbose)
    return service.run("ntm-cs", lambda stop: serve(args, stop))


if __name__ == "__main__":
    sys.exit(main())
