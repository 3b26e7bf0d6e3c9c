"""Tunnel endpoint: the thin asyncio UDP adapter around ntm.tunnel.Session.

One unconnected UDP socket bound to a wildcard address (default `[::]:4330` dual-stack with
IPV6_V6ONLY=0, else `0.0.0.0:4330`); many sessions multiplexed by the cleartext path ID; one
timer task that calls `Session.poll`. A connect()ed socket would break on address change, so
every send names its destination.

    ep = await Endpoint.create(static_key, port=0)
    ch = await ep.open(path_id, peer_id, peer_pub, candidates=[("203.0.113.7", 4330)],
                       role="initiate", relay=RelayInfo(("198.51.100.1", 4330), token, side=0))
    await ch.send(b"hello"); reply = await ch.recv()
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import time
from dataclasses import replace
from typing import Any, Callable, Sequence

import coincurve

from ntm.handshake import Rand
from ntm.packet import KNOWN_TYPES, PREFIX_LEN
from ntm.tunnel import (
    Addr,
    Data,
    EndpointChanged,
    HandshakeDone,
    PeerClosed,
    Pong,
    RelayBound,
    RelayInfo,
    Session,
    TunnelConfig,
    TunnelError,
)

DEFAULT_PORT = 4330  # the NTM port of the NTMobile papers
#: Default time open() waits for a handshake (direct attempts, then the relay from 1.5 s on).
OPEN_TIMEOUT = 10.0
#: Socket buffers: large enough to absorb a burst of ~1000 full-size datagrams.
SOCKET_BUFFER = 4 * 1024 * 1024
#: Longest sleep of the timer task (it is also woken whenever a session is added).
MAX_TIMER_SLEEP = 1.0


def _make_socket(host: str | None, port: int) -> socket.socket:
    if host is None or host == "::":
        try:
            sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            try:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            except (OSError, AttributeError):
                pass
            sock.bind(("::", port))
        except OSError:
            if host == "::":
                raise
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind(("0.0.0.0", port))
    else:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.bind((host, port))
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
        except OSError:
            pass
    sock.setblocking(False)
    return sock


def normalize_addr(addr: Addr, family: int) -> Addr:
    """(host, port) in the form a socket of `family` sends to and reports as source.

    On a dual-stack AF_INET6 socket IPv4 peers appear as `::ffff:a.b.c.d`; on an AF_INET socket
    such mapped addresses are unwrapped again.
    """
    host, port = addr[0], addr[1]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return (host, port)
    if family == socket.AF_INET6:
        if ip.version == 4:
            return (f"::ffff:{ip}", port)
        return (str(ip), port)
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return (str(ip.ipv4_mapped), port)
    return (str(ip), port)


class _Proto(asyncio.DatagramProtocol):
    """Per-socket protocol: forwards to the endpoint (so a rebind can swap sockets)."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.datagram_received = endpoint._on_datagram  # type: ignore[method-assign]
        self.endpoint = endpoint

    def error_received(self, exc: Exception) -> None:
        self.endpoint._stats["socket_errors"] += 1


class Channel:
    """Application side of one tunnel."""

    def __init__(self, endpoint: Endpoint, session: Session) -> None:
        self.endpoint = endpoint
        self.session = session
        self._queue: asyncio.Queue[bytes] = asyncio.Queue()
        self._receiver: Callable[[bytes], None] | None = None
        self._ready: asyncio.Future[HandshakeDone] = asyncio.get_running_loop().create_future()
        self._pongs: list[asyncio.Future[float]] = []
        self.closed = False
        self.closed_by_peer = False

    # -- info --
    @property
    def path_id(self) -> bytes:
        return self.session.path_id

    @property
    def peer_id(self) -> bytes:
        return self.session.peer_id

    @property
    def peer_addr(self) -> Addr | None:
        return self.session.peer_addr

    @property
    def via(self) -> str | None:
        """Which way the first handshake completed: "candidate:<i>", "relay" or "peer"."""
        return self.session.via

    @property
    def rtt(self) -> float | None:
        """Last round-trip time in seconds (handshake, then each ping)."""
        return self.session.rtt

    @property
    def stats(self) -> dict[str, int]:
        return self.session.stats

    @property
    def established(self) -> bool:
        return self.session.established

    # -- data --
    def send_nowait(self, data: bytes) -> None:
        """Encrypt and send one datagram now; TunnelError if the tunnel has no keys."""
        if self.closed:
            raise TunnelError("channel is closed")
        self.endpoint._send_data(self.session, data)

    async def send(self, data: bytes) -> None:
        self.send_nowait(data)

    async def recv(self) -> bytes:
        """Next payload received (in arrival order)."""
        if self.closed and self._queue.empty():
            raise TunnelError("the peer closed the tunnel" if self.closed_by_peer else "channel is closed")
        payload = await self._queue.get()
        if payload is None:  # the wake-up _peer_closed leaves for a waiting recv()
            raise TunnelError("the peer closed the tunnel")
        return payload

    def set_receiver(self, callback: Callable[[bytes], None] | None) -> None:
        """Deliver payloads to `callback` instead of the recv() queue (fast path). Payloads that
        arrived before the callback was set (the peer may send the moment the handshake is
        done) are handed to it first, in order."""
        self._receiver = callback
        while callback is not None and not self._queue.empty():
            payload = self._queue.get_nowait()
            if payload is not None:
                callback(payload)

    async def ping(self, timeout: float = 2.0) -> float:
        """Send a PING and wait for its PONG; returns the RTT in seconds."""
        fut: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._pongs.append(fut)
        pkt = self.session.ping(self.endpoint.clock())
        self.endpoint._sendto(pkt, self.session.peer_addr)
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            if fut in self._pongs:
                self._pongs.remove(fut)

    async def close(self) -> None:
        """Close the tunnel and tell the peer (authenticated CLOSE), so it does not try to repair it."""
        if not self.closed:
            self.endpoint._send_close(self.session)
        self.endpoint._remove(self.session.path_id)
        self.closed = True

    def _peer_closed(self) -> None:
        self.closed = self.closed_by_peer = True
        if self._receiver is None:
            self._queue.put_nowait(None)  # wakes a recv() that is waiting

    def _deliver(self, payload: bytes) -> None:
        if self._receiver is not None:
            self._receiver(payload)
        else:
            self._queue.put_nowait(payload)


class Endpoint:
    """One UDP socket, many tunnels keyed by path ID."""

    def __init__(
        self,
        static_key: coincurve.PrivateKey,
        *,
        config: TunnelConfig | None = None,
        rand: Rand = os.urandom,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.static_key = static_key
        self.config = config or TunnelConfig()
        self.rand = rand
        self.clock = clock  # Unix seconds: Request timestamps must grow across restarts
        self.sessions: dict[bytes, Session] = {}
        self.channels: dict[bytes, Channel] = {}
        self._stats: dict[str, int] = dict.fromkeys(
            ("tx_control", "drop_short", "drop_unknown_type", "drop_unknown_path",
             "socket_errors", "send_errors", "rebinds"),
            0,
        )
        self.rx_datagrams = 0  # hot counter, merged into `stats`
        self.transport: asyncio.DatagramTransport | None = None
        # Datagrams that are not tunnel packets (e.g. the DC's keepalive replies) go here.
        self.on_control: Callable[[bytes, Addr], None] | None = None
        self.family = socket.AF_INET
        self._wake: asyncio.Event | None = None
        self._timer_task: asyncio.Task[None] | None = None

    @classmethod
    async def create(
        cls,
        static_key: coincurve.PrivateKey,
        host: str | None = None,
        port: int = DEFAULT_PORT,
        *,
        config: TunnelConfig | None = None,
        rand: Rand = os.urandom,
        clock: Callable[[], float] = time.time,
    ) -> Endpoint:
        """Bind (host None: `[::]` dual-stack, else `0.0.0.0`) and start the timer task."""
        ep = cls(static_key, config=config, rand=rand, clock=clock)
        await ep._bind(host, port)
        ep._wake = asyncio.Event()
        ep._timer_task = asyncio.get_running_loop().create_task(ep._timer_loop())
        return ep

    async def _bind(self, host: str | None, port: int) -> None:
        sock = _make_socket(host, port)
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(lambda: _Proto(self), sock=sock)
        old, self.transport = self.transport, transport  # type: ignore[assignment]
        self.family = sock.family
        self._sendto_raw = transport.sendto
        if old is not None:
            old.close()

    @property
    def stats(self) -> dict[str, int]:
        """Endpoint counters: datagrams received, control datagrams sent, drops before a session."""
        return {**self._stats, "rx_datagrams": self.rx_datagrams}

    @property
    def local_addr(self) -> Addr:
        assert self.transport is not None
        return self.transport.get_extra_info("sockname")[:2]

    async def rebind(self, host: str | None = None, port: int = 0) -> None:
        """Move to a new local socket, keeping every session (keys, counters, peers).

        Each established session immediately sends an authenticated keepalive (and a relay bind
        when on the relay) from the new socket, so peers follow without a new handshake.
        """
        await self._bind(host, port)
        self._stats["rebinds"] += 1
        now = self.clock()
        for s in self.sessions.values():
            self._renormalize(s)
            s.local_address_changed(now)
            self._flush(s.datagrams_to_send())

    def _renormalize(self, s: Session) -> None:
        fam = self.family
        if s.peer_addr is not None:
            s.peer_addr = normalize_addr(s.peer_addr, fam)
        s.candidates = [normalize_addr(a, fam) for a in s.candidates]
        if s.relay is not None:
            s.relay = replace(s.relay, addr=normalize_addr(s.relay.addr, fam))

    async def open(
        self,
        path_id: bytes,
        peer_id: bytes,
        peer_pub: bytes,
        candidates: Sequence[Addr] = (),
        role: str = "initiate",
        relay: RelayInfo | None = None,
        timeout: float = OPEN_TIMEOUT,
    ) -> Channel:
        """Open the tunnel `path_id` and wait for its handshake.

        role "initiate": send Tunnel Requests to every candidate (in order) every 250 ms, first
        Response wins. "wait": answer the peer's Request. "punch": both (lower node ID wins a
        collision). With `relay`, after RELAY_FALLBACK_AFTER without a handshake the session
        binds at the relay and also tries through it. Raises TunnelError on timeout and
        PeerIdentityError if peer_pub does not belong to peer_id.
        """
        path_id = bytes(path_id)
        if path_id in self.sessions:
            raise TunnelError(f"path {path_id.hex()} is already open")
        s = Session(
            self.static_key, peer_id, peer_pub, path_id, role=role, candidates=list(candidates),
            relay=relay, config=self.config, rand=self.rand,
        )
        self._renormalize(s)
        ch = Channel(self, s)
        self.sessions[path_id] = s
        self.channels[path_id] = ch
        s.start(self.clock())
        self._flush(s.poll(self.clock()))
        self._kick()
        try:
            await asyncio.wait_for(asyncio.shield(ch._ready), timeout)
        except (asyncio.TimeoutError, TimeoutError):
            self._remove(path_id)
            raise TunnelError(f"no tunnel handshake on path {path_id.hex()} within {timeout} s") from None
        except BaseException:
            self._remove(path_id)
            raise
        return ch

    def _remove(self, path_id: bytes) -> None:
        self.sessions.pop(path_id, None)
        ch = self.channels.pop(path_id, None)
        if ch is not None:
            ch.closed = True

    async def close(self) -> None:
        if self._timer_task is not None:
            self._timer_task.cancel()
            try:
                await self._timer_task
            except asyncio.CancelledError:
                pass
        for pid, s in list(self.sessions.items()):
            self._send_close(s)
            self._remove(pid)
        if self.transport is not None:
            self.transport.close()

    def _send_close(self, s: Session) -> None:
        pkt = s.close_packet(self.clock())
        if pkt is not None:
            self._sendto(pkt, s.peer_addr)

    def send_control(self, data: bytes, addr: Addr) -> None:
        """Send a non-tunnel datagram (keepalive to the DC) from the tunnel socket, so the DC sees
        the same NAT mapping the peers will use."""
        self._sendto(data, normalize_addr(addr, self.family))

    # --- I/O glue ------------------------------------------------------------------------------
    def _sendto(self, data: bytes, addr: Addr) -> None:
        try:
            self._sendto_raw(data, addr)
            self._stats["tx_control"] += 1
        except (OSError, ValueError, TypeError):
            self._stats["send_errors"] += 1

    def _flush(self, out: list[tuple[bytes, Addr]]) -> None:
        for data, addr in out:
            self._sendto(data, addr)

    def _send_data(self, s: Session, data: bytes) -> None:
        pkt = s.encrypt(data, self.clock())
        self._sendto_raw(pkt, s.peer_addr)
        if s._outbox:  # a count-triggered rekey Request
            self._flush(s.datagrams_to_send())

    def _kick(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _on_datagram(self, data: bytes, addr: Addr) -> None:
        self.rx_datagrams += 1
        pid = data[1:PREFIX_LEN]
        s = self.sessions.get(pid)
        if s is None:
            if len(data) < PREFIX_LEN:
                self._stats["drop_short"] += 1
            elif data[0] not in KNOWN_TYPES and self.on_control is not None:
                self.on_control(data, addr[:2])  # not a tunnel packet: e.g. the DC's keepalive reply
            else:
                self._stats["drop_unknown_type" if data[0] not in KNOWN_TYPES else "drop_unknown_path"] += 1
            return
        if len(addr) > 2:
            addr = addr[:2]
        events = s.receive(data, addr, self.clock())
        if s._outbox:
            self._flush(s.datagrams_to_send())
        if not events:
            return
        ch = self.channels.get(pid)
        if ch is None:
            return
        if len(events) == 1 and type(events[0]) is Data:  # the common case
            ch._deliver(events[0].payload)
            return
        for ev in events:
            if type(ev) is Data:
                ch._deliver(ev.payload)
            elif type(ev) is HandshakeDone:
                if not ch._ready.done():
                    ch._ready.set_result(ev)
                self._kick()
            elif type(ev) is Pong:
                for fut in ch._pongs:
                    if not fut.done():
                        fut.set_result(ev.rtt)
                ch._pongs.clear()
            elif type(ev) is PeerClosed:
                self._remove(pid)
                ch._peer_closed()
            elif type(ev) is EndpointChanged or type(ev) is RelayBound:
                pass  # visible in session.peer_addr / stats

    async def _timer_loop(self) -> None:
        assert self._wake is not None
        while True:
            now = self.clock()
            nxt: float | None = None
            for s in list(self.sessions.values()):
                t = s.next_timer()
                if t is not None and t <= now:
                    self._flush(s.poll(now))
                    t = s.next_timer()
                if t is not None and (nxt is None or t < nxt):
                    nxt = t
            delay = MAX_TIMER_SLEEP if nxt is None else min(max(nxt - now, 0.002), MAX_TIMER_SLEEP)
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), delay)
            except (asyncio.TimeoutError, TimeoutError):
                pass


__all__ = ["Channel", "DEFAULT_PORT", "Endpoint", "RelayInfo", "TunnelConfig", "TunnelError", "normalize_addr"]
_ = Any
