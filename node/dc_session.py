"""The node's session with its DC: authenticate, keep the NAT mapping open, learn where we are,
ask for directions, and keep the session alive across moves and DC failures (§5, §8.3).

  * keepalives go from the tunnel socket (so the DC sees the mapping peers will use) to the DC's
    two UDP ports; their replies tell us our public address;
  * the session is re-opened with backoff when it drops or when the replies show a new public
    address (the node moved; its old TCP connection is dead even if nobody said so);
  * when the home DC stays unreachable, the node signs a newer Node Transaction naming another
    DC from the list it keeps (`GET /v1/dcs`), registers there and opens its session there.

Route Directions pushed by the DC (peers' requests) go to `on_direction`, whose answer (follow or
refuse) goes back to the DC at once; our own requests' directions come in their one reply
(`direction`); an address change goes to `on_moved`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import logging
import socket
from typing import Awaitable, Callable
from urllib.parse import urlsplit

import aiohttp
import coincurve

from daemon import tlspin
from daemon.service import ROUTE_PROBES, BackgroundTasks, LogLimiter, source_address
from node import liveness
from node.dc_client import DcClient, DcError
from node.endpoint import Endpoint
from ntm import keepalive, keys, messages, record
from ntm.addr import format_endpoint, parse_endpoint
from ntm.clock import Clock
from ntm.errors import CodedError, ParseError
from ntm.registration import RegistrationRequest

log = logging.getLogger("ntm.node")

# How long a Direction Request may take: the DCs answer in milliseconds; a dead peer DC takes
# the federation timeout (3 s) to be declared unreachable.
DIRECTION_TIMEOUT_S = 8.0
# A DC that answers catching_up (it restarted and is reading the registry: seconds at 100k
# records, less from its snapshot) is asked again this often: a few asks per second cost it little.
CATCHING_UP_RETRY_S = 0.5
# The first keepalives of a session go out quickly: the first may race the NAT's mapping setup,
# and the DC must know our public address before it can direct anyone to us. They go on, spaced
# out, until the DC answers: on an uplink losing 20% each way a round trip fails 36% of the time,
# so three rounds all failed once in 20 sessions; six (at 0, 0.1, 0.4, 1, 2, 3.5 s) fail once in 500.
QUICK_KEEPALIVES_S = (0.0, 0.1, 0.3, 0.6, 1.0, 1.5)
# How long a new session waits for the DC to report our public address. Without an answer by
# then the network lets no UDP out (or not to the DC): the session comes up anyway and tunnels
# reach relays over TCP (§8.4) while the quick keepalives, then the periodic ones, go on probing
# UDP (a late reply moves the tunnels to UDP). Five rounds have gone out by then.
UDP_PROBE_TIMEOUT_S = 2.0
# One session attempt (TCP + challenge + welcome) may take this long before it counts as failed.
SESSION_OPEN_TIMEOUT_S = 3.0
# A direction signed by a DC missing from our list of active DCs makes us re-read the list (a DC
# admitted since we last read it) at most this often: forged directions cost our DC one GET per 30 s.
DC_LIST_REFRESH_S = 30.0
# A keepalive reply showing a new public address is believed once the DC confirms it on the
# session reopened from here (§5): a DC answers a status in one round trip; 1 s is a slow link's.
MOVE_CONFIRM_TIMEOUT_S = 1.0


class NodeError(CodedError):
    """A connection the node could not make; `code` is the DC's reason when it gave one."""


class DcSilent(NodeError):
    """A session attempt the DC did not answer at all (its link or host is gone, not refusing)."""


class DcSession:
    def __init__(
        self,
        key: coincurve.PrivateKey,
        dc_url: str,
        endpoint: Endpoint,
        clock: Clock,
        keepalive_interval: float,
        local_addrs: list[str] | None,
        on_direction: Callable[[messages.SignedEnvelope], Awaitable[messages.DirectionAck | None]],
        on_moved: Callable[[], None],
        on_notice: Callable[[messages.CsNotice], None] = lambda notice: None,
        dc_pin: bytes | None = None,
    ) -> None:
        """`dc_pin`: the DC's on-chain address; an https:// DC must present a certificate bound to
        it (§5, DcClient), and a DC failed over to is pinned to its address on the DC list."""
        self.key = key
        self.id = keys.node_id_of(key)
        self.endpoint = endpoint
        self.clock = clock
        self.keepalive_interval = keepalive_interval
        self.fixed_local_addrs = local_addrs  # given by the caller: announced as is, never recomputed
        self.route_offer: messages.RouteOffer | None = None  # announced with every session (§10.10)
        self.on_direction = on_direction
        self.on_moved = on_moved
        self.on_notice = on_notice
        self._set_dc(dc_url, dc_pin)
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.keepalive_ports: list[int] = []
        self.token = b""
        self.observed: str | None = None
        self.observed_alt: str | None = None  # as the DC's second keepalive port sees us (NAT kind)
        self.udp: bool | None = None  # do keepalive replies reach us? None: not probed yet
        self.chain: tuple[int, str] | None = None  # (chain id, registry) of the DC we registered at
        self.dc_address: bytes | None = None  # the current DC's chain address (its URL may be a name)
        self.known_dcs: list[messages.DcEntry] = []  # from GET /v1/dcs while healthy: where to go if our DC dies
        self._dcs_read_at = float("-inf")  # when known_dcs was last read (monotonic)
        self.home: dict | None = None  # set by a failover: the new registration, for the CLI's state
        self.last_timestamp = 0  # of our newest record: a failover's record must be newer
        self.counters = {
            "sessions": 0,
            "session_drops": 0,
            "dc_silences": 0,
            "failovers": 0,
            "address_changes": 0,
            "refused_replies": 0,
        }
        self._seq = itertools.count(clock.wall_ms())  # keepalive seq is on the wire: grows across restarts
        self._last_reply_seq = 0
        self._last_sent_seq = 0  # a reply for a later seq answers nothing we sent: refused
        self._status: asyncio.Future[messages.StatusReply] | None = None  # our status query, answered
        self._confirming: asyncio.Task | None = None  # a new public address being confirmed
        self._restarted_for: str | None = None  # a new address the session was reopened for, unconfirmed
        self._bad_replies = LogLimiter(log, "keepalive replies", 10.0, clock)
        self._last_reply_at = clock.now()
        self._req_ids = itertools.count(1)
        self._results: dict[int, asyncio.Future[messages.DirectionResult]] = {}
        self.tasks = BackgroundTasks()
        self._reader: asyncio.Task | None = None
        self._observed_event = asyncio.Event()
        self._session_up = asyncio.Event()
        self._closing = False

    async def start(self) -> None:
        """First session (errors propagate), then the loops that keep it alive."""
        await self._open_session()
        await self._learn_federation()
        self.tasks.spawn(self._session_loop())
        self.tasks.spawn(self._keepalive_loop())

    async def close(self) -> None:
        self._closing = True
        await self.tasks.cancel(self._reader)
        if self.ws is not None:
            try:
                await asyncio.wait_for(self.ws.close(), 1.0)  # the DC may be gone
            except (asyncio.TimeoutError, OSError, aiohttp.ClientError):
                pass
        await self.dc.close()

    # --- the session --------------------------------------------------------------------------
    def _set_dc(self, dc_url: str, pin: bytes | None = None) -> None:
        self.dc_url = dc_url
        self.dc = DcClient(dc_url, pin=pin)
        self.dc_host = urlsplit(dc_url).hostname
        self.dc_ip = self.dc_host

    def local_addrs(self) -> list[str]:
        """The tunnel socket's addresses to announce: what the caller fixed, or the bound address,
        or (wildcard socket) our address towards the DC plus one per other reachable family."""
        if self.fixed_local_addrs:
            return list(self.fixed_local_addrs)
        host, port = self.endpoint.local_addr[:2]
        if host not in ("::", "0.0.0.0"):
            return [format_endpoint(host, port)]
        families = (4, 6) if self.endpoint.family == socket.AF_INET6 else (4,)
        return local_addrs_towards(self.dc_host, port, families)

    async def _open_session(self) -> None:
        """One session attempt at the current DC: authenticate, learn the keepalive token, and wait
        until the DC has seen our public address (it cannot direct anyone to us before)."""
        try:
            ws, welcome = await asyncio.wait_for(
                self.dc.open_session(self.key, self.local_addrs(), liveness.SESSION_HEARTBEAT_S, self.route_offer),
                SESSION_OPEN_TIMEOUT_S,
            )
        except asyncio.TimeoutError:
            raise DcSilent("dc_silent", f"{self.dc_url} did not answer within {SESSION_OPEN_TIMEOUT_S:g} s") from None
        self.ws = ws
        self.dc_address = self.dc.session_dc  # the DC we proved our key to: it pushes our directions
        peer = ws.get_extra_info("peername")
        # Keepalives go to the address this session reached (a DC name may have several, of
        # both families: the one that answered is the one our network can reach).
        self.dc_ip = peer[0] if peer else self.dc_host
        self.token = bytes.fromhex(welcome.token)
        self.keepalive_ports = list(welcome.keepalive_ports)
        # Only a reply under this session's token counts: one to the old session's keepalives,
        # arriving while this one opened, says nothing of what the DC knows of it now.
        self._observed_event.clear()
        self.endpoint.on_control = self._on_control
        self._reader = asyncio.create_task(self._read_session(ws))
        self._last_reply_at = self.clock.now()
        quick = self.tasks.spawn(self._quick_keepalives())
        try:
            await asyncio.wait_for(self._observed_event.wait(), UDP_PROBE_TIMEOUT_S)
        except asyncio.TimeoutError:  # the quick keepalives go on: a late reply still means UDP
            if self.udp is not False:
                log.warning(
                    "no keepalive reply from %s within %.1f s: UDP looks blocked here; tunnels go "
                    "through relays over TCP until it works",
                    self.dc_url,
                    UDP_PROBE_TIMEOUT_S,
                )
            self.udp = False
        except BaseException:
            quick.cancel()
            raise
        self.counters["sessions"] += 1
        self._session_up.set()

    async def _learn_federation(self) -> None:
        """Remember our chain and the active DCs, for failover. Best effort while healthy."""
        try:
            info = await self.dc.info()
            self.chain = (info.chain_id, info.registry)
            self.dc_address = keys.parse_node_id(info.dc)
            await self._read_dcs()
            self._dcs_read_at = self.clock.now()
        except DcError as exc:
            log.info("could not refresh the DC list from %s: %s", self.dc_url, exc)

    async def _read_dcs(self) -> None:
        """The active DCs (failover, who may direct us), each also a known host: the chain address
        its certificate must be bound to, for any client of ours naming none (the GMS, §5)."""
        self.known_dcs = await self.dc.dcs()
        for d in self.known_dcs:
            if d.endpoint:
                tlspin.expect(d.endpoint, keys.parse_node_id(d.dc))

    async def _session_loop(self) -> None:
        """Keep a session open: wait for the current one to end, then reconnect with backoff;
        move to another DC once liveness.should_fail_over gives the home DC up (it refused
        several attempts, or went silent: a missed heartbeat, then an unanswered attempt)."""
        failures = silences = 0
        while not self._closing:
            if self._reader is not None:
                ws = self.ws
                await asyncio.gather(self._reader, return_exceptions=True)
                self._reader = None
                self._session_up.clear()
                self.counters["session_drops"] += 1
                silences = int(ws is not None and isinstance(ws.exception(), aiohttp.ServerTimeoutError))
                self.counters["dc_silences"] += silences
                log.info(
                    "session with %s ended%s; reconnecting",
                    self.dc_url,
                    " (no pong: the DC went silent)" if silences else "",
                )
            try:
                await self._open_session()
                failures = silences = 0
                await self._learn_federation()
                continue
            except Exception as exc:  # noqa: BLE001 - whatever broke the attempt, the loop must go on
                failures += 1
                silences = silences + 1 if isinstance(exc, DcSilent) else 0
                self.counters["dc_silences"] += isinstance(exc, DcSilent)
                log.info("session attempt %d at %s failed: %s", failures, self.dc_url, exc)
                self._abandon_ws()
            if liveness.should_fail_over(failures, silences) and await self._fail_over():
                failures = silences = 0
                continue
            await asyncio.sleep(liveness.reconnect_delay(failures))

    def _abandon_ws(self) -> None:
        """Drop the current WebSocket without waiting for the DC (it may be unreachable)."""
        ws, self.ws = self.ws, None
        if self._reader is not None:
            self._reader.cancel()
            self._reader = None
        if ws is not None and not ws.closed:
            self.tasks.spawn(ws.close())

    def restart(self, why: str) -> None:
        """Close the session so the session loop opens a fresh one (new local addresses, new TCP
        connection from where we are now)."""
        if self.ws is not None and not self.ws.closed and self._session_up.is_set():
            log.info("restarting the DC session: %s", why)
            self._session_up.clear()
            # A fresh HTTP client: the old one's pooled connections (and the WebSocket) were made
            # from the old address and may hang until TCP gives up; closing it aborts them all.
            old, self.dc = self.dc, DcClient(self.dc_url, pin=self.dc.pin)
            self.tasks.spawn(old.close())

    async def _fail_over(self) -> bool:
        """Register at the first other known DC that answers, on our chain, and open a session
        there. The newer Node Transaction names the new DC, so every DC's registry cache (fed by
        chain events) sends our peers there."""
        for d in self.known_dcs:
            url = d.endpoint.rstrip("/")
            if not url or url == self.dc_url.rstrip("/") or keys.parse_node_id(d.dc) == self.dc_address:
                continue  # the DC we are leaving, by URL or (reached by name) by its address
            if url.startswith("http://") and self.dc_url.startswith("https://"):
                continue  # no downgrade: a DC we reach only in clear is not one to fail over to (§5)
            old_url, old_dc, old_address = self.dc_url, self.dc, self.dc_address
            self._set_dc(url, keys.parse_node_id(d.dc))
            try:
                info = await self.dc.info()
                if self.chain and (info.chain_id, info.registry) != self.chain:
                    raise DcError("wrong_chain", f"{url} serves another chain")
                ts = record.next_timestamp(self.clock.wall_ms(), self.last_timestamp)
                req = RegistrationRequest.signed(self.key, info, ts, self.local_addrs())
                await self.dc.register(req, wait_confirmed=True)
                self.last_timestamp = ts
                self.home = {
                    "dc_url": url,
                    "dc": info.dc,
                    "hostname": info.hostname,
                    "timestamp": req.record.timestamp,
                    "status": "confirmed",
                }
                await self._open_session()
                self.dc_address = keys.parse_node_id(info.dc)
            except Exception as exc:  # noqa: BLE001 - try the next DC whatever went wrong here
                log.info("failover to %s failed: %s", url, exc)
                self._abandon_ws()
                await self.dc.close()
                self.dc_url, self.dc, self.dc_host = old_url, old_dc, urlsplit(old_url).hostname
                self.dc_address = old_address
                continue
            await old_dc.close()
            self.counters["failovers"] += 1
            log.info("failed over from %s to %s", old_url, url)
            return True
        return False

    async def _read_session(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        async for msg in ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            try:
                m = messages.decode(messages.DcToNode, msg.data)
            except ParseError as exc:
                log.warning("ignoring a malformed message from the DC: %s", exc)
                continue
            if isinstance(m, messages.DirectionPush):  # answered once decided (§8.1), reading goes on
                self.tasks.spawn(self._answer_direction(ws, m.direction))
            elif isinstance(m, messages.CsNoticePush):
                self.on_notice(m.notice)
            elif isinstance(m, messages.StatusReply):
                if self._status is not None and not self._status.done():
                    self._status.set_result(m)
            elif isinstance(m, messages.DirectionResult):
                fut = self._results.pop(m.id, None)
                if fut is not None and not fut.done():
                    fut.set_result(m)
            elif isinstance(m, messages.SessionError) and m.error == "malformed":
                self._refused_as_malformed(m)
        for fut in self._results.values():
            if not fut.done():
                fut.set_exception(NodeError("dc_lost", f"session with DC {self.dc_url} closed"))
        self._results.clear()

    def _refused_as_malformed(self, m: messages.SessionError) -> None:
        """The DC could not parse a message of ours. What we send on a session other than Direction
        Requests has not changed for years, so this is a DC older than the one-reply form (§8.1):
        fail the requests waiting at once, saying so, rather than after the direction timeout."""
        log.warning("the DC %s refused a message of ours as malformed (an older DC? §8.1): %s", self.dc_url, m.message)
        for fut in self._results.values():
            if not fut.done():
                fut.set_exception(NodeError("malformed", f"the DC refused the direction request: {m.message}"))
        self._results.clear()

    async def _answer_direction(self, ws: aiohttp.ClientWebSocketResponse, direction: messages.SignedEnvelope) -> None:
        ack = await self.on_direction(direction)
        if ack is not None:
            await self._send_quietly(ws, ack)

    async def ack_notice(self, item: str) -> None:
        """Tell the DC a Cache Server notice is dealt with (it stops pushing it); best effort."""
        if self.ws is not None:
            await self._send_quietly(self.ws, messages.CsNoticeAck(item))

    @staticmethod
    async def _send_quietly(ws: aiohttp.ClientWebSocketResponse, msg: messages.Message) -> None:
        """Best effort: a session that is closing loses the message (the DC gives up on its own)."""
        if not ws.closed:
            try:
                await ws.send_json(messages.encode(msg))
            except (ConnectionError, RuntimeError, aiohttp.ClientError):
                pass

    async def may_direct(self, signer: bytes, home_dc: bytes, ours: bool) -> bool:
        """May a Route Direction signed by `signer`, pushed by `home_dc`, direct us (§8.1)? A
        signer not on our list of active DCs makes us re-read the list once per DC_LIST_REFRESH_S."""

        def ok() -> bool:
            active = {keys.parse_node_id(d.dc) for d in self.known_dcs}
            return direction_signer_ok(signer, home_dc, ours, self.dc_address, active)

        now = self.clock.now()
        if ok() or ours or home_dc != self.dc_address or now - self._dcs_read_at < DC_LIST_REFRESH_S:
            return ok()
        self._dcs_read_at = now
        try:
            await self._read_dcs()
        except DcError as exc:
            log.info("could not refresh the DC list from %s: %s", self.dc_url, exc)
            return False
        return ok()

    # --- keepalives: keep the NAT mapping open and tell the DC where we are -------------------
    def send_keepalives(self) -> None:
        for port in self.keepalive_ports:
            self._last_sent_seq = next(self._seq)
            pkt = keepalive.encode_request(self.id, self._last_sent_seq, self.token)
            self.endpoint.send_control(pkt, (self.dc_ip, port))

    async def _quick_keepalives(self) -> None:
        for delay in QUICK_KEEPALIVES_S:
            await asyncio.sleep(delay)
            if self._observed_event.is_set():
                return
            self.send_keepalives()

    async def check_address(self, timeout: float = 0.3) -> bool:
        """Send keepalives now and wait (briefly) for a reply: if we moved, the reply shows the
        new public address and the session is reopened from here (see _on_control). True if
        it did (our NAT mapping changed, or we moved)."""
        seq, before = self._last_reply_seq, self.observed
        self.send_keepalives()
        if self.udp is False:
            return False  # UDP does not get out here (§8.4): no reply to wait for, only the probe
        end = self.clock.now() + timeout
        while self._last_reply_seq == seq and self.clock.now() < end:
            await asyncio.sleep(0.01)
        return self.observed != before or self._restarted_for is not None

    async def _keepalive_loop(self) -> None:
        while True:
            await asyncio.sleep(self.keepalive_interval)
            self.send_keepalives()
            now = self.clock.now()
            if self.udp and liveness.session_dead(now, self._last_reply_at, self.keepalive_interval):
                self.restart(f"no keepalive reply for {now - self._last_reply_at:.1f} s")

    def _on_control(self, data: bytes, addr) -> None:
        try:
            seq, ip, port = keepalive.parse_reply(data, self.token)
        except ParseError as exc:
            self._refuse_reply(str(exc))  # anyone can send them, from any source
            return
        if not self._last_reply_seq <= seq <= self._last_sent_seq:
            if seq > self._last_sent_seq:
                self._refuse_reply("a reply to a keepalive not sent")
            return  # or late (sent before a newer one: not where we are now)
        self._last_reply_seq, self._last_reply_at = seq, self.clock.now()
        observed = format_endpoint(ip, port)
        if self.keepalive_ports and addr[1] != self.keepalive_ports[0]:
            self.observed_alt = observed  # differs behind a symmetric NAT; ours is the first port's
            return
        udp_back = self.udp is False
        self.udp = True
        if self.observed is None:
            log.info("DC sees us at %s", observed)
            self.observed = observed
        elif observed != self.observed and self._confirming is None:
            if self._restarted_for != observed:  # we moved, or our NAT rebound: reopen from here at once
                self._restarted_for = observed
                self.network_changed("public address changed")  # probes every tunnel too
            self._confirming = self.tasks.spawn(self._confirm_move(observed))
        if udp_back and self._confirming is None:  # relayed over TCP until now: try UDP paths at once
            log.info("UDP works again (keepalive reply from the DC)")
            self.on_moved()
        self._observed_event.set()

    def _refuse_reply(self, why: str) -> None:
        self.counters["refused_replies"] += 1
        self._bad_replies.note(why)

    async def _confirm_move(self, observed: str) -> None:
        """A keepalive reply shows a new public address: the session has been reopened from here
        (the old TCP connection may have left with the old address), and the address is believed
        once the DC confirms it on that session (the reply's MAC key crossed the session)."""
        try:
            try:
                await asyncio.wait_for(self._session_up.wait(), SESSION_OPEN_TIMEOUT_S + UDP_PROBE_TIMEOUT_S)
                ws, self._status = self.ws, asyncio.get_running_loop().create_future()
                await ws.send_json(messages.encode(messages.StatusQuery()))  # type: ignore[union-attr]
                told = (await asyncio.wait_for(self._status, MOVE_CONFIRM_TIMEOUT_S)).observed
            except (asyncio.TimeoutError, ConnectionError, AttributeError, RuntimeError, aiohttp.ClientError):
                return  # no session to ask now: the next reply asks again
            if told is None or format_endpoint(*parse_endpoint(told)) != observed:
                self._refuse_reply("address change the DC does not confirm")
            else:
                log.info("DC sees us at %s", observed)
                self.observed = observed
            self._restarted_for = None
        finally:
            self._status = None
            self._confirming = None

    def network_changed(self, why: str = "network changed") -> None:
        """Our address changed (seen by the DC, or told by the OS/application): reopen the DC
        session from here and let the tunnels probe their peers."""
        self.counters["address_changes"] += 1
        self.send_keepalives()
        self.restart(why)
        self.on_moved()

    # --- Direction Requests -------------------------------------------------------------------
    async def direction(
        self, peer: bytes, route: str | None = None, resume: bytes | None = None
    ) -> messages.SignedEnvelope:
        """Send a Direction Request on the session (waiting for one if it is being reopened);
        returns our signed Route Direction, the DC's one reply once the peer has its own
        (whether to follow it is the tunnel table's check, §8.1). `route`: None (the DC
        decides), "relay" or "direct" (a direct path or a refusal, §8.3). A DC still reading the
        registry (catching_up) is asked again, within DIRECTION_TIMEOUT_S."""
        deadline = self.clock.now() + DIRECTION_TIMEOUT_S
        while True:
            try:
                return await self._direction_once(peer, route, resume)
            except NodeError as exc:
                if exc.code != "catching_up" or self.clock.now() + CATCHING_UP_RETRY_S > deadline:
                    raise
            await asyncio.sleep(CATCHING_UP_RETRY_S)

    async def _direction_once(self, peer: bytes, route: str | None, resume: bytes | None) -> messages.SignedEnvelope:
        try:
            await asyncio.wait_for(self._session_up.wait(), DIRECTION_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise NodeError("dc_lost", f"no session with a DC (last {self.dc_url})") from None
        rid = next(self._req_ids)
        fut: asyncio.Future[messages.DirectionResult] = asyncio.get_running_loop().create_future()
        self._results[rid] = fut
        req = messages.DirectionRequest(
            rid,
            keys.checksum(peer),
            route,  # type: ignore[arg-type]
            resume.hex() if resume is not None else None,
            inline=True,
        )
        try:
            await self.ws.send_json(messages.encode(req))  # type: ignore[union-attr]
            res = await asyncio.wait_for(fut, DIRECTION_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise NodeError("timeout", f"DC did not answer the direction request for {keys.checksum(peer)}") from None
        except (ConnectionError, AttributeError, RuntimeError) as exc:
            raise NodeError("dc_lost", f"session with DC {self.dc_url} lost: {exc}") from None
        finally:
            self._results.pop(rid, None)
        if res.direction is None:
            err = res.error or messages.ErrorBody("refused", "direction refused")
            raise NodeError(err.error, err.message)
        return res.direction

    def status(self) -> dict:
        return {"dc": self.dc_url, "observed": self.observed, "udp": self.udp, **self.counters}


def direction_signer_ok(
    signer: bytes, home_dc: bytes, ours: bool, session_dc: bytes | None, active: set[bytes]
) -> bool:
    """Who may direct this node (§8.1): the direction names as its deliverer (`home_dc`) the DC our
    session is with; the requester's DC signs it, so a direction for our own request is signed by
    our session's DC, and one a peer asked for by an active DC (ours, or one on its /v1/dcs list)."""
    if session_dc is None or home_dc != session_dc:
        return False
    return signer == session_dc or (not ours and signer in active)


def local_addrs_towards(host: str | None, port: int, families: tuple[int, ...] = ()) -> list[str]:
    """The local address the OS would use to reach `host` (the DC), then, for each other IP
    version in `families`, the one it would use towards the Internet: with the tunnel port."""
    try:
        host_family = ipaddress.ip_address(host).version if host else None
    except ValueError:
        host_family = None  # a name: its own family is whatever getaddrinfo picks
    targets = [host] if host else []
    targets += [ROUTE_PROBES[f] for f in families if f != host_family]
    out: list[str] = []
    for ip in map(source_address, targets):
        if ip is None or ipaddress.ip_address(ip).is_link_local:
            continue
        ep = format_endpoint(ip, port)
        if ep not in out:
            out.append(ep)
    return out
