"""The running node: a session with its DC, keepalives from the tunnel socket, and tunnels.

    node = await Node.start(key, "http://dc1:8330")
    ch = await node.connect(peer_id)           # Direction Request → Route Direction → handshake
    await ch.send(b"hi"); print(await ch.recv())
    incoming = await node.accept()             # a channel some peer opened to us

This is the asyncio API for applications that embed a node; `ntm connect/ping/send/listen` use it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp
import coincurve

from node.dc_client import DcClient, DcError
from node.endpoint import DEFAULT_PORT, Channel, Endpoint
from ntm import envelope, keepalive, keys
from ntm.errors import NtmError, ParseError
from ntm.registration import format_endpoint, parse_endpoint
from ntm.tunnel import RelayInfo

log = logging.getLogger("ntm.node")

# How long a Direction Request may take: the DCs answer in milliseconds; a dead peer DC takes
# the federation timeout (3 s) to be declared unreachable.
DIRECTION_TIMEOUT_S = 8.0
# How long the tunnel handshake may take once directed: direct attempts, then the relay from
# 1.5 s on (node/endpoint.py), with room for a few relay retries.
TUNNEL_TIMEOUT_S = 8.0


class NodeError(NtmError):
    """A connection the node could not make; `code` is the DC's reason when it gave one."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Tunnel:
    """A channel and how it was made, for status output."""

    peer: bytes
    channel: Channel
    kind: str
    role: str
    opened_at: float


def endpoint_addr(text: str) -> tuple[str, int]:
    return parse_endpoint(text)


class Node:
    def __init__(self, key: coincurve.PrivateKey, dc_url: str, endpoint: Endpoint) -> None:
        self.key = key
        self.id = keys.node_id_of(key)
        self.dc_url = dc_url
        self.endpoint = endpoint
        self.dc = DcClient(dc_url)
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.dc_host = urlsplit(dc_url).hostname
        self.keepalive_ports: list[int] = []
        self.token = b""
        self.observed: str | None = None
        self.tunnels: dict[bytes, Tunnel] = {}
        self._seq = itertools.count(int(time.time() * 1000))  # keepalive seq grows across restarts
        self._req_ids = itertools.count(1)
        self._results: dict[int, asyncio.Future] = {}
        self._opening: dict[bytes, asyncio.Future] = {}
        self._incoming: asyncio.Queue[Tunnel] = asyncio.Queue()
        self._tasks: list[asyncio.Task] = []
        self._observed_event = asyncio.Event()

    @classmethod
    async def start(cls, key: coincurve.PrivateKey, dc_url: str, host: str | None = None,
                    port: int = DEFAULT_PORT, local_addrs: list[str] | None = None) -> "Node":
        """Bind the tunnel socket, open the DC session, start keepalives; ready to connect/accept."""
        ep = await Endpoint.create(key, host, port)
        node = cls(key, dc_url, ep)
        try:
            await node._open_session(local_addrs)
        except BaseException:
            await node.close()
            raise
        return node

    async def _open_session(self, local_addrs: list[str] | None) -> None:
        host, port = self.endpoint.local_addr[:2]
        bound_any = host in ("::", "0.0.0.0")
        addrs = local_addrs or (local_addrs_towards(self.dc_host, port) if bound_any else [format_endpoint(host, port)])
        self.ws, welcome = await self.dc.open_session(self.key, {"local_addrs": addrs})
        self.token = bytes.fromhex(welcome["token"])
        self.keepalive_ports = welcome["keepalive_ports"]
        self.endpoint.on_control = self._on_control
        self._tasks = [asyncio.create_task(self._read_session()), asyncio.create_task(self._keepalive_loop())]
        # The DC must know our public mapping before it can direct anyone to us.
        await asyncio.wait_for(self._observed_event.wait(), 5.0)

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            try:
                await t
            except (asyncio.CancelledError, Exception):
                pass
        if self.ws is not None:
            await self.ws.close()
        await self.dc.close()
        await self.endpoint.close()

    async def __aenter__(self) -> "Node":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # --- keepalives: keep the NAT mapping open and tell the DC where we are -------------------
    def send_keepalives(self) -> None:
        for port in self.keepalive_ports:
            pkt = keepalive.encode_request(self.id, next(self._seq), self.token)
            self.endpoint.send_control(pkt, (self.dc_host, port))

    async def _keepalive_loop(self) -> None:
        for delay in (0.0, 0.1, 0.3):  # a few quick ones first: the first may race the NAT setup
            await asyncio.sleep(delay)
            self.send_keepalives()
        while True:
            await asyncio.sleep(keepalive.KEEPALIVE_INTERVAL_S)
            self.send_keepalives()

    def _on_control(self, data: bytes, addr) -> None:
        try:
            _, ip, port = keepalive.parse_reply(data)
        except ParseError:
            return
        observed = format_endpoint(ip, port)
        if observed != self.observed:
            log.info("DC sees us at %s", observed)
            self.observed = observed
        self._observed_event.set()

    # --- session messages -----------------------------------------------------------------------
    async def _read_session(self) -> None:
        async for msg in self.ws:
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

    def _opening_future(self, path: bytes) -> asyncio.Future:
        if path not in self._opening:
            self._opening[path] = asyncio.get_running_loop().create_future()
        return self._opening[path]

    async def _follow(self, direction) -> None:
        """Open the tunnel a Route Direction describes; hand it to connect() or accept()."""
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
        tunnel = Tunnel(peer, ch, d["kind"], d["role"], time.time())
        self.tunnels[path] = tunnel
        log.info("tunnel to %s up: %s via %s", keys.checksum(peer), d["kind"], ch.via)
        if d.get("requester") == keys.checksum(self.id):
            if not fut.done():
                fut.set_result(tunnel)
        else:
            self._opening.pop(path, None)
            self._incoming.put_nowait(tunnel)

    async def connect(self, peer: bytes, force_relay: bool = False) -> Tunnel:
        """Ask the DC for a route to `peer` and build the tunnel; NodeError with the reason if not."""
        rid = next(self._req_ids)
        fut = asyncio.get_running_loop().create_future()
        self._results[rid] = fut
        req = {"type": "direction-request", "id": rid, "peer": keys.checksum(peer)}
        if force_relay:
            req["route"] = "relay"
        await self.ws.send_json(req)
        try:
            res = await asyncio.wait_for(fut, DIRECTION_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise NodeError("timeout", f"DC did not answer the direction request for {keys.checksum(peer)}") from None
        if not res.get("ok"):
            raise NodeError(res.get("error", "refused"), res.get("message", "direction refused"))
        path = bytes.fromhex(res["path"])
        try:
            return await asyncio.wait_for(self._opening_future(path), TUNNEL_TIMEOUT_S + 2)
        finally:
            self._opening.pop(path, None)

    async def accept(self) -> Tunnel:
        """The next tunnel a peer opened to us."""
        return await self._incoming.get()

    def status(self) -> dict:
        return {
            "node": keys.checksum(self.id), "dc": self.dc_url, "observed": self.observed,
            "local": format_endpoint(*self.endpoint.local_addr[:2]),
            "tunnels": [{"peer": keys.checksum(t.peer), "path": p.hex(), "route": t.kind, "via": t.channel.via,
                         "rtt_ms": round(t.channel.rtt * 1000, 2) if t.channel.rtt else None, **t.channel.stats}
                        for p, t in self.tunnels.items()],
        }


def local_addrs_towards(host: str | None, port: int) -> list[str]:
    """The local address the OS would use to reach `host` (the DC), with the tunnel port."""
    try:
        info = socket.getaddrinfo(host, 9, type=socket.SOCK_DGRAM)[0]
        with socket.socket(info[0], socket.SOCK_DGRAM) as s:
            s.connect(info[4])  # UDP connect sends nothing; it only picks the route
            return [format_endpoint(s.getsockname()[0], port)]
    except OSError:
        return []
