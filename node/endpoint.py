"""Tunnel endpoint: the thin asyncio adapter around ntm.tunnel.Session.

One unconnected datagram socket bound to a wildcard address (default `[::]:4330` dual-stack with
IPV6_V6ONLY=0, else `0.0.0.0:4330`); many sessions multiplexed by the cleartext path ID; one
timer task that calls `Session.poll`. A connect()ed socket would break on address change, so
every send names its destination. The socket is behind the `Bind` interface: tests run
endpoints on an in-memory network (tests/fakes.py) as wireguard-go's conn/bindtest does.

    ep = await Endpoint.create(static_key, port=0)
    ch = await ep.open(path_id, peer_id, peer_pub, candidates=[("203.0.113.7", 4330)],
                       role="initiate", relay=RelayInfo(("198.51.100.1", 4330), token, side=0))
    await ch.send(b"hello"); reply = await ch.recv()
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import sys
from dataclasses import replace
from typing import Awaitable, Callable, Protocol, Sequence

import coincurve

from daemon import udpgso
from daemon.service import SOCKET_BUFFER, udp_socket
from node.channel import Channel, Segments
from node.relay_stream import RelayStream
from node.state import TUNNEL_PORT
from ntm.addr import Addr, for_socket
from ntm.clock import SYSTEM, Clock
from ntm.handshake import Rand
from ntm.packet import KNOWN_TYPES, PREFIX_LEN, TYPE_HANDSHAKE_REQUEST
from ntm.pmtu import CONTROL, MAX_MTU, PathMtu
from ntm.tunnel import (
    Data,
    EndpointChanged,
    HandshakeDone,
    PeerClosed,
    Pong,
    ProbeAck,
    RelayInfo,
    Session,
    Standby,
    TunnelConfig,
    TunnelError,
)
from ntm.vaddr import inner_mtu

DEFAULT_PORT = TUNNEL_PORT
#: Default time open() waits for a handshake (direct attempts, then the relay from 1.5 s on).
OPEN_TIMEOUT = 10.0
#: Longest sleep of the timer task (it is also woken whenever a session is added).
MAX_TIMER_SLEEP = 1.0
# A Tunnel Request may arrive for a path we have not opened yet: a peer that initiates is directed
# before our DC's reply reaches us (§8.1 one reply), and its Request travels one hop, our reply
# two. The latest Request per unknown path is kept this long and answered when the path opens, so
# no 250 ms retransmission is lost; a DC's reply takes milliseconds, 1 s is a loaded host's.
EARLY_REQUEST_S = 1.0
# ... for at most this many paths (oldest dropped first): strangers' Requests for random paths can
# only push a genuine one out, which costs its peer one retransmission. Nothing is decrypted early.
EARLY_REQUESTS_MAX = 64

Receive = Callable[[bytes, Addr], None]
log = logging.getLogger("ntm.node")


class Bind(Protocol):
    """A bound datagram socket as the endpoint uses it. `sendto` may raise OSError."""

    family: int
    local_addr: Addr
    sendto: Callable[[bytes, Addr], None]

    def send_batch(self, items: list[tuple[bytes, Addr]]) -> None: ...
    def send_run(self, buf: memoryview, ends: list[int], addr: Addr) -> None: ...
    def close(self) -> None: ...


Binder = Callable[[str | None, int, Receive, Callable[[], None]], Awaitable[Bind]]


#: Datagrams (or GRO batches) read per wake-up before yielding to the event loop.
RECV_BATCH = 64
IP_PKTINFO = 8  # include/uapi/linux/in.h; Python does not name it
# Path MTU discovery modes (include/uapi/linux/in.h, in6.h): data may be fragmented by the kernel
# to a path MTU it learned (WANT, the default); a probe must not be (PROBE: DF set, learned MTU ignored).
IP_MTU_DISCOVER, IPV6_MTU_DISCOVER, PMTUDISC_WANT, PMTUDISC_PROBE = 10, 23, 1, 3
IP_MTU, IPV6_MTU = 14, 24
_ANY4_MAPPED = bytes(10) + b"\xff\xff" + bytes(4)  # ::ffff:0.0.0.0


class UdpBind:
    """The real Bind: a non-blocking UDP socket read from the event loop, with UDP GSO for
    batches (`send_batch`) and GRO on receive where the kernel has them (Linux ≥ 5.0)."""

    def __init__(self, sock: socket.socket, receive: Receive, on_error: Callable[[], None]) -> None:
        self.sock = sock
        self.family = sock.family
        self.local_addr = sock.getsockname()[:2]
        self.receive = receive
        self.on_error = on_error
        self.gso = True
        self.emsgsize = 0  # sends the kernel refused for size (EMSGSIZE), §7 "Path MTU"
        # Told the destination of every such send: the path MTU there is smaller than we thought.
        self.on_too_big: Callable[[Addr], None] | None = None
        # Given each read whole (buffer, length, datagram size, sender): a GRO run in one call.
        self.receive_run: Callable[[memoryview, int, int, Addr], None] | None = None
        self.gro = udpgso.enable_gro(sock)
        self._buf = bytearray(udpgso.RECV_BUFFER)
        self._view = memoryview(self._buf)
        self._loop = asyncio.get_running_loop()
        self._fd = sock.fileno()
        self._loop.add_reader(self._fd, self._readable)

    @classmethod
    async def open(cls, host: str | None, port: int, receive: Receive, on_error: Callable[[], None]) -> UdpBind:
        sock = udp_socket(host, port, SOCKET_BUFFER)
        sock.setblocking(False)
        return cls(sock, receive, on_error)

    def sendto(self, data: bytes, addr: Addr) -> None:
        """Send one datagram; a full buffer or an unreachable address loses it, as the network would."""
        try:
            self.sock.sendto(data, addr)
        except OSError as exc:
            if exc.errno == errno.EMSGSIZE:
                self._too_big(addr)  # longer than the route's MTU: this one is lost, the next fit
            else:
                self.on_error()

    def send_probe(self, data: bytes, addr: Addr) -> None:
        """Send a path MTU probe whole, with DF set, even where the kernel learned a smaller MTU
        (it would fragment it, and a fragmented probe proves nothing); too big locally: lost."""
        opts = [(socket.IPPROTO_IP, IP_MTU_DISCOVER)]
        if self.family == socket.AF_INET6:
            opts.append((socket.IPPROTO_IPV6, IPV6_MTU_DISCOVER))
        for level, opt in opts:
            self.sock.setsockopt(level, opt, PMTUDISC_PROBE)
        try:
            self.sock.sendto(data, addr)
        except OSError:
            pass  # EMSGSIZE (larger than our own link) or unreachable: the probe is simply not answered
        finally:
            for level, opt in opts:
                self.sock.setsockopt(level, opt, PMTUDISC_WANT)

    def route_mtu(self, addr: Addr) -> int | None:
        """The kernel's MTU towards `addr`: the local route's, or smaller if ICMP taught it one."""
        probe = socket.socket(self.family, socket.SOCK_DGRAM)
        try:
            probe.connect(addr)
            if self.family == socket.AF_INET6:
                return probe.getsockopt(socket.IPPROTO_IPV6, IPV6_MTU)
            return probe.getsockopt(socket.IPPROTO_IP, IP_MTU)
        except OSError:
            return None
        finally:
            probe.close()

    def _too_big(self, addr: Addr) -> None:
        """Count a send refused for size, say so once, and tell the endpoint (its path MTU
        search then finds the size that fits)."""
        self.emsgsize += 1
        if self.emsgsize == 1:
            log.warning(
                "datagrams to %s are longer than the route's MTU (EMSGSIZE): batches go out one "
                "datagram at a time and the tunnel's path MTU is searched again",
                addr[0],
            )
        if self.on_too_big is not None:
            self.on_too_big(addr)

    def sendto_via(self, data: bytes, addr: Addr, ifindex: int) -> None:
        """Send one datagram out of interface `ifindex` (IP_PKTINFO / IPV6_PKTINFO), from the same
        port: the NAT behind that uplink maps it as it will map our traffic once the kernel routes
        through it (node/uplinks.py). Errors lose it, as the network would."""
        if self.family == socket.AF_INET6:
            # Source address "any"; towards IPv4 (v4-mapped) the kernel wants it v4-mapped too.
            src = _ANY4_MAPPED if addr[0].startswith("::ffff:") else bytes(16)
            cmsg = (socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, src + ifindex.to_bytes(4, sys.byteorder))
        else:
            cmsg = (socket.IPPROTO_IP, IP_PKTINFO, ifindex.to_bytes(4, sys.byteorder) + bytes(8))
        try:
            self.sock.sendmsg([data], [cmsg], 0, addr)
        except OSError:
            self.on_error()

    def send_batch(self, items: list[tuple[bytes, Addr]]) -> None:
        """Send datagrams in order; runs of equal size to one address go out in one GSO sendmsg
        (the last of a run may be shorter, as GSO allows)."""
        i, n = 0, len(items)
        while i < n:
            data, addr = items[i]
            size = len(data)
            j, total = i + 1, size
            while (
                j < n
                and self.gso
                and j - i < udpgso.GSO_MAX_SEGMENTS
                and items[j][1] == addr
                and len(items[j - 1][0]) == size
                and len(items[j][0]) <= size
                and total + len(items[j][0]) <= udpgso.GSO_MAX_BYTES
            ):
                total += len(items[j][0])
                j += 1
            if j - i == 1:
                self.sendto(data, addr)
            else:
                self._send_gso([d for d, _ in items[i:j]], size, addr)
            i = j

    def send_run(self, buf: memoryview, ends: list[int], addr: Addr) -> None:
        """Send the datagrams laid one after the other in `buf`, ending at `ends` (all of one size
        but the last, which may be shorter), in one GSO sendmsg straight from `buf`."""
        if len(ends) == 1 or not self.gso or not self._gso([buf[: ends[-1]]], ends[0], addr):
            start = 0
            for end in ends:
                self.sendto(buf[start:end], addr)
                start = end

    def _send_gso(self, datagrams: list[bytes], size: int, addr: Addr) -> None:
        # One iovec per datagram: the kernel gathers them (no 64 KB join here).
        if not self._gso(datagrams, size, addr):
            for d in datagrams:
                self.sendto(d, addr)

    def _gso(self, buffers: list, size: int, addr: Addr) -> bool:
        """One GSO sendmsg of `buffers`, cut every `size` bytes; False if the datagrams must go
        one by one instead (too long for the route's MTU, or no UDP GSO here)."""
        try:
            udpgso.send_gso(self.sock, buffers, size, addr)
        except OSError as exc:
            if exc.errno == errno.EMSGSIZE:
                # A segment longer than the route's MTU (ICMP taught the kernel a smaller path MTU,
                # or the uplink is smaller): never drop the batch, send it one datagram at a time.
                self._too_big(addr)
                return False
            if exc.errno in udpgso.NO_GSO_ERRNOS:
                self.gso = False  # no UDP GSO on this kernel or path: one sendto each from now on
                return False
            self.on_error()
        return True

    def _readable(self) -> None:
        recv_into, view, receive, run = self.sock.recvmsg_into, self._view, self.receive, self.receive_run
        gro_segment, space = udpgso.gro_segment, udpgso.GRO_CMSG_SPACE
        for _ in range(RECV_BATCH):
            try:
                n, anc, _flags, addr = recv_into([view], space)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.on_error()
                return
            seg = gro_segment(anc) if anc else 0
            if run is not None:
                run(view, n, seg if seg and n > seg else n, addr)
            elif seg and n > seg:
                for off in range(0, n, seg):
                    receive(bytes(view[off : min(off + seg, n)]), addr)
            else:
                receive(bytes(view[:n]), addr)

    def close(self) -> None:
        if self._fd >= 0:
            self._loop.remove_reader(self._fd)
            self._fd = -1
            self.sock.close()


def _is_v6(addr: Addr) -> bool:
    """`addr` is an IPv6 address (not an IPv4-mapped one): its outer header is 40 bytes, not 20."""
    return ":" in addr[0] and not addr[0].startswith("::ffff:")


class Endpoint:
    """One datagram socket, many tunnels keyed by path ID."""

    def __init__(
        self,
        static_key: coincurve.PrivateKey,
        *,
        config: TunnelConfig | None = None,
        rand: Rand = os.urandom,
        clock: Clock = SYSTEM,
        binder: Binder = UdpBind.open,
    ) -> None:
        self.static_key = static_key
        self.config = config or TunnelConfig()
        self.rand = rand
        self.clock = clock
        self.now = clock.now  # every timer runs on the monotonic clock
        self.binder = binder
        self.sessions: dict[bytes, Session] = {}
        self.channels: dict[bytes, Channel] = {}
        self.pmtu: dict[bytes, PathMtu] = {}  # path MTU of each established path (§7 "Path MTU")
        self._early: dict[bytes, tuple[float, bytes, Addr]] = {}  # path → (when, Request, from): EARLY_REQUEST_S
        self._stats: dict[str, int] = dict.fromkeys(
            (
                "tx_control",
                "drop_short",
                "drop_unknown_type",
                "drop_unknown_path",
                "early_requests",
                "socket_errors",
                "send_errors",
                "rebinds",
            ),
            0,
        )
        self.rx_datagrams = 0  # hot counter, merged into `stats`
        self.bind: Bind | None = None
        # Relays reached over a TCP stream instead of UDP (§8.4), by the relay's UDP address
        self.streams: dict[Addr, RelayStream] = {}
        self._batch: list[tuple[bytes, Addr]] | None = None  # data packets held by hold() until flush()
        # send_segments seals a GSO run here: 64 KB holds the longest datagram, or a run of GSO_MAX_BYTES
        self._out = memoryview(bytearray(udpgso.RECV_BUFFER))
        # Datagrams that are not tunnel packets (e.g. the DC's keepalive replies) go here.
        self.on_control: Callable[[bytes, Addr], None] | None = None
        # ... except those whose first byte is a key here (the standby probe replies: node/standby.py).
        self.control_taps: dict[int, Callable[[bytes, Addr], None]] = {}
        # Authenticated STANDBY packets (path ID, event): node/standby.py keeps standby paths with them.
        self.on_standby: Callable[[bytes, Standby], None] | None = None
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
        clock: Clock = SYSTEM,
        binder: Binder = UdpBind.open,
    ) -> Endpoint:
        """Bind (host None: `[::]` dual-stack, else `0.0.0.0`) and start the timer task."""
        ep = cls(static_key, config=config, rand=rand, clock=clock, binder=binder)
        await ep._bind(host, port)
        ep._wake = asyncio.Event()
        ep._timer_task = asyncio.get_running_loop().create_task(ep._timer_loop())
        return ep

    async def _bind(self, host: str | None, port: int) -> None:
        self.flush()  # what is held goes out of the old socket
        bind = await self.binder(host, port, self._on_datagram, self._socket_error)
        old, self.bind = self.bind, bind
        self.family = bind.family
        if hasattr(bind, "on_too_big"):
            bind.on_too_big = self._refused_for_size
        if hasattr(bind, "receive_run") and getattr(bind, "receive", None) == self._on_datagram:
            bind.receive_run = self._on_run  # whole reads to us (a binder that wraps receive keeps it)
        self._install_sender()
        if old is not None:
            old.close()

    def _install_sender(self) -> None:
        """Packets go straight to the socket, or, for relays reached over a stream, into it."""
        udp = self.bind.sendto  # type: ignore[union-attr]
        streams = self.streams
        if not streams:
            self._sendto_raw = udp  # the hot path: nothing in between
            return

        def send(data: bytes, addr: Addr) -> None:
            stream = streams.get(addr)
            if stream is None:
                udp(data, addr)
            else:
                stream.send(data)

        self._sendto_raw = send

    def _use_stream(self, relay: Addr, urls: list[str]) -> None:
        if relay not in self.streams:
            self.streams[relay] = RelayStream(relay, urls, self._on_datagram)
            self._install_sender()

    def _release_streams(self) -> None:
        """Close the streams no session's relay uses any more."""
        used = {s.relay.addr for s in self.sessions.values() if s.relay is not None}
        for addr in [a for a in self.streams if a not in used]:
            self.streams.pop(addr).stop()
            self._install_sender()

    def leave_streams(self) -> None:
        """UDP gets out again: close every relay stream and rebind the relayed sessions from the
        UDP socket (the relay moves their side there after one cookie round trip, §8.2)."""
        if not self.streams:
            return
        for stream in self.streams.values():
            stream.stop()
        self.streams.clear()
        self._install_sender()
        now = self.now()
        for s in self.sessions.values():
            if s.relay_active:
                s.local_address_changed(now)
                self._flush(s.datagrams_to_send())

    def transport(self, s: Session) -> str:
        """How this session's packets leave: "tcp" (a relay over a stream) or "udp"."""
        on_relay = s.relay is not None and s.peer_addr == s.relay.addr
        return "tcp" if on_relay and s.relay.addr in self.streams else "udp"  # type: ignore[union-attr]

    def _socket_error(self) -> None:
        self._stats["socket_errors"] += 1

    @property
    def stats(self) -> dict[str, int]:
        """Endpoint counters: datagrams received, control datagrams sent, drops before a session."""
        return {**self._stats, "rx_datagrams": self.rx_datagrams}

    @property
    def local_addr(self) -> Addr:
        assert self.bind is not None
        return self.bind.local_addr

    async def rebind(self, host: str | None = None, port: int = 0) -> None:
        """Move to a new local socket, keeping every session (keys, counters, peers).

        Each established session immediately sends an authenticated keepalive (and a relay bind
        when on the relay) from the new socket, so peers follow without a new handshake.
        """
        await self._bind(host, port)
        self._stats["rebinds"] += 1
        now = self.now()
        for s in self.sessions.values():
            self._renormalize(s)
            s.local_address_changed(now)
            self._flush(s.datagrams_to_send())
        self.paths_changed()

    def _renormalize(self, s: Session) -> None:
        fam = self.family
        if s.peer_addr is not None:
            s.peer_addr = for_socket(s.peer_addr, fam)
        s.candidates = [for_socket(a, fam) for a in s.candidates]
        if s.relay is not None:
            s.relay = replace(s.relay, addr=for_socket(s.relay.addr, fam))

    async def open(
        self,
        path_id: bytes,
        peer_id: bytes,
        peer_pub: bytes,
        candidates: Sequence[Addr] = (),
        role: str = "initiate",
        relay: RelayInfo | None = None,
        timeout: float = OPEN_TIMEOUT,
        unverified: Sequence[Addr] = (),
        relay_stream: Sequence[str] = (),
    ) -> Channel:
        """Open the tunnel `path_id` and wait for its handshake.

        role "initiate": send Tunnel Requests to every candidate (in order) every 250 ms, first
        Response wins. "wait": answer the peer's Request. "punch": both (lower node ID wins a
        collision). With `relay`, after RELAY_FALLBACK_AFTER without a handshake the session
        binds at the relay and also tries through it. `relay_stream`: reach that relay over these
        WebSocket URLs (in turn) instead of UDP (§8.4: our network lets no UDP out). Raises TunnelError on
        timeout and PeerIdentityError if peer_pub does not belong to peer_id.
        """
        path_id = bytes(path_id)
        if path_id in self.sessions:
            raise TunnelError(f"path {path_id.hex()} is already open")
        s = Session(
            self.static_key,
            peer_id,
            peer_pub,
            path_id,
            role=role,
            candidates=list(candidates),
            unverified=list(unverified),
            relay=relay,
            config=self.config,
            rand=self.rand,
            wall=self.clock.wall,
        )
        self._renormalize(s)
        if relay_stream and s.relay is not None:
            self._use_stream(s.relay.addr, list(relay_stream))
        ch = Channel(self, s)
        self.sessions[path_id] = s
        self.channels[path_id] = ch
        s.start(self.now())
        self._flush(s.poll(self.now()))
        early = self._early.pop(path_id, None)
        if early is not None and self.now() - early[0] <= EARLY_REQUEST_S:
            self._stats["early_requests"] += 1
            self._on_datagram(early[1], early[2])
        self._kick()
        try:
            await asyncio.wait_for(asyncio.shield(ch.ready), timeout)
        except (asyncio.TimeoutError, TimeoutError):
            self.remove(path_id)
            raise TunnelError(f"no tunnel handshake on path {path_id.hex()} within {timeout} s") from None
        except BaseException:
            self.remove(path_id)
            raise
        return ch

    def remove(self, path_id: bytes) -> None:
        """Forget a path (its channel counts as closed); its packets are dropped from now on."""
        s = self.sessions.pop(path_id, None)
        ch = self.channels.pop(path_id, None)
        self.pmtu.pop(path_id, None)
        if ch is not None:
            ch.closed = True
        if s is not None and s.relay is not None and self.streams:
            self._release_streams()

    async def close(self) -> None:
        if self._timer_task is not None:
            self._timer_task.cancel()
            try:
                await self._timer_task
            except asyncio.CancelledError:
                pass
        for pid, s in list(self.sessions.items()):
            self.send_close(s)
            self.remove(pid)
        if self.bind is not None:
            self.bind.close()

    # --- what channels ask for ------------------------------------------------------------------
    def hold(self) -> None:
        """Keep data packets until flush(): a caller with many at once (the TUN reader) lets the
        socket send runs of them with one system call (UDP GSO)."""
        if self._batch is None:
            self._batch = []

    def flush(self) -> None:
        batch, self._batch = self._batch, None
        if batch:
            assert self.bind is not None
            if self.streams:  # packets for stream relays leave through their streams
                streams = self.streams
                for data, addr in batch:
                    if addr in streams:
                        streams[addr].send(data)
                batch = [item for item in batch if item[1] not in streams]
            self.bind.send_batch(batch)

    def send_data(self, s: Session, data: bytes) -> None:
        pkt = s.encrypt(data, self.now())
        if self._batch is not None:
            self._batch.append((pkt, s.peer_addr))
        else:
            self._sendto_raw(pkt, s.peer_addr)
        if s.has_output:  # a count-triggered rekey Request
            self._flush(s.datagrams_to_send())

    def send_segments(self, s: Session, buf: bytearray | memoryview, segments: Segments, per_send: int) -> None:
        """send_data for each packet `buf[a:b]` that `segments` yields (a TUN super-packet's, cut in
        place by ntm/offload.split_into: all of one length but the last, at most `per_send` of them
        in a GSO send: udpgso.segments_per_send), sealed straight into one send buffer and sent in
        runs of one GSO sendmsg each: no bytes object per packet. What a caller holds goes first (the
        wire keeps the counters' order). TunnelError as Session.encrypt_segments (the segments not
        sent stay in `segments`)."""
        assert self.bind is not None
        if self._batch:
            self.flush()
            self.hold()
        src, out, addr, now = memoryview(buf), self._out, s.peer_addr, self.now()
        stream = self.streams.get(addr) if self.streams else None  # type: ignore[arg-type]
        while True:
            ends = s.encrypt_segments(segments, src, out, now, per_send)
            if not ends:
                return
            if stream is not None:  # a relay reached over a stream: one frame per datagram
                for start, end in zip([0, *ends], ends):
                    stream.send(bytes(out[start:end]))
            else:
                self.bind.send_run(out, ends, addr)  # type: ignore[arg-type]
            if s.has_output:  # a count-triggered rekey Request
                self._flush(s.datagrams_to_send())

    def send_ping(self, s: Session) -> None:
        self._sendto(s.ping(self.now()), s.peer_addr)

    def send_close(self, s: Session) -> None:
        pkt = s.close_packet(self.now())
        if pkt is not None:
            self._sendto(pkt, s.peer_addr)

    def send_standby(self, s: Session, payload: bytes, addr: Addr, ifindex: int | None) -> None:
        """A STANDBY on `s` to `addr`, out of interface `ifindex` if given (a standby uplink).
        TunnelError if the session has no keys."""
        pkt = s.standby(payload, self.now())
        if ifindex is None:
            self._sendto(pkt, addr)
        else:
            self.send_control_via(pkt, addr, ifindex)

    def send_control_via(self, data: bytes, addr: Addr, ifindex: int) -> None:
        """A datagram out of interface `ifindex`, from the tunnel socket (a bind without
        `sendto_via`, e.g. the in-memory one, drops it: it has no interfaces)."""
        via = getattr(self.bind, "sendto_via", None)
        if via is None:
            self._stats["send_errors"] += 1
            return
        via(data, for_socket(addr, self.family), ifindex)
        self._stats["tx_control"] += 1

    def send_control(self, data: bytes, addr: Addr) -> None:
        """Send a non-tunnel datagram (keepalive to the DC) from the tunnel socket, so the DC sees
        the same NAT mapping the peers will use."""
        self._sendto(data, for_socket(addr, self.family))

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
            elif data[0] in self.control_taps:
                self.control_taps[data[0]](data, addr[:2])
            elif data[0] not in KNOWN_TYPES and self.on_control is not None:
                self.on_control(data, addr[:2])  # not a tunnel packet: e.g. the DC's keepalive reply
            elif data[0] == TYPE_HANDSHAKE_REQUEST:
                self._keep_early(bytes(pid), bytes(data), addr[:2])
            else:
                self._stats["drop_unknown_type" if data[0] not in KNOWN_TYPES else "drop_unknown_path"] += 1
            return
        if len(addr) > 2:
            addr = addr[:2]
        events = s.receive(data, addr, self.now())
        if s.has_output:
            self._flush(s.datagrams_to_send())
        if not events:
            return
        ch = self.channels.get(pid)
        if ch is None:
            return
        if len(events) == 1 and type(events[0]) is Data:  # the common case
            ch.inbox.deliver(events[0].payload)
            return
        self._events(pid, s, ch, events)

    def _on_run(self, buf: memoryview, n: int, seg: int, addr: Addr) -> None:
        """One read: `buf[:n]`, datagrams of `seg` bytes (the last maybe shorter; a GRO run of one
        sender). One clock read for all; each session's DATA packets in a row are decrypted in place
        and handed to its channel in one call (Session.receive_run); anything else goes as from
        _on_datagram."""
        if len(addr) > 2:
            addr = addr[:2]
        if not n:
            self._on_datagram(b"", addr)  # an empty datagram is still one (counted as short)
            return
        now, sessions, off = self.now(), self.sessions, 0
        while off < n:
            s = sessions.get(bytes(buf[off + 1 : off + PREFIX_LEN])) if n - off >= PREFIX_LEN else None
            if s is None:
                stop = min(off + seg, n)
                self._on_datagram(bytes(buf[off:stop]), addr)
                off = stop
                continue
            payloads, events, stop = s.receive_run(buf, off, n, seg, addr, now)
            self.rx_datagrams += (stop - off + seg - 1) // seg
            off = stop
            if s.has_output:
                self._flush(s.datagrams_to_send())
            ch = self.channels.get(s.path_id)
            if ch is not None:
                if payloads:
                    ch.inbox.deliver_many(payloads)
                if events:
                    self._events(s.path_id, s, ch, events)

    def _events(self, pid: bytes, s: Session, ch: Channel, events: list) -> None:
        """Act on a session's events for its channel, in order."""
        for ev in events:
            if type(ev) is Data:
                ch.inbox.deliver(ev.payload)
            elif type(ev) is HandshakeDone:
                ch.handshake_done(ev)
                if not ev.rekey:
                    self.pmtu[pid] = PathMtu(self.now(), start=self._kernel_mtu(s))
                self._kick()
            elif type(ev) is ProbeAck:
                pm = self.pmtu.get(pid)
                if pm is not None:
                    pm.ack(int.from_bytes(ev.probe_id, "big"), self.now())
            elif type(ev) is EndpointChanged:
                self._path_changed(pid)
            elif type(ev) is Pong:
                ch.pong(ev.rtt)
            elif type(ev) is PeerClosed:
                self.remove(pid)
                ch.peer_closed()
            elif type(ev) is Standby and self.on_standby is not None:
                self.on_standby(pid, ev)
            # RelayBound: visible in session.peer_addr and stats

    def _keep_early(self, pid: bytes, data: bytes, addr: Addr) -> None:
        """A Tunnel Request for a path not open (yet): kept for open() (EARLY_REQUEST_S), bounded."""
        self._stats["drop_unknown_path"] += 1  # as before, unless open() takes it
        self._early.pop(pid, None)
        if len(self._early) >= EARLY_REQUESTS_MAX:
            del self._early[next(iter(self._early))]
        self._early[pid] = (self.now(), data, addr)

    # --- path MTU (§7 "Path MTU") ----------------------------------------------------------------
    def inner_mtu(self, s: Session) -> int:
        """The largest inner packet that crosses this session's path in one datagram. On a relay
        reached over a stream the path is the relay's UDP leg to the peer (the stream carries any
        size): its probes cross it as over UDP, sized for the relay address's family (§8.4)."""
        pm = self.pmtu.get(s.path_id)
        if pm is None or s.peer_addr is None:
            return inner_mtu(MAX_MTU, ipv6=True)
        return inner_mtu(pm.mtu, ipv6=_is_v6(s.peer_addr))

    def mtu_status(self, s: Session) -> dict:
        """The session's path MTU in use (outer IP packet size; None before its handshake), the
        inner MTU it leaves, how long its latest search took to settle and how long ago that was
        (None: still searching)."""
        pm = self.pmtu.get(s.path_id)
        row = {"path_mtu": None, "inner_mtu": self.inner_mtu(s), "mtu_search_s": None, "mtu_age_s": None}
        if pm is not None:
            row["path_mtu"] = pm.mtu
            if pm.settled_s is not None and pm.settled_at is not None:
                row["mtu_search_s"] = round(pm.settled_s, 3)
                row["mtu_age_s"] = round(self.now() - pm.settled_at, 3)
        return row

    def paths_changed(self) -> None:
        """We moved (new address, another uplink): every path's MTU is searched again."""
        for pid in self.pmtu:
            self._path_changed(pid)

    def _path_changed(self, pid: bytes) -> None:
        pm = self.pmtu.get(pid)
        s = self.sessions.get(pid)
        if pm is not None and s is not None:
            pm.restart(self.now(), hint=self._kernel_mtu(s))
            self._kick()

    def _kernel_mtu(self, s: Session) -> int | None:
        """The kernel's MTU towards the session's peer over UDP (the local route's, or what ICMP
        taught it); None on a stream or a bind that cannot tell."""
        route_mtu = getattr(self.bind, "route_mtu", None)
        if route_mtu is None or s.peer_addr is None or self.transport(s) != "udp":
            return None
        return route_mtu(s.peer_addr)

    def _refused_for_size(self, addr: Addr) -> None:
        """The kernel refused a datagram to `addr` for size: the paths there have a smaller MTU,
        used at once (until the probes settle) so the next batches fit and go out whole again."""
        for pid, s in self.sessions.items():
            pm = self.pmtu.get(pid)
            if pm is not None and s.peer_addr == addr:
                pm.hint(self._kernel_mtu(s), self.now())
        self._kick()

    def _poll_pmtu(self, pid: bytes, pm: PathMtu, now: float) -> float | None:
        """Run one path's probe timers: send its due probes (the kernel's MTU towards the peer is
        read first, as a hint); returns when it wants to run next."""
        t = pm.next_timer()
        s = self.sessions.get(pid)
        if t is None or t > now or s is None or s.peer_addr is None or not s.established:
            return t
        addr = s.peer_addr
        pm.rtt = s.rtt
        pm.hint(self._kernel_mtu(s), now)
        send = getattr(self.bind, "send_probe", None) if self.transport(s) == "udp" else None
        header = (40 if _is_v6(addr) else 20) + 8  # outer IP + UDP
        for probe_id, size in pm.poll(now, s.tx_data):
            try:
                pkt = s.mtu_probe(probe_id.to_bytes(8, "big"), 0 if size == CONTROL else size - header, now)
            except TunnelError:
                break
            if send is not None:
                send(pkt, addr)
            else:
                self._sendto(pkt, addr)
        return pm.next_timer()

    async def _timer_loop(self) -> None:
        assert self._wake is not None
        while True:
            now = self.now()
            nxt: float | None = None
            for s in list(self.sessions.values()):
                t = s.next_timer()
                if t is not None and t <= now:
                    self._flush(s.poll(now))
                    t = s.next_timer()
                if t is not None and (nxt is None or t < nxt):
                    nxt = t
            for pid, pm in list(self.pmtu.items()):
                t = self._poll_pmtu(pid, pm, now)
                if t is not None and (nxt is None or t < nxt):
                    nxt = t
            delay = MAX_TIMER_SLEEP if nxt is None else min(max(nxt - now, 0.002), MAX_TIMER_SLEEP)
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), delay)
            except (asyncio.TimeoutError, TimeoutError):
                pass


__all__ = ["Bind", "Channel", "DEFAULT_PORT", "Endpoint", "RelayInfo", "TunnelConfig", "TunnelError", "UdpBind"]
