"""`ntm-dc` / `python -m dc`: wire the DC's parts together and run until SIGINT/SIGTERM.

It serves HTTP at once (/healthz says 503 until the registry cache has caught up with the chain),
and prints one JSON line on stdout ({"event": "ready", ...}) with the bound ports once it has, for
scripts and tests; everything else is logged to stderr, one line per event.
"""

from __future__ import annotations

import daemon.ctrl_c  # noqa: F401 (first: Ctrl-C during the imports below is one line, exit 130)
import asyncio
import json
import logging
import os
import socket
import ssl
import sys
from typing import Awaitable

from dc import config as dc_config, snapshot, wiring
from dc.cache import REMEMBERED_BLOCKS, RegistryCache
from dc.chainstatus import ChainStatus
from dc.coordinator import Coordinator
from dc.presence import KeepaliveProtocol
from dc.server import make_app
from dc.store import PRUNE_EVERY_S, Store
from chain.registry import BATCH_GAS_PER_RECORD, connect_registry
from daemon import httpapp, keystore, service, startup, tlspin
from daemon.service import udp_socket
from ntm import keys, tls_binding
from ntm.clock import SYSTEM
from ntm.errors import NtmError


async def serve(cfg: dc_config.DcConfig, stop: asyncio.Event) -> None:
    try:  # one DC per database: two with the same SQLite file would both sign and submit its outbox
        lock = service.hold_lock(cfg.db.with_name(cfg.db.name + ".lock"))
    except service.LockHeld as exc:
        raise service.LockHeld(cfg.db, exc.pid) from None
    key = keystore.load_keystore(cfg.key_file, keystore.passphrase(dc_config.PASSPHRASE_ENV, cfg.passphrase_file))
    registry, dep = await connect_registry(cfg.rpc_url, cfg.deployment, key.secret)
    store = Store(cfg.db, keys.node_id_of(key))
    clock = SYSTEM  # the real clock: every part of the DC is given it from here
    cache = RegistryCache(registry, dep["block"], clock)
    snap_path = cfg.db.with_name(cfg.db.name + ".snapshot")  # the registry cache at a block (dc/snapshot.py)
    snap = snapshot.read(snap_path, registry.chain_id, registry.address, dep["block"])
    if snap is not None:
        await cache.restore(snap)
    await cache.load()
    for number, block_hash in store.blocks():  # a rollback while this DC was down is seen on the first poll
        cache.remember(number, block_hash)
    socks = (udp_socket(cfg.udp_host, cfg.udp_port), udp_socket(cfg.udp_host, cfg.udp_alt_port))
    ports = (socks[0].getsockname()[1], socks[1].getsockname()[1])
    coord = wiring.build(
        key,
        registry,
        store,
        cache,
        cfg.hostname,
        cfg.relays,
        ports,
        new_nodes_per_hour=cfg.new_nodes_per_hour,
        new_nodes_burst=cfg.new_nodes_per_hour / 5,
        confirmations=cfg.confirmations,
        cs=cfg.cs,
        clock=clock,
    )
    chain_status = ChainStatus(cache, registry, BATCH_GAS_PER_RECORD, cfg.max_block_age, clock)
    if not cache.is_active_dc(coord.address):
        logging.warning(
            "DC %s is not active in the registry: registrations will be refused until it is admitted",
            keys.checksum(coord.address),
        )
    loop = asyncio.get_running_loop()
    transports = [
        (await loop.create_datagram_endpoint(lambda alt=alt: KeepaliveProtocol(coord.presence, alt), sock=sock))[0]
        for alt, sock in ((False, socks[0]), (True, socks[1]))
    ]
    tasks = [
        asyncio.create_task(cache.run(), name="cache"),
        asyncio.create_task(coord.submitter.run(), name="submitter"),
        asyncio.create_task(chain_status.run(), name="chain-status"),
        asyncio.create_task(cache.keep_snapshot(snap_path), name="snapshot"),
        asyncio.create_task(prune_outbox(store, cache, cfg.confirmations), name="outbox-prune"),
    ]
    probe = wiring.probe(coord)
    tasks.append(asyncio.create_task(probe.run(), name="federation-probe"))
    runner = httpapp.runner(make_app(coord, chain_status, tuple(cfg.admin_allow), probe), cfg.http_idle_timeout)
    await runner.setup()
    tls = tls_context(cfg, key, coord)
    site = tlspin.TlsSockSite(
        runner, http_listener(cfg.http_host, cfg.http_port), ssl_context=tls, handshake_timeout=cfg.http_idle_timeout
    )
    await site.start()
    http_port = site._server.sockets[0].getsockname()[1]
    pending = store.count_outbox("pending")
    if pending:
        logging.info("resubmitting %d pending outbox records", pending)
        coord.submitter.wake()
    try:
        # Serving already (/healthz says 503 catching_up, lookups of unknown nodes say catching_up),
        # but ready only once the registry is read up to the head (unless the stop comes first).
        if await first(cache.ready.wait(), stop.wait()):
            ready = {
                "event": "ready",
                "dc": keys.checksum(coord.address),
                "hostname": cfg.hostname,
                "http": f"{'https' if tls else 'http'}://{cfg.http_host}:{http_port}",
                "udp_ports": list(ports),
                "chain_id": registry.chain_id,
                "registry": keys.checksum(registry.address),
                "pid": os.getpid(),
            }
            service.settle_heap()
            print(json.dumps(ready), flush=True)
            logging.info("DC %s serving on %s (keepalive udp %d, %d)", ready["dc"], ready["http"], *ports)
            await stop.wait()
    finally:
        logging.info("shutting down")
        for t in tasks:
            t.cancel()
        if (snap := cache.snapshot()) is not None:  # a clean stop: the next start reads only the logs after it
            await snapshot.save(snap_path, snap)
        await runner.cleanup()
        for t in transports:
            t.close()
        await coord.federation.close()
        store.close()
        await registry.close()
        os.close(lock)


async def prune_outbox(store: Store, cache: RegistryCache, confirmations: int) -> None:
    """Every PRUNE_EVERY_S: confirmed outbox rows deeper than any rollback the DC re-checks go."""
    while True:
        await asyncio.sleep(PRUNE_EVERY_S)
        if cache.caught_up and (gone := store.prune_confirmed(cache.block - max(REMEMBERED_BLOCKS, confirmations))):
            logging.info("outbox: %d confirmed records pruned", gone)


async def first(ready: Awaitable, stop: Awaitable) -> bool:
    """Wait for `ready` or `stop`, whichever comes first; True if it was `ready`."""
    waits = [asyncio.ensure_future(ready), asyncio.ensure_future(stop)]
    done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for w in pending:
        w.cancel()
    return waits[0] in done


# --http-host values that mean "every address": one dual-stack socket (IPv4 and IPv6 nodes on one
# port; IPv4 only on a host without IPv6). A DC on 0.0.0.0 alone is out of reach for IPv6-only nodes.
ALL_ADDRESSES = ("0.0.0.0", "::", "*", "")


def http_listener(host: str, port: int) -> socket.socket:
    """The DC's listening HTTP socket: dual-stack for "every address", else on `host` alone."""
    if host in ALL_ADDRESSES:
        return service.tcp_listener(None, port)
    info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    return service.tcp_listener(info[4][0], port)


def tls_context(cfg: dc_config.DcConfig, key, coord: Coordinator) -> ssl.SSLContext | None:
    """The server TLS context (--tls-cert, else a certificate made at first start beside the
    database), and its binding to our chain key for /v1/info (ntm/tls_binding.py). None: plain
    HTTP, only with --insecure-plain-http (development)."""
    if cfg.insecure_plain_http:
        tlspin.warn_plain(f"DC {keys.checksum(coord.address)}")
        return None
    cert, cert_key = (
        (cfg.tls_cert, cfg.tls_key)
        if cfg.tls_cert
        else tlspin.ensure_certificate(
            cfg.db.with_name(cfg.db.stem + "-tls-cert.pem"),
            cfg.db.with_name(cfg.db.stem + "-tls-key.pem"),
            cfg.hostname,
            coord.clock,
        )
    )
    try:
        ctx, der = tlspin.server_context(cert, cert_key)
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise NtmError(f"cannot load the TLS certificate: {exc}") from None
    coord.tls = tls_binding.bind(key, der)
    return ctx


def main(argv: list[str] | None = None) -> int:
    parser = dc_config.parser()
    args = parser.parse_args(argv)
    startup.check_paths(parser, args)
    service.setup_logging(args.verbose)
    try:
        cfg = dc_config.load(args)
        for url in cfg.relays:  # a relay pinned by its certificate file: the file is readable now
            dc_config.relay_target(url, True).ssl()
    except ValueError as exc:
        print(f"ntm-dc: {exc}", file=sys.stderr)
        return 2
    return service.run("ntm-dc", lambda stop: serve(cfg, stop))


if __name__ == "__main__":
    sys.exit(main())
