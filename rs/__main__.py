"""`ntm-rs` / `python -m rs`: run a Relay Server until SIGINT/SIGTERM.

On start it prints one JSON line on stdout ({"event": "ready", "udp_port", "http", "pin", "control",
"relay", "pid", ...}) for scripts and tests (`control` is what a DC's --relay names: the control
API's URL and its certificate's pin); everything else is logged to stderr, one line per event (path added,
side bound or moved, path removed, direction refused).
"""

from __future__ import annotations

import daemon.ctrl_c  # noqa: F401 (first: Ctrl-C during the imports below is one line, exit 130)
import argparse
import asyncio
import json
import logging
import os
import ssl
import sys
from pathlib import Path

from aiohttp import web

from chain.registry import connect_registry
from daemon import service, startup, tlspin
from ntm import keys, messages
from ntm.errors import NtmError, ParseError
from daemon.service import udp_socket
from rs.relay import MAX_PATHS, RelayTable
from ntm.addr import format_endpoint, parse_endpoint
from ntm.clock import SYSTEM
from rs.server import (
    METRICS,
    Relay,
    RelayUdp,
    default_advertise,
    housekeeping,
    make_app,
    make_stream_app,
    stream_urls,
)
from rs.trust import DcTrust
from rs import exit as relay_exit
from rs.exit_policy import EXIT_MAX_BYTES, EXIT_MAX_FLOWS, EXIT_RATE_BPS, Caps, ExitPolicy

DEFAULT_UDP_PORT = 4340  # next to the tunnel port 4330
DEFAULT_HTTP_PORT = 8340  # control API; the DC's is 8330
# Tunnel packets over TCP (§8.4): the HTTPS port, the one every network that allows web traffic
# lets out.
DEFAULT_STREAM_PORT = 443


def _endpoint(text: str) -> str:
    try:
        return format_endpoint(*parse_endpoint(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _stream_port(text: str) -> int | str:
    if text == "off":
        return text
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number or 'off': {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port out of range: {port}")
    return port


def _stream_url(text: str) -> str:
    try:
        return messages.decode(messages.StreamUrls, [text])[0]
    except ParseError:
        raise argparse.ArgumentTypeError(f"not a ws:// or wss:// URL: {text!r}") from None


def parser() -> argparse.ArgumentParser:
    p = service.daemon_parser(
        "ntm-rs",
        "Run a Relay Server: relays tunnel datagrams between two nodes on paths "
        "that active DCs (checked on chain) ask for; never holds a tunnel key.",
        chain_required=False,
    )  # required unless --print-pin (main)
    p.add_argument(
        "--udp-host",
        default="::",
        help="relay UDP listen address (default '::', dual-stack: IPv4 and IPv6 nodes on one port; "
        "'0.0.0.0' on machines without IPv6)",
    )
    p.add_argument(
        "--udp-port",
        type=startup.port,
        default=DEFAULT_UDP_PORT,
        help=f"relay UDP port (default {DEFAULT_UDP_PORT}; 0 = any)",
    )
    p.add_argument(
        "--no-udp-offload",
        action="store_true",
        help="read, decide and send every datagram on its own even where the kernel has UDP GRO/GSO "
        "(which otherwise carry a run of one sender's datagrams in one syscall each way)",
    )
    service.http_listen_args(p, "control API", DEFAULT_HTTP_PORT)
    p.add_argument(
        "--data-dir",
        type=startup.creatable_path,
        default=Path("."),
        metavar="DIR",
        help="where the control API's TLS certificate and key are made at first start and kept "
        "(default: the current directory)",
    )
    p.add_argument(
        "--print-pin",
        action="store_true",
        help="print the certificate's pin (made if absent) and exit: DCs name this relay as "
        "--relay https://HOST:PORT#<pin>",
    )
    startup.insecure_arg(p, "serve the control API in plain HTTP", "relay path tokens")
    p.add_argument(
        "--advertise",
        action="append",
        metavar="IP:PORT",
        type=_endpoint,
        help="relay endpoint told to DCs and nodes (repeatable; '[v6]:port' for IPv6; "
        "default: the address each DC reached the control API at, else guessed from the bound address)",
    )
    p.add_argument(
        "--stream-host",
        default="",
        help="stream listener address (tunnel packets over a WebSocket on TCP, for nodes whose network "
        "blocks UDP; default: every address, IPv4 and IPv6)",
    )
    p.add_argument(
        "--stream-port",
        type=_stream_port,
        help=f"stream listener port (default {DEFAULT_STREAM_PORT}, as HTTPS, if it can be bound: a "
        "warning if not, e.g. without root; given: must be bound; 0 = any; 'off' = none)",
    )
    p.add_argument(
        "--stream-advertise",
        action="append",
        metavar="URL",
        type=_stream_url,
        help="stream URL told to DCs and nodes (repeatable; default: ws[s]://<each advertised host>:<port>/v1/stream)",
    )
    p.add_argument(
        "--stream-tls-cert",
        type=startup.readable_file,
        metavar="PEM",
        help="serve the stream over TLS (wss://) with this certificate chain (with --stream-tls-key)",
    )
    p.add_argument(
        "--stream-tls-key", type=startup.readable_file, metavar="PEM", help="the TLS certificate's private key"
    )
    p.add_argument(
        "--max-paths",
        type=startup.positive_int,
        default=MAX_PATHS,
        help=f"bound on simultaneous paths (default {MAX_PATHS})",
    )
    p.add_argument(
        "--capture",
        type=startup.creatable_path,
        metavar="FILE",
        help="DEBUG ONLY: append every forwarded datagram, hex, one per line, to FILE "
        "(used by tests to show the relay only ever sees ciphertext)",
    )
    _exit_flags(p)
    return p


def _http_url(scheme: str, host: str, port: int) -> str:
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


def control_tls(args: argparse.Namespace) -> tuple[ssl.SSLContext | None, str | None]:
    """The control API's TLS context and its pin (its certificate, made in --data-dir at first
    start); (None, None) with --insecure-plain-http. A relay has no chain key, so DCs pin it by
    the certificate's hash (§5 "The relay's control channel")."""
    if args.insecure_plain_http:
        tlspin.warn_plain("the relay's control API")
        return None, None
    try:
        ctx, der = tlspin.server_context(
            *tlspin.ensure_certificate(
                args.data_dir / "rs-tls-cert.pem", args.data_dir / "rs-tls-key.pem", "ntm-rs", SYSTEM
            )
        )
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise NtmError(f"cannot make or load the control API's TLS certificate in {args.data_dir}: {exc}") from None
    return ctx, tlspin.pin_of(der)


def _exit_policy(text: str) -> str:
    try:
        ExitPolicy.parse([text])
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _exit_flags(p: argparse.ArgumentParser) -> None:
    """The exit for ordinary servers (docs/PROTOCOL.md §10.13): off unless --exit."""
    g = p.add_argument_group(
        "exit",
        "the relay as exit for ordinary servers (needs root: a TUN interface, "
        "IP forwarding, masquerade); it sees the traffic it forwards, as any exit does",
    )
    g.add_argument("--exit", action="store_true", help="NAT booked nodes' traffic to ordinary servers (off by default)")
    g.add_argument(
        "--exit-allow",
        action="append",
        default=[],
        metavar="NODE[,NODE]|all-registered",
        type=_exit_policy,
        help="nodes a DC may book at the exit (repeatable); 'all-registered': any node an active DC "
        "books (default: nobody)",
    )
    g.add_argument(
        "--exit-port",
        type=startup.port,
        default=relay_exit.DEFAULT_EXIT_PORT,
        help=f"the exit's tunnel UDP port (default {relay_exit.DEFAULT_EXIT_PORT}; 0 = any)",
    )
    g.add_argument(
        "--exit-advertise",
        action="append",
        metavar="IP:PORT",
        type=_endpoint,
        help="the exit's endpoint told to nodes (repeatable; default: each --advertise host, exit port)",
    )
    g.add_argument(
        "--exit-rate",
        type=startup.positive_int,
        default=EXIT_RATE_BPS,
        metavar="BYTES_PER_S",
        help=f"per-node cap, both directions (default {EXIT_RATE_BPS})",
    )
    g.add_argument(
        "--exit-max-bytes",
        type=startup.positive_int,
        default=EXIT_MAX_BYTES,
        metavar="BYTES",
        help=f"per-booking cap, both directions (default {EXIT_MAX_BYTES})",
    )
    g.add_argument(
        "--exit-max-flows",
        type=startup.positive_int,
        default=EXIT_MAX_FLOWS,
        metavar="N",
        help=f"concurrent flows per node (default {EXIT_MAX_FLOWS})",
    )
    g.add_argument(
        "--exit-tun",
        default=relay_exit.DEFAULT_EXIT_TUN,
        metavar="NAME",
        help=f"the exit's TUN interface (default {relay_exit.DEFAULT_EXIT_TUN})",
    )
    g.add_argument(
        "--exit-state",
        default=relay_exit.DEFAULT_EXIT_STATE,
        metavar="DIR",
        help="where the exit records the forwarding rules it adds, so the next start removes what "
        f"a crashed one left (default {relay_exit.DEFAULT_EXIT_STATE})",
    )


async def _start_exit(
    args: argparse.Namespace, relay: Relay, app: web.Application, metrics
) -> "relay_exit.ExitRunner | None":
    """The exit, if --exit: up and its routes on the control API, or NtmError naming what failed."""
    if not args.exit:
        return None
    policy = ExitPolicy.parse(args.exit_allow)
    ex = relay_exit.RelayExit(policy, Caps(args.exit_rate, args.exit_max_bytes, args.exit_max_flows), [], relay.trust)
    runner = relay_exit.ExitRunner(ex, args.exit_tun, Path(args.exit_state), args.udp_host, args.exit_port)
    port = await runner.start()
    ex.advertise = args.exit_advertise or relay_exit.exit_advertise(relay.advertise, port)
    relay_exit.add_routes(app, ex)
    ex.metrics(metrics)
    if not policy.everyone and not policy.allowed:
        logging.warning("--exit without --exit-allow: no node may use the exit")
    logging.info(
        "exit %s on udp port %d (advertised %s), tun %s, allowed: %s",
        keys.checksum(ex.id),
        port,
        ", ".join(ex.advertise),
        ex.tun.name,
        policy.describe(),
    )
    return runner


async def serve(args: argparse.Namespace, stop: asyncio.Event) -> None:
    registry, dep = await connect_registry(args.rpc_url, args.deployment)
    follower: asyncio.Task | None = None
    try:
        trust = DcTrust()
        await trust.load(registry)
        follower = asyncio.create_task(trust.follow(registry, dep["block"]), name="dc-events")
        tls, pin = control_tls(args)
        sock = udp_socket(args.udp_host, args.udp_port)
        udp_port = sock.getsockname()[1]
        advertise = args.advertise or default_advertise(sock)
        guessed = not args.advertise and sock.getsockname()[0] in ("::", "0.0.0.0")
        if guessed:
            logging.warning(
                "no --advertise given: telling each DC the address it reached the control API at, "
                "else %s (guessed from routes)",
                ", ".join(advertise),
            )
        relay = Relay(
            RelayTable(max_paths=args.max_paths),
            trust,
            advertise,
            udp_port,
            chain_id=registry.chain_id,
            registry=registry.address,
            family=sock.family,
            capture=args.capture,
            advertise_guessed=guessed,
            clock=SYSTEM,
        )
        if args.capture:
            logging.warning("--capture %s: every forwarded datagram is written to disk (debug only)", args.capture)
        udp = RelayUdp(relay, sock, offload=not args.no_udp_offload)
        sweeper = asyncio.create_task(housekeeping(relay), name="housekeeping")
        app = make_app(relay, tuple(args.admin_allow or ()))
        exit_runner = await _start_exit(args, relay, app, app[METRICS])
        runner = web.AppRunner(
            app, access_log=None, keepalive_timeout=args.http_idle_timeout or service.HTTP_IDLE_TIMEOUT_S
        )
        stream_runner = web.AppRunner(make_stream_app(relay), access_log=None)
        await runner.setup()
        await stream_runner.setup()
        try:
            site = tlspin.TlsSockSite(
                runner,
                service.tcp_listener(args.http_host, args.http_port),
                ssl_context=tls,
                handshake_timeout=args.http_idle_timeout or service.HTTP_IDLE_TIMEOUT_S,
            )
            await site.start()
            http_port = site._server.sockets[0].getsockname()[1]
            http = _http_url("https" if tls else "http", args.http_host, http_port)
            if args.stream_port != "off":
                relay.streams_advertise = await _start_stream(stream_runner, args, advertise)
            ready = {
                "event": "ready",
                "udp_port": udp_port,
                "http": http,
                "pin": pin,
                "control": f"{http}#{pin}" if pin else http,
                "relay": advertise,
                "streams": relay.streams_advertise,
                "chain_id": registry.chain_id,
                "registry": keys.checksum(registry.address),
                "pid": os.getpid(),
            }
            if exit_runner is not None:
                ready["exit"] = {
                    "node": keys.checksum(exit_runner.exit.id),
                    "endpoints": exit_runner.exit.advertise,
                    "tun": exit_runner.exit.tun.name,
                }
            service.settle_heap()
            print(json.dumps(ready), flush=True)
            logging.info(
                "relay serving udp %s port %d (advertised %s), control %s",
                args.udp_host,
                udp_port,
                ", ".join(advertise),
                ready["control"],
            )
            await stop.wait()
        finally:
            logging.info("shutting down (%d paths)", len(relay.table.paths))
            sweeper.cancel()
            await relay.streams.close()
            await stream_runner.cleanup()
            await runner.cleanup()
            udp.close()
            relay.close()
            if exit_runner is not None:
                exit_runner.close()
    finally:
        if follower is not None:
            follower.cancel()
        await registry.close()


async def _start_stream(runner: web.AppRunner, args: argparse.Namespace, advertise: list[str]) -> list[str]:
    """Listen for streams (TLS if a certificate is given); returns the URLs to advertise."""
    tls = None
    if args.stream_tls_cert or args.stream_tls_key:
        if not (args.stream_tls_cert and args.stream_tls_key):
            raise NtmError("--stream-tls-cert and --stream-tls-key go together")
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            tls.load_cert_chain(args.stream_tls_cert, args.stream_tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise NtmError(f"cannot load the stream TLS certificate: {exc}") from None
    port = DEFAULT_STREAM_PORT if args.stream_port is None else args.stream_port
    try:
        sock = service.tcp_listener(args.stream_host or None, port)
    except OSError as exc:
        if args.stream_port is not None:
            raise NtmError(f"{exc.strerror or exc}: no stream listener (--stream-port PORT, or 'off')") from None
        logging.warning(
            "%s: no stream listener, so nodes without UDP cannot use this relay (run as root or "
            "give --stream-port PORT)",
            exc.strerror or exc,
        )
        return []
    await web.SockSite(runner, sock, ssl_context=tls).start()
    port = sock.getsockname()[1]
    urls = args.stream_advertise or stream_urls(advertise, port, tls is not None)
    logging.info("streams (TCP) on %s port %d: %s", args.stream_host or "every address", port, ", ".join(urls))
    return urls


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.print_pin:
        service.setup_logging(args.verbose)
        try:
            print(control_tls(args)[1])
        except NtmError as exc:
            print(f"ntm-rs: {exc}", file=sys.stderr)
            return startup.USAGE
        return 0
    if not (args.rpc_url and args.deployment):
        p.error("--rpc-url and --deployment are required (unless --print-pin)")
    startup.check_paths(p, args)
    service.setup_logging(args.verbose)
    return service.run("ntm-rs", lambda stop: serve(args, stop))


if __name__ == "__main__":
    sys.exit(main())
