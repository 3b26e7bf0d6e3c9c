"""Adapters of the Relay Server: the UDP socket around `RelayTable` and the HTTP control API.

HTTP (docs/PROTOCOL.md §8.2):
  POST /v1/relay-directions   DC-signed envelope of kind "relay-direction" → 200 {path, relay, ...}
  POST /v1/relay-direction-batches  one of kind "relay-directions" → 200 {outcomes: [{status, body}]}
  GET  /v1/paths/{path}       byte/packet counters of one path (never its token)
  GET  /v1/info, /healthz, /metrics (Prometheus text)
Every refusal is a JSON body {"error": code, "message": text} and changes nothing.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

from aiohttp import web

from daemon import channel, httpapp, service, udpgso
from daemon.metrics import CONTENT_TYPE, Metrics
from ntm import envelope, keys, messages
from ntm.addr import display, for_socket, format_endpoint, parse_endpoint
from ntm.clock import SYSTEM, Clock
from ntm.errors import ParseError, SignatureError
from rs.relay import PathError, RelayTable
from rs.stream import STREAM_PATH, StreamAddr, StreamHub
from rs.trust import DcTrust

log = logging.getLogger("ntm.rs")

# A Relay Direction is ~700 bytes; 16 KiB leaves room while a flood of big bodies cannot hurt.
MAX_BODY = 16 * 1024
Answer = tuple[int, dict]  # (HTTP status, JSON body): a booking, or its refusal ({"error", "message"})
Booker = Callable[["Relay", web.Request, object], Answer]
# Reads per event-loop wake-up before other work gets a turn: 64 reads of up to 64 KiB GRO runs
# is ≤ 4 MiB, about the socket's receive buffer, at which the loop still answers HTTP promptly.
RECV_BATCH = 64
# Sender addresses whose normalised form is remembered: the peers of ~2,000 busy paths; a dict of
# 4,096 short tuples is ~1 MB, and emptying it when full bounds what a spray of new sources costs.
ADDR_CACHE = 4096
# How often idle and expired paths are swept (they are also dropped lazily on their next packet).
HOUSEKEEPING_S = 5.0


def error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": code, "message": message}, status=status)


# ---------------------------------------------------------------------- addresses


def default_advertise(sock: socket.socket) -> list[str]:
    """Endpoints to tell DCs when --advertise is not given: the bound address, or for a wildcard
    bind the host's addresses on its default routes, else loopback."""
    host, port = sock.getsockname()[:2]
    if not ipaddress.ip_address(host).is_unspecified:
        return [format_endpoint(host, port)]
    versions = (4, 6) if sock.family == socket.AF_INET6 else (4,)
    found = [
        format_endpoint(ip, port)
        for ip in map(service.source_address, (service.ROUTE_PROBES[v] for v in versions))
        if ip is not None
    ]
    return found or [format_endpoint(lo, port) for lo in ("127.0.0.1", "::1")[: len(versions)]]


def seen_advertise(guessed: list[str], seen_host: str, udp_port: int, family: int) -> list[str]:
    """The endpoints to tell a DC that reached the control API at `seen_host` (the host of its
    URL, from the Host header) when no --advertise was given (§8.2 "Where the relay is"): that
    address with the relay's UDP port, in place of the guesses of its IP version; the guesses alone
    if it says nothing about where nodes reach us (a name, loopback, link-local, a version the
    UDP socket does not serve). Behind TLS pinned by the DC the address is one the DC verified
    reaches this relay, as it sees it (a host with a 1:1 NAT included, which the guess misses)."""
    try:
        ip = ipaddress.ip_address(seen_host.strip("[]"))
    except ValueError:
        return guessed
    if (
        ip.is_loopback
        or ip.is_link_local
        or ip.is_unspecified
        or ip.is_multicast
        or (ip.version == 6 and family != socket.AF_INET6)
    ):
        return guessed
    others = [e for e in guessed if ipaddress.ip_address(parse_endpoint(e)[0]).version != ip.version]
    return [format_endpoint(str(ip), udp_port), *others]


# ---------------------------------------------------------------------- relay state


@dataclass
class Relay:
    """Everything the handlers share: the table, the trust check, the advertised endpoints."""

    table: RelayTable
    trust: DcTrust
    advertise: list[str]
    udp_port: int
    streams_advertise: list[str] = field(default_factory=list)  # ws(s):// URLs of the stream listener
    chain_id: int = 0
    registry: bytes = b""
    family: int = socket.AF_INET6
    capture: Path | None = None
    advertise_guessed: bool = False  # no --advertise: each DC is told the address it reached us at
    guard: envelope.ReplayGuard = field(default_factory=envelope.ReplayGuard)
    clock: Clock = SYSTEM  # monotonic for the table and streams, wall ms for directions' freshness
    directions: dict = field(default_factory=lambda: {"accepted": 0, "refused": 0})
    refused: dict = field(default_factory=dict)
    udp_received: int = 0
    udp_runs: int = 0  # GRO runs received (each several datagrams in one read)
    udp_errors: int = 0
    udp: RelayUdp | None = None
    streams: StreamHub | None = None
    _capture_fh: object = None

    def __post_init__(self) -> None:
        self.streams = StreamHub(self.on_packet, self.clock)

    def on_packet(self, data: bytes, addr) -> None:
        """One tunnel packet from a UDP address or a stream: run the table, send what it answers."""
        out = self.table.on_datagram(data, addr, self.clock.now())
        for payload, dest in out:
            if payload is data:  # forwarded (not a bind answer)
                if self.capture is not None:
                    self.captured(data)
                if isinstance(addr, StreamAddr):
                    self.streams.forwarded(addr)
                if isinstance(dest, StreamAddr):
                    self.streams.forwarded(dest)
            self.send(payload, dest)
        if self.table.events:
            self.log_events()

    def on_run(self, run: bytes, seg: int, addr) -> None:
        """A GRO run from a UDP address (datagrams of `seg` bytes back to back): the table decides
        it as a run, each forwarded batch leaves in one GSO send (one by one to a stream)."""
        self.udp_runs += 1
        self.udp_received += -(-len(run) // seg)
        if self.capture is not None:  # debug aid: every datagram through on_packet, to be written
            for off in range(0, len(run), seg):
                self.on_packet(run[off : off + seg], addr)
            return
        for batch, size, dest in self.table.on_run(run, seg, addr, self.clock.now()):
            if isinstance(dest, StreamAddr):  # only forwarded packets go to a stream (acks go back)
                for off in range(0, len(batch), size):
                    self.streams.forwarded(dest)
                    self.streams.send(batch[off : off + size], dest)
            else:
                self.udp.send_run(batch, size, dest)
        if self.table.events:
            self.log_events()

    def send(self, payload: bytes, dest) -> None:
        if isinstance(dest, StreamAddr):
            self.streams.send(payload, dest)
            return
        try:
            self.udp.sendto(payload, dest)
        except OSError as exc:
            self.udp_errors += 1
            log.debug("send to %s failed: %s", display(dest), exc)

    def advertise_to(self, request: web.Request) -> list[str]:
        """The UDP endpoints to answer this DC's booking with (--advertise, else seen_advertise)."""
        if not self.advertise_guessed:
            return self.advertise
        return seen_advertise(self.advertise, urlsplit(f"//{request.host}").hostname or "", self.udp_port, self.family)

    def refuse(self, status: int, code: str, message: str) -> Answer:
        self.directions["refused"] += 1
        self.refused[code] = self.refused.get(code, 0) + 1
        log.info("relay direction refused (%s): %s", code, message)
        return status, {"error": code, "message": message}

    def log_events(self) -> None:
        """One line per path event; a path booked (every direction's fallback) and one released
        unbound (most of them: the direct path worked) only at debug: at 2,000 directions/s a line
        each was a tenth of the relay's CPU and ~40 GB of log a day (issue 30)."""
        for ev in self.table.pop_events():
            if ev.kind == "added":
                if log.isEnabledFor(logging.DEBUG):
                    p = self.table.paths.get(ev.path_id)
                    who = ", ".join(keys.checksum(n) for n in p.nodes) if p and p.nodes else "?"
                    log.debug("path %s added (nodes %s)", ev.path_id.hex(), who)
            elif ev.kind in ("bound", "moved"):
                where = str(ev.addr) if isinstance(ev.addr, StreamAddr) else display(ev.addr)
                log.info("path %s side %d %s %s", ev.path_id.hex(), ev.side, ev.kind, where)
            else:
                log.log(
                    logging.DEBUG if ev.reason == "unbound" else logging.INFO,
                    "path %s removed (%s)",
                    ev.path_id.hex(),
                    ev.reason,
                )

    def captured(self, data: bytes) -> None:
        """Debug aid (--capture): append each forwarded datagram as one hex line."""
        if self._capture_fh is None:
            self._capture_fh = open(self.capture, "a", buffering=1)
        self._capture_fh.write(data.hex() + "\n")

    def close(self) -> None:
        if self._capture_fh is not None:
            self._capture_fh.close()
            self._capture_fh = None


# ---------------------------------------------------------------------- HTTP


def relay_metrics(relay: Relay) -> Metrics:
    """The relay's /metrics: paths, forwarding, refusals."""
    m = Metrics("ntm_rs")
    t = relay.table
    m.gauge("paths", "relay paths booked and not expired", lambda: len(t.paths))
    m.gauge("paths_bound", "paths with both sides bound (carrying a tunnel)", t.bound_paths)
    m.gauge("trusted_dcs", "active DCs on chain (who may book paths)", lambda: len(relay.trust.active))
    m.counters(
        lambda: {
            "paths_added": t.paths_added,
            "binds": t.binds,
            "forwarded_packets": t.forwarded_packets,
            "forwarded_bytes": t.forwarded_bytes,
            "udp_received": relay.udp_received,
            "udp_gro_runs": relay.udp_runs,
            "udp_send_errors": relay.udp_errors,
            "directions_accepted": relay.directions["accepted"],
        },
        {
            "paths_added": "paths booked by DCs",
            "binds": "path sides bound by a node's first datagram",
            "forwarded_packets": "datagrams forwarded",
            "forwarded_bytes": "bytes forwarded",
            "udp_received": "datagrams received",
            "udp_gro_runs": "runs of datagrams received in one read (UDP GRO), decided and sent as one",
            "udp_send_errors": "datagrams the OS refused to send",
            "directions_accepted": "relay directions (bookings) accepted",
        },
    )
    m.gauge("streams", "open stream (TCP/WebSocket) connections", lambda: len(relay.streams.conns))
    m.counters(
        lambda: dict(relay.streams.counters),
        {"stream": "stream connections and packets, by event"},
        ("stream", "event"),
    )
    m.counters(lambda: dict(t.dropped), {"dropped": "datagrams dropped, by reason"}, ("dropped", "reason"))
    m.counters(lambda: dict(t.removed), {"paths_removed": "paths removed, by reason"}, ("paths_removed", "reason"))
    m.counters(
        lambda: dict(relay.refused),
        {"directions_refused": "relay directions refused, by reason"},
        ("directions_refused", "reason"),
    )
    return m


RELAY = web.AppKey("relay", Relay)
METRICS = web.AppKey("metrics", Metrics)
ROUTES = web.RouteTableDef()


@ROUTES.post("/v1/relay-directions")
async def handle_direction(request: web.Request) -> web.Response:
    return await answer_post(request, book)


@ROUTES.post(messages.RELAY_BATCH_PATH)
async def handle_directions(request: web.Request) -> web.Response:
    return await answer_post(request, book_batch)


async def answer_post(request: web.Request, booker: Booker) -> web.Response:
    """A DC's booking request over HTTP, answered by `booker` (book or book_batch)."""
    relay = request.app[RELAY]
    try:
        obj = await service.read_json(request)
    except web.HTTPRequestEntityTooLarge:
        status, body = relay.refuse(413, "too_large", f"request body exceeds {MAX_BODY} bytes")
    except ParseError as exc:
        status, body = relay.refuse(400, "malformed", str(exc))
    else:
        status, body = booker(relay, request, obj)
    return web.json_response(body, status=status)


@ROUTES.get(channel.PATH)
async def handle_channel(request: web.Request) -> web.WebSocketResponse:
    """A DC's kept WebSocket (§8.6, daemon/channel.py): its Relay Directions as frames, each
    answered as its POST (one Relay Direction, or a batch) would be."""
    relay = request.app[RELAY]

    async def answer(call: messages.ChannelCall) -> tuple[int, dict]:
        booker = BOOKERS.get(call.path)
        if booker is None:
            return 400, messages.encode(messages.ErrorBody("malformed", f"no call {call.path!r} at a relay"))
        return booker(relay, request, call.body)

    return await channel.serve(request, answer, MAX_BODY)


def checked(relay: Relay, obj: object, kind: str, then: Callable[[bytes, Any], Answer]) -> Answer:
    """A DC's booking envelope of `kind` checked in §8.2's order, its body decoded, then
    `then(its signer, its body)`; or the refusal, and nothing booked."""
    now_ms = relay.clock.wall_ms()
    try:
        # Kind, signature and freshness first; then the signer against the DCs the relay knows
        # from chain events (no chain call); the nonce is remembered only for trusted envelopes.
        env = envelope.open_envelope(obj, kind, now_ms, lambda _a: True, None)
    except ParseError as exc:
        return relay.refuse(400, "malformed", str(exc))
    except SignatureError as exc:
        return relay.refuse(403, "forbidden", str(exc))
    if not relay.trust.is_active(env.sender):
        return relay.refuse(403, "untrusted_dc", f"{keys.checksum(env.sender)} is not an active DC on chain")
    try:
        relay.guard.check_and_add(env, now_ms)
    except SignatureError as exc:
        return relay.refuse(403, "replayed", str(exc))
    try:
        body = envelope.body_of(env, messages.BODY_OF[kind])
    except ParseError as exc:
        return relay.refuse(400, "malformed", str(exc))
    return then(env.sender, body)


def book(relay: Relay, request: web.Request, obj: object) -> Answer:
    """A DC's Relay Direction (parsed JSON): (status, the booking or the refusal). `request`: the
    one it came on (its Host: the address the DC reached us at)."""
    return checked(
        relay, obj, messages.RELAY_DIRECTION, lambda dc, d: add_path(relay, dc, d, relay.advertise_to(request))
    )


def book_batch(relay: Relay, request: web.Request, obj: object) -> Answer:
    """Several Relay Directions in one DC-signed envelope (§8.2 "Batches"): the envelope is checked
    once (a refusal refuses the whole batch and books nothing), then each direction is booked or
    refused on its own, as its own request would be."""

    def each(dc: bytes, batch: messages.RelayDirections) -> Answer:
        advertise = relay.advertise_to(request)
        outcomes = [messages.RelayOutcome(*add_path(relay, dc, d, advertise)) for d in batch.directions]
        return 200, messages.encode(messages.RelayOutcomes(outcomes))

    return checked(relay, obj, messages.RELAY_DIRECTIONS, each)


def add_path(relay: Relay, owner: bytes, d: messages.RelayDirection, advertise: list[str]) -> Answer:
    """Book DC `owner`'s checked Relay Direction `d`: (200, RelayBooking) or the refusal."""
    now_ms, now = relay.clock.wall_ms(), relay.clock.now()
    if d.expires_ms <= now_ms:
        return relay.refuse(400, "malformed", "malformed relay direction: expires_ms is in the past")
    try:
        path, created = relay.table.add_path(
            bytes.fromhex(d.path),
            bytes.fromhex(d.token),
            now + (d.expires_ms - now_ms) / 1000,
            d.max_bytes,
            now,
            owner=owner,
            nodes=tuple(keys.parse_node_id(n) for n in d.nodes),
        )
    except PathError as exc:
        return relay.refuse(*exc.refusal(), str(exc))
    relay.directions["accepted"] += 1
    relay.log_events()
    booking = messages.RelayBooking(
        path.path_id.hex(),
        advertise,
        created,
        now_ms + int((path.expires_at - now) * 1000),
        path.max_bytes,
        relay.streams_advertise,
    )
    return 200, messages.encode(booking)


BOOKERS: dict[str, Booker] = {"/v1/relay-directions": book, messages.RELAY_BATCH_PATH: book_batch}


@ROUTES.get("/v1/paths/{path}")
@service.admin_only
async def handle_path(request: web.Request) -> web.Response:
    relay = request.app[RELAY]
    try:
        path_id = bytes.fromhex(request.match_info["path"])
    except ValueError:
        return error(400, "malformed", "path must be hex")
    path = relay.table.paths.get(path_id)
    if path is None:
        return error(404, "unknown_path", f"no path {path_id.hex()}")
    return web.json_response(path.stats())


@ROUTES.get("/v1/info")
async def handle_info(request: web.Request) -> web.Response:
    relay = request.app[RELAY]
    return web.json_response(
        {
            "relay": relay.advertise,
            "udp_port": relay.udp_port,
            "streams": relay.streams_advertise,
            "paths": len(relay.table.paths),
            "max_paths": relay.table.max_paths,
            "idle_s": relay.table.idle_s,
            "chain_id": relay.chain_id,
            "registry": keys.checksum(relay.registry) if relay.registry else None,
        }
    )


@ROUTES.get("/healthz")
async def handle_health(request: web.Request) -> web.Response:
    relay = request.app[RELAY]
    return web.json_response({"ok": True, "paths": len(relay.table.paths)})


@ROUTES.get("/metrics")
@service.admin_only
async def handle_metrics(request: web.Request) -> web.Response:
    return web.Response(body=request.app[METRICS].render(), headers={"Content-Type": CONTENT_TYPE})


def make_stream_app(relay: Relay) -> web.Application:
    """The public stream listener (§8.4): only GET /v1/stream, nothing of the control API."""
    app = httpapp.make_app(MAX_BODY)
    app.router.add_get(STREAM_PATH, relay.streams.handle)
    return app


def stream_urls(advertise: list[str], port: int, tls: bool) -> list[str]:
    """The stream listener's URLs for the hosts of the advertised UDP endpoints."""
    scheme = "wss" if tls else "ws"
    hosts = [parse_endpoint(e)[0] for e in advertise]
    return [f"{scheme}://{format_endpoint(h, port)}{STREAM_PATH}" for h in dict.fromkeys(hosts)]


def make_app(relay: Relay, admin_allow: tuple = ()) -> web.Application:
    """`admin_allow`: networks that may read /metrics and /v1/paths (empty: loopback only)."""
    app = httpapp.make_app(MAX_BODY)
    app[RELAY] = relay
    app[METRICS] = relay_metrics(relay)
    app[service.ADMIN_ALLOW] = tuple(admin_allow)
    app.add_routes(ROUTES)
    channel.enable(app)
    return app


# ---------------------------------------------------------------------- UDP


class RelayUdp:
    """The relay's UDP socket, read from the event loop up to RECV_BATCH times per wake-up. With
    `offload` and a kernel that has UDP GRO/GSO, a run of datagrams from one sender arrives in one
    read, is decided by the table as a run, and leaves in one GSO send per destination; without,
    each datagram is read, decided and sent on its own (the same verdicts)."""

    def __init__(self, relay: Relay, sock: socket.socket, offload: bool = True) -> None:
        self.relay = relay
        self.sock = sock
        sock.setblocking(False)
        self.gro = offload and udpgso.enable_gro(sock)
        self.gso = self.gro  # until the kernel refuses a GSO send
        self._view = memoryview(bytearray(udpgso.RECV_BUFFER))
        self._addrs: dict[tuple, tuple] = {}  # raw source address → for_socket's form
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(sock.fileno(), self._readable)
        relay.udp = self

    def sendto(self, payload: bytes, dest) -> None:
        self.sock.sendto(payload, dest)

    def send_run(self, run: bytes, seg: int, dest) -> None:
        """Datagrams of `seg` bytes back to back (the last may be shorter): one GSO send, else
        one send each (no GSO here, or longer than the route's MTU allows in one piece)."""
        if self.gso and len(run) > seg:
            try:
                udpgso.send_gso(self.sock, [run], seg, dest)
                return
            except OSError as exc:
                if exc.errno in udpgso.NO_GSO_ERRNOS:
                    self.gso = False
                    log.info("no UDP GSO towards %s (%s): sending one datagram at a time", display(dest), exc)
                elif exc.errno != errno.EMSGSIZE:
                    self.relay.udp_errors += -(-len(run) // seg)  # each datagram of the run was refused
                    return
        for off in range(0, len(run), seg):
            self.relay.send(run[off : off + seg], dest)

    def _readable(self) -> None:
        relay, view = self.relay, self._view
        for _ in range(RECV_BATCH):
            try:
                n, anc, _flags, addr = self.sock.recvmsg_into([view], udpgso.GRO_CMSG_SPACE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # ICMP unreachable from a departed peer: not fatal for a relay
                relay.udp_errors += 1
                log.debug("udp error: %s", exc)
                return
            seg, addr = udpgso.gro_segment(anc), self._addr(addr)
            if 0 < seg < n:
                relay.on_run(bytes(view[:n]), seg, addr)
            else:
                relay.udp_received += 1
                relay.on_packet(bytes(view[:n]), addr)

    def _addr(self, raw: tuple) -> tuple:
        """The table's form of a sender's address (for_socket), remembered: parsing it costs more
        than the rest of a datagram's decision. Emptied when full, so a spray from ever new source
        addresses costs one parse each, as without it, and bounded memory."""
        addr = self._addrs.get(raw)
        if addr is None:
            if len(self._addrs) >= ADDR_CACHE:
                self._addrs.clear()
            addr = self._addrs[raw] = for_socket(raw, self.relay.family)
        return addr

    def close(self) -> None:
        if self.sock.fileno() >= 0:
            self._loop.remove_reader(self.sock.fileno())
            self.sock.close()


async def housekeeping(relay: Relay) -> None:
    while True:
        await asyncio.sleep(HOUSEKEEPING_S)
        relay.table.expire(relay.clock.now())
        relay.streams.expire()
        relay.log_events()
