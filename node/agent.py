"""The running node: a session with its DC, keepalives from the tunnel socket, and tunnels.

    node = await Node.start(key, "http://dc1:8330")
    t = await node.connect(peer_id)            # Direction Request → Route Direction → handshake
    await t.channel.send(b"hi"); print(await t.channel.recv())
    incoming = await node.accept()             # a tunnel some peer opened to us

This is the asyncio API for applications that embed a node; `ntm connect/ping/send/listen` use it.

What keeps a node reachable while networks change (docs/PROTOCOL.md §8.3):
  * the DC session is re-opened with backoff when it drops or when the keepalive replies show a
    new public address (the node moved; its old TCP connection is dead even if nobody said so);
  * when the home DC stays unreachable, the node signs a newer Node Transaction naming another
    DC from the list it keeps (`GET /v1/dcs`), registers there and opens its session there;
  * a tunnel is a `Link` whose send/recv survive path changes: while it carries traffic and
    nothing authenticated comes back, it is probed (a PING from wherever we are now lets the peer
    roam to us); if that fails, the node asks the DCs for a new direction to the same peer
    ("resume": the tunnel's ID) and both ends move the Link onto the new path.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import logging
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable
from urllib.parse import urlsplit

import aiohttp
import coincurve

from node.dc_client import DcClient, DcError
from node.endpoint import DEFAULT_PORT, Channel, Endpoint
from ntm import envelope, keepalive, keys
from ntm.errors import NtmError, ParseError
from ntm.registration import RegistrationRequest, format_endpoint, parse_endpoint
from ntm.tunnel import RelayInfo, TunnelConfig, TunnelError

log = logging.getLogger("ntm.node")

# How long a Direction Request may take: the DCs answer in milliseconds; a dead peer DC takes
# the federation timeout (3 s) to be declared unreachable.
DIRECTION_TIMEOUT_S = 8.0
# How long the tunnel handshake may take once directed: direct attempts, then the relay from
# 1.5 s on (node/endpoint.py), with room for a few relay retries.
TUNNEL_TIMEOUT_S = 8.0
# Keepalive period to the DC and of idle tunnels: below the common 30 s NAT UDP timeout.
# Configurable per node (Node.start): a network with shorter NAT timeouts needs a shorter one.
KEEPALIVE_INTERVAL_S = keepalive.KEEPALIVE_INTERVAL_S
# The first keepalives of a session go out quickly: the first may race the NAT's mapping setup,
# and the DC must know our public address before it can direct anyone to us.
QUICK_KEEPALIVES_S = (0.0, 0.1, 0.3)
# How long a new session waits for the DC to report our public address.
OBSERVED_TIMEOUT_S = 5.0
# The session counts as dead after this many keepalive intervals without any reply (a DC whose
# host vanished closes no TCP connection).
KEEPALIVE_MISSES = 3
# Session reconnect backoff: a moved node reconnects within tens of ms; a dead DC is not hammered.
RECONNECT_BACKOFF_S = (0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2)
# Consecutive failed session attempts after which the home DC is given up for another one
# (~0.35 s of "connection refused" with the backoff above).
FAILOVER_AFTER_FAILURES = 3
# One session attempt (TCP + challenge + welcome) may take this long before it counts as failed.
SESSION_OPEN_TIMEOUT_S = 3.0
# Ended tunnels kept for `ntm status`: enough to see what just happened, bounded for a long run.
ENDED_TUNNELS_KEPT = 16
# Tunnel liveness, checked this often for every Link.
LIVENESS_TICK_S = 0.05
# A Link counts as in use if the application sent or received within this window; only links in
# use are probed (an idle tunnel is kept open by keepalives, not by probes).
ACTIVE_WINDOW_S = 1.0
# In use and nothing authenticated heard for this long: send a PING (it also lets the peer roam
# to our new address, the cheap repair).
PROBE_AFTER_S = 0.15
# ... and for this long: the path is dead, ask the DCs for a new one. Handover target is 1 s.
DEAD_AFTER_S = 0.45
# A re-direction that failed (peer also moving, DC session reconnecting) is retried this often,
# for at most RECOVERY_GIVE_UP_S.
RECOVERY_RETRY_S = 0.3
RECOVERY_GIVE_UP_S = 60.0
# After a switch, the old path keeps delivering what is still in flight; it is closed once it has
# been silent this long.
OLD_PATH_GRACE_S = 10.0
# Address probes for the route lookup that finds our own address of each family (a UDP
# connect() sends nothing; documentation addresses, routed by the default route).
ROUTE_PROBES = {4: "192.0.2.1", 6: "2001:db8::1"}


class NodeError(NtmError):
    """A connection the node could not make; `code` is the DC's reason when it gave one."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class Link:
    """Application side of a tunnel to one peer; survives the agent swapping the path under it.

    Same interface as `node.endpoint.Channel` (send/recv/ping/via/peer_addr/...): reads go to
    the current path, received data from every attached path ends up in one queue.
    """

    def __init__(self, channel: Channel) -> None:
        self.channels: list[Channel] = []
        self.current: Channel = channel
        self._queue: asyncio.Queue[bytes] = asyncio.Queue()
        self._receiver: Callable[[bytes], None] | None = None
        self.last_app = time.time()  # last application send or receive (liveness: "in use")
        self.switched_at = 0.0
        self.closed = False
        self.attach(channel)

    # -- paths --
    def attach(self, channel: Channel) -> None:
        """Send on `channel` from now on; keep receiving on the older paths too."""
        channel.set_receiver(self._deliver)
        if channel not in self.channels:
            self.channels.append(channel)
        self.current = channel
        self.switched_at = time.time()

    def detach(self, channel: Channel) -> None:
        if channel in self.channels and channel is not self.current:
            self.channels.remove(channel)

    def last_heard(self) -> float:
        """When an authenticated packet last arrived on any path (or the last switch)."""
        heard = [c.session.last_received or 0.0 for c in self.channels]
        return max([self.switched_at, *heard])

    # -- Channel interface --
    @property
    def path_id(self) -> bytes:
        return self.current.path_id

    @property
    def peer_id(self) -> bytes:
        return self.current.peer_id

    @property
    def peer_addr(self):
        return self.current.peer_addr

    @property
    def via(self) -> str | None:
        return self.current.via

    @property
    def rtt(self) -> float | None:
        return self.current.rtt

    @property
    def stats(self) -> dict[str, int]:
        return self.current.stats

    @property
    def established(self) -> bool:
        return self.current.established

    def send_nowait(self, data: bytes) -> None:
        if self.closed:
            raise TunnelError("tunnel is closed")
        self.last_app = time.time()
        self.current.send_nowait(data)

    async def send(self, data: bytes) -> None:
        self.send_nowait(data)

    async def recv(self) -> bytes:
        if self.closed and self._queue.empty():
            raise TunnelError("tunnel is closed")
        payload = await self._queue.get()
        if payload is None:  # peer_closed() woke us
            raise TunnelError("the peer closed the tunnel")
        return payload

    def set_receiver(self, callback: Callable[[bytes], None] | None) -> None:
        self._receiver = callback

    async def ping(self, timeout: float = 2.0) -> float:
        return await self.current.ping(timeout)

    async def close(self) -> None:
        self.closed = True
        for ch in self.channels:
            await ch.close()

    def peer_closed(self) -> None:
        """The peer closed the current path on purpose: the Link ends; a waiting recv() wakes."""
        self.closed = True
        self._queue.put_nowait(None)

    def _deliver(self, payload: bytes) -> None:
        self.last_app = time.time()
        if self._receiver is not None:
            self._receiver(payload)
        else:
            self._queue.put_nowait(payload)


@dataclass
class Tunnel:
    """A tunnel to `peer`: its Link (`channel`), how it was made, and how it was repaired.

    `id` is the first path ID; both ends know it, and a re-direction names it to move the tunnel.
    """

    peer: bytes
    channel: Link
    kind: str
    role: str
    opened_at: float
    id: bytes = b""
    redirects: int = 0  # new paths the DCs gave this tunnel after the old one died
    probes: int = 0  # liveness PINGs sent while the path was silent
    recovering: asyncio.Task | None = field(default=None, repr=False)


def endpoint_addr(text: str) -> tuple[str, int]:
    return parse_endpoint(text)


class Node:
    def __init__(self, key: coincurve.PrivateKey, dc_url: str, endpoint: Endpoint,
                 keepalive_interval: float = KEEPALIVE_INTERVAL_S, local_addrs: list[str] | None = None) -> None:
        self.key = key
        self.id = keys.node_id_of(key)
        self.endpoint = endpoint
        self.keepalive_interval = keepalive_interval
        self.fixed_local_addrs = local_addrs  # given by the caller: announced as is, never recomputed
        self._set_dc(dc_url)
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.keepalive_ports: list[int] = []
        self.token = b""
        self.observed: str | None = None
        self.chain: tuple[int, str] | None = None  # (chain id, registry) of the DC we registered at
        self.known_dcs: list[dict] = []  # from GET /v1/dcs while healthy: where to go if our DC dies
        self.tunnels: dict[bytes, Tunnel] = {}  # by tunnel ID
        self.ended: deque[dict] = deque(maxlen=ENDED_TUNNELS_KEPT)  # for status output
        self.home: dict | None = None  # set by a failover: the new registration, for the CLI's state
        self.counters = {"sessions": 0, "session_drops": 0, "failovers": 0, "address_changes": 0}
        self._seq = itertools.count(int(time.time() * 1000))  # keepalive seq grows across restarts
        self._last_reply_seq = 0
        self._last_reply_at = time.time()
        self._req_ids = itertools.count(1)
        self._results: dict[int, asyncio.Future] = {}
        self._opening: dict[bytes, asyncio.Future] = {}
        self._incoming: asyncio.Queue[Tunnel] = asyncio.Queue()
        self._tasks: list[asyncio.Task] = []
        self._reader: asyncio.Task | None = None
        self._observed_event = asyncio.Event()
        self._session_up = asyncio.Event()
        self._closing = False

    @classmethod
    async def start(cls, key: coincurve.PrivateKey, dc_url: str, host: str | None = None,
                    port: int = DEFAULT_PORT, local_addrs: list[str] | None = None,
                    keepalive_interval: float = KEEPALIVE_INTERVAL_S) -> "Node":
        """Bind the tunnel socket, open the DC session, start keepalives; ready to connect/accept.

        `keepalive_interval` paces both the DC keepalives and idle-tunnel keepalives: it must stay
        below the shortest NAT UDP timeout on the way."""
        ep = await Endpoint.create(key, host, port, config=TunnelConfig(keepalive_interval=keepalive_interval))
        node = cls(key, dc_url, ep, keepalive_interval, local_addrs)
        try:
            await node._open_session()
            await node._learn_federation()
        except BaseException:
            await node.close()
            raise
        node._tasks = [asyncio.create_task(node._session_loop()), asyncio.create_task(node._keepalive_loop()),
                       asyncio.create_task(node._liveness_loop())]
        return node

    async def close(self) -> None:
        self._closing = True
        for t in [*self._tasks, self._reader, *(t.recovering for t in self.tunnels.values())]:
            if t is not None:
                t.cancel()
        for t in [*self._tasks, self._reader]:
            if t is None:
                continue
            try:
                await t
            except (asyncio.CancelledError, Exception):
                pass
        if self.ws is not None:
            try:
                await asyncio.wait_for(self.ws.close(), 1.0)  # the DC may be gone
            except (asyncio.TimeoutError, OSError, aiohttp.ClientError):
                pass
        await self.dc.close()
        await self.endpoint.close()

    async def __aenter__(self) -> "Node":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # --- the DC session -----------------------------------------------------------------------
    def _set_dc(self, dc_url: str) -> None:
        self.dc_url = dc_url
        self.dc = DcClient(dc_url)
        self.dc_host = urlsplit(dc_url).hostname

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
        self._observed_event.clear()
        ws, welcome = await asyncio.wait_for(
            self.dc.open_session(self.key, {"local_addrs": self.local_addrs()}), SESSION_OPEN_TIMEOUT_S)
        self.ws = ws
        self.token = bytes.fromhex(welcome["token"])
        self.keepalive_ports = welcome["keepalive_ports"]
        self.endpoint.on_control = self._on_control
        self._reader = asyncio.create_task(self._read_session(ws))
        self._last_reply_at = time.time()
        quick = asyncio.create_task(self._quick_keepalives())
        try:
            await asyncio.wait_for(self._observed_event.wait(), OBSERVED_TIMEOUT_S)
        finally:
            quick.cancel()
        self.counters["sessions"] += 1
        self._session_up.set()

    async def _learn_federation(self) -> None:
        """Remember our chain and the active DCs, for failover. Best effort while healthy."""
        try:
            info = await self.dc.info()
            self.chain = (info["chain_id"], info["registry"])
            self.known_dcs = await self.dc.dcs()
        except (DcError, KeyError, TypeError) as exc:
            log.info("could not refresh the DC list from %s: %s", self.dc_url, exc)

    async def _session_loop(self) -> None:
        """Keep a session open: wait for the current one to end, then reconnect with backoff;
        after FAILOVER_AFTER_FAILURES failures in a row, move to another DC."""
        failures = 0
        while not self._closing:
            if self._reader is not None:
                await asyncio.gather(self._reader, return_exceptions=True)
                self._reader = None
                self._session_up.clear()
                self.counters["session_drops"] += 1
                log.info("session with %s ended; reconnecting", self.dc_url)
            try:
                await self._open_session()
                failures = 0
                await self._learn_federation()
                continue
            except Exception as exc:  # noqa: BLE001 - whatever broke the attempt, the loop must go on
                failures += 1
                log.info("session attempt %d at %s failed: %s", failures, self.dc_url, exc)
                self._abandon_ws()
            if failures >= FAILOVER_AFTER_FAILURES and await self._fail_over():
                failures = 0
                continue
            await asyncio.sleep(RECONNECT_BACKOFF_S[min(failures, len(RECONNECT_BACKOFF_S)) - 1])

    def _abandon_ws(self) -> None:
        """Drop the current WebSocket without waiting for the DC (it may be unreachable)."""
        ws, self.ws = self.ws, None
        if self._reader is not None:
            self._reader.cancel()
            self._reader = None
        if ws is not None and not ws.closed:
            asyncio.create_task(ws.close())

    def restart_session(self, why: str) -> None:
        """Close the session so the session loop opens a fresh one (new local addresses, new TCP
        connection from where we are now)."""
        if self.ws is not None and not self.ws.closed and self._session_up.is_set():
            log.info("restarting the DC session: %s", why)
            self._session_up.clear()
            # A fresh HTTP client: the old one's pooled connections (and the WebSocket) were made
            # from the old address and may hang until TCP gives up; closing it aborts them all.
            old, self.dc = self.dc, DcClient(self.dc_url)
            asyncio.create_task(old.close())

    async def _fail_over(self) -> bool:
        """Register at the first other known DC that answers, on our chain, and open a session
        there. The newer Node Transaction names the new DC, so every DC's registry cache (fed by
        chain events) sends our peers there."""
        for d in self.known_dcs:
            url = d.get("endpoint", "").rstrip("/")
            if not url or url == self.dc_url.rstrip("/"):
                continue
            old_url, old_dc = self.dc_url, self.dc
            self._set_dc(url)
            try:
                info = await self.dc.info()
                if self.chain and (info["chain_id"], info["registry"]) != self.chain:
                    raise DcError("wrong_chain", f"{url} serves another chain")
                req = RegistrationRequest.signed(self.key, info, int(time.time() * 1000), self.local_addrs())
                await self.dc.register(req, wait_confirmed=True)
                self.home = {"dc_url": url, "dc": info["dc"], "hostname": info["hostname"],
                             "timestamp": req.record.timestamp, "status": "confirmed"}
                await self._open_session()
            except Exception as exc:  # noqa: BLE001 - try the next DC whatever went wrong here
                log.info("failover to %s failed: %s", url, exc)
                self._abandon_ws()
                await self.dc.close()
                self.dc_url, self.dc, self.dc_host = old_url, old_dc, urlsplit(old_url).hostname
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
                m = msg.json()
            except ValueError:
                continue
            if m.get("type") == "direction":
                asyncio.create_task(self._follow(m.get("direction")))
            elif m.get("type") == "direction-result":
                fut = self._results.pop(m.get("id"), None)
                if fut is not None and not fut.done():
                    fut.set_result(m)
        for fut in self._results.values():
            if not fut.done():
                fut.set_exception(NodeError("dc_lost", f"session with DC {self.dc_url} closed"))
        self._results.clear()

    # --- keepalives: keep the NAT mapping open and tell the DC where we are -------------------
    def send_keepalives(self) -> None:
        for port in self.keepalive_ports:
            pkt = keepalive.encode_request(self.id, next(self._seq), self.token)
            self.endpoint.send_control(pkt, (self.dc_host, port))

    async def _quick_keepalives(self) -> None:
        for delay in QUICK_KEEPALIVES_S:
            await asyncio.sleep(delay)
            self.send_keepalives()

    async def check_address(self, timeout: float = 0.3) -> None:
        """Send keepalives now and wait (briefly) for a reply: if we moved, the reply shows the
        new public address and the session is reopened from here (see _on_control)."""
        seq = self._last_reply_seq
        self.send_keepalives()
        end = time.time() + timeout
        while self._last_reply_seq == seq and time.time() < end:
            await asyncio.sleep(0.01)

    async def _keepalive_loop(self) -> None:
        while True:
            await asyncio.sleep(self.keepalive_interval)
            self.send_keepalives()
            silent = time.time() - self._last_reply_at
            if silent > KEEPALIVE_MISSES * self.keepalive_interval:
                self.restart_session(f"no keepalive reply for {silent:.1f} s")

    def _on_control(self, data: bytes, addr) -> None:
        try:
            seq, ip, port = keepalive.parse_reply(data)
        except ParseError:
            return
        if seq < self._last_reply_seq:
            return  # a late reply to a keepalive sent before a newer one: not where we are now
        self._last_reply_seq, self._last_reply_at = seq, time.time()
        if self.keepalive_ports and addr[1] != self.keepalive_ports[0]:
            return  # the second port's view differs behind a symmetric NAT; ours is the first's
        observed = format_endpoint(ip, port)
        if observed != self.observed:
            moved = self.observed is not None
            log.info("DC sees us at %s", observed)
            self.observed = observed
            if moved:
                self.network_changed("public address changed")
        self._observed_event.set()

    def network_changed(self, why: str = "network changed") -> None:
        """Our address changed (seen by the DC, or told by the OS/application): reopen the DC
        session from here and probe every tunnel, so peers that can still hear us roam to us."""
        self.counters["address_changes"] += 1
        self.send_keepalives()
        self.restart_session(why)
        for t in self.tunnels.values():
            self._probe(t)

    # --- tunnels ------------------------------------------------------------------------------
    def _opening_future(self, path: bytes) -> asyncio.Future:
        if path not in self._opening:
            self._opening[path] = asyncio.get_running_loop().create_future()
        return self._opening[path]

    async def _follow(self, direction) -> None:
        """Open the tunnel a Route Direction describes; hand it to connect(), accept(), or (with
        "resume") to the existing tunnel it repairs."""
        try:
            env, sig = envelope.parse(direction)
            if keys.recover_node_id(env.digest(), sig) != env.sender:
                raise ParseError("route direction signature does not match its DC")
            d = env.body
            path, peer = bytes.fromhex(d["path"]), keys.parse_node_id(d["peer"])
            peer_pub = bytes.fromhex(d["peer_pubkey"])
            relay = None
            if d.get("relay"):
                r = d["relay"]
                relay = RelayInfo(endpoint_addr(r["endpoints"][0]), bytes.fromhex(r["token"]), int(r["side"]))
            candidates = [endpoint_addr(c) for c in d.get("candidates", [])]
            resume = bytes.fromhex(d["resume"]) if d.get("resume") else None
        except (ParseError, KeyError, ValueError, TypeError, IndexError) as exc:
            log.warning("ignoring malformed route direction: %s", exc)
            return
        fut = self._opening_future(path)
        try:
            ch = await self.endpoint.open(path, peer, peer_pub, candidates, d["role"], relay, TUNNEL_TIMEOUT_S)
        except NtmError as exc:  # includes PeerIdentityError: the key is not the peer's
            log.warning("tunnel to %s failed: %s", keys.checksum(peer), exc)
            if not fut.done():
                fut.set_exception(NodeError("tunnel_failed", f"tunnel to {keys.checksum(peer)} failed: {exc}"))
            return
        mine = d.get("requester") == keys.checksum(self.id)
        old = self.tunnels.get(resume) if resume is not None else None
        if old is not None and old.peer == peer and not old.channel.closed:
            old.channel.attach(ch)
            old.kind, old.role = d["kind"], d["role"]
            old.redirects += 1
            tunnel = old
            log.info("tunnel %s to %s moved to path %s: %s via %s", old.id.hex(), keys.checksum(peer),
                     path.hex(), d["kind"], ch.via)
        else:
            tunnel = Tunnel(peer, Link(ch), d["kind"], d["role"], time.time(), id=path)
            self.tunnels[path] = tunnel
            log.info("tunnel to %s up: %s via %s", keys.checksum(peer), d["kind"], ch.via)
        if mine:
            if not fut.done():
                fut.set_result(tunnel)
        else:
            self._opening.pop(path, None)
            if tunnel is not old:
                self._incoming.put_nowait(tunnel)

    async def _direction(self, peer: bytes, force_relay: bool = False, resume: bytes | None = None) -> bytes:
        """Send a Direction Request on the session (waiting for one if it is being reopened);
        returns the new path ID once the DC has directed both ends."""
        try:
            await asyncio.wait_for(self._session_up.wait(), DIRECTION_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise NodeError("dc_lost", f"no session with a DC (last {self.dc_url})") from None
        rid = next(self._req_ids)
        fut = asyncio.get_running_loop().create_future()
        self._results[rid] = fut
        req = {"type": "direction-request", "id": rid, "peer": keys.checksum(peer)}
        if force_relay:
            req["route"] = "relay"
        if resume is not None:
            req["resume"] = resume.hex()
        try:
            await self.ws.send_json(req)
            res = await asyncio.wait_for(fut, DIRECTION_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise NodeError("timeout", f"DC did not answer the direction request for {keys.checksum(peer)}") from None
        except (ConnectionError, AttributeError, RuntimeError) as exc:
            raise NodeError("dc_lost", f"session with DC {self.dc_url} lost: {exc}") from None
        finally:
            self._results.pop(rid, None)
        if not res.get("ok"):
            raise NodeError(res.get("error", "refused"), res.get("message", "direction refused"))
        return bytes.fromhex(res["path"])

    async def connect(self, peer: bytes, force_relay: bool = False) -> Tunnel:
        """Ask the DC for a route to `peer` and build the tunnel; NodeError with the reason if not."""
        path = await self._direction(peer, force_relay)
        try:
            return await asyncio.wait_for(self._opening_future(path), TUNNEL_TIMEOUT_S + 2)
        finally:
            self._opening.pop(path, None)

    async def accept(self) -> Tunnel:
        """The next tunnel a peer opened to us."""
        return await self._incoming.get()

    # --- liveness and repair ------------------------------------------------------------------
    async def _liveness_loop(self) -> None:
        while True:
            await asyncio.sleep(LIVENESS_TICK_S)
            now = time.time()
            for t in list(self.tunnels.values()):
                self._check(t, now)

    def _check(self, t: Tunnel, now: float) -> None:
        """Probe a silent tunnel in use; start a re-direction when probing did not help."""
        link = t.channel
        if link.current.closed_by_peer and not link.closed:
            log.info("tunnel %s closed by %s", t.id.hex(), keys.checksum(t.peer))
            link.peer_closed()
        if link.closed:
            if self.tunnels.pop(t.id, None) is not None:
                self.ended.append(self._tunnel_status(t, "closed"))
            return
        self._drop_old_paths(link, now)
        if t.recovering is not None or now - link.last_app > ACTIVE_WINDOW_S:
            return
        silent = now - link.last_heard()
        if silent >= DEAD_AFTER_S:
            t.recovering = asyncio.create_task(self._redirect(t))
        elif silent >= PROBE_AFTER_S:
            self._probe(t)

    def _probe(self, t: Tunnel) -> None:
        """A PING from our current address: the answer proves the path; the PING itself moves the
        peer to our new address if we roamed (authenticated-address update)."""
        ch = t.channel.current
        if ch.established and not ch.closed:
            t.probes += 1
            asyncio.create_task(self._ping_quietly(ch))

    @staticmethod
    async def _ping_quietly(ch: Channel) -> None:
        try:
            await ch.ping(DEAD_AFTER_S)
        except (asyncio.TimeoutError, NtmError):
            pass

    def _drop_old_paths(self, link: Link, now: float) -> None:
        for ch in list(link.channels):
            if ch is not link.current and now - (ch.session.last_received or 0.0) > OLD_PATH_GRACE_S:
                link.detach(ch)
                asyncio.create_task(ch.close())

    async def _redirect(self, t: Tunnel) -> None:
        """Ask the DCs for a new path to the same peer, naming the tunnel, until one works.
        The resulting direction is attached to the Link in _follow (on both ends)."""
        started = time.time()
        log.info("tunnel %s to %s silent: asking for a new direction", t.id.hex(), keys.checksum(t.peer))
        try:
            await self.check_address()  # if we moved: new session, and the DC learns our new mapping
            while not t.channel.closed and time.time() - started < RECOVERY_GIVE_UP_S:
                if time.time() - t.channel.last_heard() < PROBE_AFTER_S:
                    return  # the old path came back (the peer roamed, or a resume from its side)
                try:
                    path = await self._direction(t.peer, resume=t.id)
                    try:
                        await asyncio.wait_for(self._opening_future(path), TUNNEL_TIMEOUT_S + 2)
                    finally:
                        self._opening.pop(path, None)
                    return
                except (NodeError, asyncio.TimeoutError) as exc:
                    log.info("re-direction for tunnel %s failed: %s", t.id.hex(), exc)
                    await asyncio.sleep(RECOVERY_RETRY_S)
        finally:
            t.recovering = None

    @staticmethod
    def _tunnel_status(t: Tunnel, state: str) -> dict:
        return {"peer": keys.checksum(t.peer), "id": t.id.hex(), "path": t.channel.path_id.hex(), "state": state,
                "route": t.kind, "via": t.channel.via, "redirects": t.redirects,
                "rtt_ms": round(t.channel.rtt * 1000, 2) if t.channel.rtt else None, **t.channel.stats}

    def status(self) -> dict:
        return {
            "node": keys.checksum(self.id), "dc": self.dc_url, "observed": self.observed,
            "local": format_endpoint(*self.endpoint.local_addr[:2]), **self.counters,
            "tunnels": [self._tunnel_status(t, "open") for t in self.tunnels.values()] + list(self.ended),
        }


def local_addrs_towards(host: str | None, port: int, families: tuple[int, ...] = ()) -> list[str]:
    """The local address the OS would use to reach `host` (the DC), then, for each other IP
    version in `families`, the one it would use towards the Internet: with the tunnel port."""
    out: list[str] = []
    targets: list[tuple[str | None, int | None]] = [(host, None)]
    try:
        host_family = ipaddress.ip_address(host).version if host else None
    except ValueError:
        host_family = None  # a name: its own family is whatever getaddrinfo picks
    targets += [(ROUTE_PROBES[f], f) for f in families if f != host_family]
    for target, _ in targets:
        try:
            info = socket.getaddrinfo(target, 9, type=socket.SOCK_DGRAM)[0]
            with socket.socket(info[0], socket.SOCK_DGRAM) as s:
                s.connect(info[4])  # UDP connect sends nothing; it only picks the route
                ip = s.getsockname()[0]
        except OSError:
            continue
        ep = format_endpoint(ip, port)
        if ep not in out and not ipaddress.ip_address(ip).is_link_local:
            out.append(ep)
    return out
