"""`ntm-rs --exit`: the relay as exit for ordinary servers (docs/PROTOCOL.md §10.13).

A tunnel responder with the exit's own key on its own UDP port, one Session (ntm/tunnel.py) per
booked path, and a TUN interface (daemon/tun.py) whose traffic the host masquerades
(daemon/forwarding.py): a booked node's inner packets leave with the relay's address, the
servers' answers come back into TUN and go to that node. The decisions (who, how much, which
inner sources) are rs/exit_policy.py's and ntm/overlay.py's; this module moves bytes.

HTTP (on the relay's control API):
  POST /v1/exit-bookings   DC-signed envelope of kind "exit-booking" → 200 ExitGrant
  GET  /v1/exit            booked nodes and counters (operator networks only)
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import coincurve
from aiohttp import web

from daemon import service
from daemon.forwarding import Forwarding, forwarding_rules
from daemon.metrics import Metrics
from daemon.tun import Tun
from ntm import envelope, keys, messages
from ntm.clock import SYSTEM, Clock
from ntm.addr import Addr, for_socket, format_endpoint, parse_endpoint
from ntm.errors import NtmError, ParseError, SignatureError
from ntm.overlay import KIND_IPV4, KIND_IPV6, kind_of
from ntm.routes import EXIT_ROUTES, sign_offer
from ntm.tunnel import Data, Session, TunnelConfig, TunnelError
from ntm.vaddr import V6_PREFIX, AddressError, tun_mtu, v6_of
from rs.exit_policy import EXIT_V4_NET, Caps, ExitPolicy, ExitRefused, ExitTable, exit_overlay
from rs.trust import DcTrust

log = logging.getLogger("ntm.rs.exit")

DEFAULT_EXIT_PORT = 4341  # next to the relay's 4340
DEFAULT_EXIT_TUN = "ntmx0"
DEFAULT_EXIT_STATE = "/var/lib/ntm-rs"
#: The iptables comment on the exit's rules, so an operator can tell them apart.
EXIT_COMMENT = "ntm-relay-exit"
#: How often the sessions' timers run: the exit only answers handshakes, so its timers are
#: keepalives (25 s), its own rekeys (130 s, retransmitted every 1 s) and key expiry; a finer
#: grain would cost every booked session a poll more often for nothing.
TICK_S = 1.0
#: Expired bookings are swept every this many ticks (5 s; a booking lasts an hour).
SWEEP_TICKS = 5
#: Datagrams read per wake-up of the exit's socket (asyncio's datagram transport reads one per
#: wake-up): a TCP window's burst costs one event-loop turn per 64 packets, and the TUN gets its turn.
RECV_BATCH = 64
MAX_DATAGRAM = 65535


@dataclass
class ExitCounters:
    """What the exit carried (its drops are counted by reason in RelayExit.dropped)."""

    forwarded_out: int = 0  # packets from nodes written to TUN
    forwarded_in: int = 0  # packets from TUN sent to nodes
    bookings: int = 0


class RelayExit:
    """The exit's state: key, bookings, sessions, the overlay rules, TUN and UDP."""

    def __init__(
        self,
        policy: ExitPolicy,
        caps: Caps,
        advertise: list[str],
        trust: DcTrust,
        key: coincurve.PrivateKey | None = None,
        clock: Clock = SYSTEM,
    ) -> None:
        self.key = key or keys.generate()
        self.id = keys.node_id_of(self.key)
        self.pub = keys.public_bytes(self.key)
        self.table = ExitTable(policy, caps)
        self.overlay = exit_overlay(self.id)
        self.advertise = advertise
        self.trust = trust
        self.clock = clock
        self.offer = sign_offer(self.key, [], True, clock.wall_ms())
        self.sessions: dict[bytes, Session] = {}
        self.current: dict[bytes, bytes] = {}  # node → the path it last sent on (where answers go)
        self.guard = envelope.ReplayGuard()
        self.dropped: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()
        self.counters = ExitCounters()
        self.udp: socket.socket | None = None  # non-blocking: a full buffer loses the datagram (send_error)
        self.family = 0
        self.tun: Tun | None = None
        self.config = TunnelConfig()

    # --- bookings -------------------------------------------------------------------------------
    def book(self, obj: object) -> tuple[int, dict]:
        """One Exit Booking envelope: (HTTP status, JSON body). Refusals change nothing."""
        now_ms = self.clock.wall_ms()
        try:
            env = envelope.open_envelope(obj, messages.EXIT_BOOKING, now_ms, lambda _a: True, None)
            if not self.trust.is_active(env.sender):
                raise ExitRefused("untrusted_dc", f"{keys.checksum(env.sender)} is not an active DC on chain")
            try:
                self.guard.check_and_add(env, now_ms)
            except SignatureError as exc:
                raise ExitRefused("replayed", str(exc)) from None
            b = envelope.body_of(env, messages.ExitBooking)
            booked, created, evicted = self.table.book(b, now_ms, self.clock.now())
            self.overlay.addresses(booked.node)  # its inner IPv4 in the exit's view, for as long as it runs
        except AddressError as exc:  # the exit's IPv4 view is full (65,533 nodes since it started)
            return self._refuse(ExitRefused("full", str(exc)))
        except (ParseError, SignatureError, ExitRefused) as exc:
            return self._refuse(exc)
        path = bytes.fromhex(b.path)
        for old in evicted:
            self.sessions.pop(old, None)
        if created:
            s = Session(self.key, booked.node, booked.pubkey, path, role="wait", config=self.config)
            s.start(self.clock.now())
            self.sessions[path] = s
            self.counters.bookings += 1
            log.info(
                "exit booked for %s on path %s by DC %s",
                keys.checksum(booked.node),
                path.hex(),
                keys.checksum(env.sender),
            )
        caps = booked.meter.caps
        grant = messages.ExitGrant(
            b.path,
            self.advertise,
            keys.checksum(self.id),
            self.pub.hex(),
            self.offer,
            now_ms + int((booked.expires_at - self.clock.now()) * 1000),
            caps.max_bytes - booked.meter.used,
            caps.rate_bps,
            caps.max_flows,
        )
        return 200, messages.encode(grant)

    def _refuse(self, exc: NtmError) -> tuple[int, dict]:
        status, code = exc.refusal()
        self.refused[code] += 1
        log.info("exit booking refused (%s): %s", code, exc)
        return status, {"error": code, "message": str(exc)}

    def expire(self) -> None:
        for path in self.table.expire(self.clock.now()):
            self.sessions.pop(path, None)
        for node in [n for n in self.current if n not in self.table.nodes]:
            del self.current[node]

    # --- packets ----------------------------------------------------------------------------------
    def on_datagram(self, data: bytes, addr: Addr) -> None:
        """A tunnel datagram from a node: handshakes answered, DATA through the caps and the
        overlay's rules into TUN."""
        s = self.sessions.get(bytes(data[1:9]))
        if s is None:
            self.dropped["unknown_path"] += 1
            return
        now = self.clock.now()
        events = s.receive(data, addr, now)
        self._flush(s)
        for ev in events:
            if isinstance(ev, Data):
                self._from_node(s, ev.payload, now)

    def _from_node(self, s: Session, payload: bytes, now: float) -> None:
        node = s.peer_id
        booked = self.table.nodes.get(node)
        if booked is None:
            self.dropped["expired"] += 1
            return
        self.current[node] = s.path_id
        if kind_of(payload) not in (KIND_IPV4, KIND_IPV6):
            self.dropped["not_ip"] += 1
            return
        pkt = self.overlay.inbound(node, payload)
        if pkt is None or self.tun is None:
            return  # counted by the overlay (rx_spoofed_source, rx_wrong_destination, rx_malformed)
        why = booked.meter.charge(pkt, now)  # what passed the source rule costs the node
        if why is not None:
            self.dropped[why] += 1
            return
        self.counters.forwarded_out += 1
        self.tun.write(pkt)

    def from_tun(self, pkt: bytes) -> None:
        """A server's answer the kernel routed into TUN: to the node whose inner address it names."""
        node = self.overlay.outbound(pkt)
        booked = self.table.nodes.get(node) if node is not None else None
        s = self.sessions.get(self.current.get(node, b"")) if booked is not None else None
        if s is None or s.peer_addr is None:
            self.dropped["no_node"] += 1
            return
        now = self.clock.now()
        why = booked.meter.charge(pkt, now, outbound=False)
        if why is not None:
            self.dropped[why] += 1
            return
        try:
            dg = s.encrypt(pkt, now)
        except TunnelError:
            self.dropped["no_keys"] += 1
            return
        self._flush(s)
        self.counters.forwarded_in += 1
        self._send(dg, s.peer_addr)

    def _flush(self, s: Session) -> None:
        for dg, dest in s.datagrams_to_send():
            self._send(dg, dest)

    def _send(self, dg: bytes, dest: Addr) -> None:
        try:
            self.udp.sendto(dg, dest)
        except (OSError, AttributeError):
            self.dropped["send_error"] += 1

    def tick(self) -> None:
        now = self.clock.now()
        for s in list(self.sessions.values()):
            for dg, dest in s.poll(now):
                self._send(dg, dest)

    # --- status -----------------------------------------------------------------------------------
    def status(self) -> dict:
        ov = self.overlay.stats
        return {
            "exit_node": keys.checksum(self.id),
            "exit": self.advertise,
            "nodes": len(self.table.nodes),
            "paths": len(self.sessions),
            "policy": self.table.policy.describe(),
            "forwarded_out": self.counters.forwarded_out,
            "forwarded_in": self.counters.forwarded_in,
            "bookings": self.counters.bookings,
            "refused": dict(self.refused),
            "dropped": {
                **self.dropped,
                "spoofed_source": ov["rx_spoofed_source"],
                "wrong_destination": ov["rx_wrong_destination"],
                "malformed": ov["rx_malformed"],
            },
            "booked": {
                keys.checksum(n): {
                    "inner_v4": str(self.overlay.book.by_peer.get(n, "")),
                    "used_bytes": b.meter.used,
                    "flows": len(b.meter.flows),
                }
                for n, b in self.table.nodes.items()
            },
        }

    def metrics(self, m: Metrics) -> None:
        """The exit's counters on the relay's /metrics."""
        m.gauge("exit_nodes", "nodes booked at the exit", lambda: len(self.table.nodes))
        m.counters(
            lambda: {
                "exit_forwarded_out": self.counters.forwarded_out,
                "exit_forwarded_in": self.counters.forwarded_in,
                "exit_bookings": self.counters.bookings,
            },
            {
                "exit_forwarded_out": "packets from nodes sent on to servers",
                "exit_forwarded_in": "packets from servers sent to nodes",
                "exit_bookings": "exit paths booked by DCs",
            },
        )
        m.counters(
            lambda: self.status()["dropped"],
            {"exit_dropped": "exit packets dropped, by reason"},
            ("exit_dropped", "reason"),
        )
        m.counters(
            lambda: dict(self.refused), {"exit_refused": "exit bookings refused, by reason"}, ("exit_refused", "reason")
        )


EXIT = web.AppKey("exit", RelayExit)


async def handle_booking(request: web.Request) -> web.Response:
    try:
        obj = await service.read_json(request)
    except web.HTTPRequestEntityTooLarge:
        return web.json_response({"error": "too_large", "message": "request body too large"}, status=413)
    except ParseError as exc:
        return web.json_response({"error": "malformed", "message": str(exc)}, status=400)
    status, body = request.app[EXIT].book(obj)
    return web.json_response(body, status=status)


@service.admin_only
async def handle_status(request: web.Request) -> web.Response:
    return web.json_response(request.app[EXIT].status())


def add_routes(app: web.Application, exit: RelayExit) -> None:
    app[EXIT] = exit
    app.router.add_post("/v1/exit-bookings", handle_booking)
    app.router.add_get("/v1/exit", handle_status)


def exit_advertise(relay_advertise: list[str], port: int) -> list[str]:
    """The exit's endpoints: the relay's advertised hosts with the exit's port."""
    return list(dict.fromkeys(format_endpoint(parse_endpoint(e)[0], port) for e in relay_advertise))


class ExitRunner:
    """The exit's kernel side and loops: TUN, forwarding rules (recorded first), UDP, timers."""

    def __init__(self, exit: RelayExit, tun_name: str, state: Path, udp_host: str, udp_port: int) -> None:
        self.exit, self.tun_name, self.udp_host, self.udp_port = exit, tun_name, udp_host, udp_port
        self.forwarding = Forwarding(state)
        self.sock: socket.socket | None = None
        self.ticker: asyncio.Task | None = None

    async def start(self) -> int:
        """Set everything up (NtmError naming what failed, with nothing left behind); the UDP port."""
        ex = self.exit
        try:
            self.forwarding.base.mkdir(parents=True, exist_ok=True)
            self.forwarding.recover()
            ex.tun = Tun.open(
                self.tun_name, tun_mtu(), v6_of(ex.id), V6_PREFIX, ex.overlay.book.own, EXIT_V4_NET, offload=False
            )
            self.forwarding.apply(forwarding_rules(ex.tun.name, EXIT_V4_NET, list(EXIT_ROUTES), EXIT_COMMENT), {4, 6})
            self.sock = service.udp_socket(self.udp_host, self.udp_port, service.SOCKET_BUFFER)
        except (OSError, NtmError) as exc:
            self.close()
            raise NtmError(f"cannot run the exit (--exit needs root: TUN, forwarding, masquerade): {exc}") from None
        self.sock.setblocking(False)
        ex.udp, ex.family = self.sock, self.sock.family
        asyncio.get_running_loop().add_reader(self.sock.fileno(), self._readable)
        ex.tun.start(ex.from_tun, lambda: None)
        self.ticker = asyncio.create_task(self._tick(), name="exit-timers")
        return self.sock.getsockname()[1]

    def _readable(self) -> None:
        recv, ex = self.sock.recvfrom, self.exit
        for _ in range(RECV_BATCH):
            try:
                data, addr = recv(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # an ICMP error for an earlier send (a node that left): not fatal
                ex.dropped["udp_error"] += 1
                continue
            ex.on_datagram(data, for_socket(addr, ex.family))

    async def _tick(self) -> None:
        n = 0
        while True:
            await asyncio.sleep(TICK_S)
            self.exit.tick()
            n += 1
            if n % SWEEP_TICKS == 0:
                self.exit.expire()

    def close(self) -> None:
        if self.ticker is not None:
            self.ticker.cancel()
        if self.sock is not None:
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None
        if self.exit.tun is not None:
            self.exit.tun.close()
            self.exit.tun = None
        self.forwarding.remove()
