"""`ntm-dc` / `python -m dc`: wire the DC's parts together and run until SIGINT/SIGTERM.

On start it prints one JSON line on stdout ({"event": "ready", ...}) with the bound ports, for
scripts and tests; everything else is logged to stderr, one line per event.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl
import sys

from aiohttp import web

from dc import config as dc_config
from dc.cache import RegistryCache
from dc.chainstatus import ChainStatus
from dc.coordinator import Coordinator
from dc.dashboard import FederationProbe
from dc.presence import KeepaliveProtocol
from dc.server import make_app
from dc.store import Store
from chain.registry import BATCH_GAS_PER_RECORD, connect_registry
from daemon import keystore, service, tlspin
from daemon.service import udp_socket
from ntm import keys, tls_binding
from ntm.errors import NtmError


async def serve(cfg: dc_config.DcConfig, stop: asyncio.Event) -> None:
    try:  # one DC per database: two with the same SQLite file would both sign and submit its outbox
        lock = service.hold_lock(cfg.db.with_name(cfg.db.name + ".lock"))
    except service.LockHeld as exc:
        raise service.LockHeld(cfg.db, exc.pid) from None
    key = keystore.load_keystore(cfg.key_file, keystore.passphrase(dc_config.PASSPHRASE_ENV, cfg.passphrase_file))
    registry, dep = await connect_registry(cfg.rpc_url, cfg.deployment, key.secret)
    store = Store(cfg.db, keys.node_id_of(key))
    cache = RegistryCache(registry, dep["block"])
    await cache.load()
    for number, block_hash in store.blocks():  # a rollback while this DC was down is seen on the first poll
        cache.remember(number, block_hash)
    socks = (udp_socket(cfg.udp_host, cfg.udp_port), udp_socket(cfg.udp_host, cfg.udp_alt_port))
    ports = (socks[0].getsockname()[1], socks[1].getsockname()[1])
    coord = Coordinator(key, registry, store, cache, cfg.hostname, cfg.relays, ports,
                        new_nodes_per_hour=cfg.new_nodes_per_hour, new_nodes_burst=cfg.new_nodes_per_hour / 5,
                        confirmations=cfg.confirmations, cs=cfg.cs)
    chain_status = ChainStatus(cache, registry, BATCH_GAS_PER_RECORD, cfg.max_block_age)
    await cache.poll()  # the head (for /healthz), a rollback, the first chunk of events: before serving
    if not cache.is_active_dc(coord.address):
        logging.warning("DC %s is not active in the registry: registrations will be refused until it is admitted",
                        keys.checksum(coord.address))
    loop = asyncio.get_running_loop()
    transports = [(await loop.create_datagram_endpoint(lambda alt=alt: KeepaliveProtocol(coord.presence, alt),
                                                       sock=sock))[0] for alt, sock in ((False, socks[0]), (True, socks[1]))]
    tasks = [asyncio.create_task(cache.run(), name="cache"), asyncio.create_task(coord.submitter.run(), name="submitter"),
             asyncio.create_task(chain_status.run(), name="chain-status")]
    probe = FederationProbe(coord)
    tasks.append(asyncio.create_task(probe.run(), name="federation-probe"))
    runner = web.AppRunner(make_app(coord, chain_status, tuple(cfg.admin_allow), probe), access_log=None,
                           keepalive_timeout=cfg.http_idle_timeout)
    await runner.setup()
    tls = tls_context(cfg, key, coord)
    site = tlspin.TcpSite(runner, cfg.http_host, cfg.http_port, ssl_context=tls, handshake_timeout=cfg.http_idle_timeout)
    await site.start()
    http_port = site._server.sockets[0].getsockname()[1]
    pending = store.count_outbox("pending")
    if pending:
        logging.info("resubmitting %d pending outbox records", pending)
        coord.submitter.wake()
    ready = {"event": "ready", "dc": keys.checksum(coord.address), "hostname": cfg.hostname,
             "http": f"{'https' if tls else 'http'}://{cfg.http_host}:{http_port}", "udp_ports": list(ports),
             "chain_id": registry.chain_id, "registry": keys.checksum(registry.address), "pid": os.getpid()}
    print(json.dumps(ready), flush=True)
    logging.info("DC %s serving on %s (keepalive udp %d, %d)", ready["dc"], ready["http"], *ports)
    try:
        await stop.wait()
    finally:
        logging.info("shutting down")
        for t in tasks:
            t.cancel()
        await runner.cleanup()
        for t in transports:
            t.close()
        await coord.federation.close()
        store.close()
        await registry.close()
        os.close(lock)


def tls_context(cfg: dc_config.DcConfig, key, coord: Coordinator) -> ssl.SSLContext | None:
    """The server TLS context (--tls-cert, else a certificate made at first start beside the
    database), and its binding to our chain key for /v1/info (ntm/tls_binding.py). None: plain
    HTTP, only with --insecure-plain-http (development)."""
    if cfg.insecure_plain_http:
        tlspin.warn_plain(f"DC {keys.checksum(coord.address)}")
        return None
    cert, cert_key = (cfg.tls_cert, cfg.tls_key) if cfg.tls_cert else tlspin.ensure_certificate(
        cfg.db.with_name(cfg.db.stem + "-tls-cert.pem"), cfg.db.with_name(cfg.db.stem + "-tls-key.pem"), cfg.hostname)
    try:
        ctx, der = tlspin.server_context(cert, cert_key)
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise NtmError(f"cannot load the TLS certificate: {exc}") from None
    coord.tls = tls_binding.bind(key, der)
    return ctx


def main(argv: list[str] | None = None) -> int:
    args = dc_config.parser().parse_args(argv)
    service.setup_logging(args.verbose)
    try:
        cfg = dc_config.load(args)
    except ValueError as exc:
        print(f"ntm-dc: {exc}", file=sys.stderr)
        return 2
    return service.run("ntm-dc", lambda stop: serve(cfg, stop))


if __name__ == "__main__":
    sys.exit(main())
