"""What an application holds for a tunnel: one interface, two implementations.

`Channel` is one path (one `ntm.tunnel.Session` on the endpoint's socket). `Link` is a tunnel to
one peer that survives path changes: the agent attaches new Channels under it and it keeps
receiving on the older ones for a while. Both implement `TunnelChannel`, and both receive through
one `Inbox`, so a fix to delivery is made once.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable, Iterator, Protocol

from ntm.clock import Clock
from ntm.offload import Stretch
from ntm.tunnel import Addr, HandshakeDone, Session, TunnelError

Receiver = Callable[[bytes], None]
#: Takes the payloads of one read (a GRO run) in one call: no per-packet call chain.
ManyReceiver = Callable[[list[bytes]], None]
#: Where the packets of a buffer are, each valid until the next is asked for (ntm/offload.split_into).
Segments = Iterator[tuple[int, int] | Stretch]


def forward(to: str, name: str, doc: str | None = None) -> Any:
    """A read-only property giving `self.<to>.<name>`: what a wrapper shows of the part it wraps."""
    return property(lambda self: getattr(getattr(self, to), name), doc=doc)


class PathSender(Protocol):
    """What a Channel asks of its endpoint (node/endpoint.py's Endpoint)."""

    def send_data(self, s: Session, data: bytes) -> None: ...
    def send_segments(self, s: Session, buf: bytearray | memoryview, segments: Segments, per_send: int) -> None: ...
    def send_ping(self, s: Session) -> None: ...
    def send_close(self, s: Session) -> None: ...
    def remove(self, path_id: bytes) -> None: ...
    def inner_mtu(self, s: Session) -> int: ...


class TunnelChannel(Protocol):
    """The application's view of a tunnel (plain path or surviving link)."""

    @property
    def path_id(self) -> bytes: ...
    @property
    def peer_id(self) -> bytes: ...
    @property
    def peer_addr(self) -> Addr | None: ...
    @property
    def via(self) -> str | None: ...
    @property
    def rtt(self) -> float | None: ...
    @property
    def stats(self) -> dict[str, int]: ...
    @property
    def established(self) -> bool: ...
    @property
    def inner_mtu(self) -> int: ...

    def send_nowait(self, data: bytes) -> None: ...
    def send_segments(self, buf: bytearray | memoryview, segments: Segments) -> None: ...
    async def send(self, data: bytes) -> None: ...
    async def recv(self) -> bytes: ...
    def set_receiver(self, callback: Receiver | None, many: ManyReceiver | None = None) -> None: ...
    async def ping(self, timeout: float = 2.0) -> float: ...
    async def close(self) -> None: ...


class Inbox:
    """Received payloads: handed to a receiver callback when one is set, else queued for recv().

    A `None` in the queue is the wake-up for a recv() waiting when the tunnel ends.
    """

    __slots__ = ("_queue", "_receiver", "_many")

    def __init__(self) -> None:
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._receiver: Receiver | None = None
        self._many: ManyReceiver | None = None

    def deliver(self, payload: bytes) -> None:
        if self._receiver is not None:
            self._receiver(payload)
        else:
            self._queue.put_nowait(payload)

    def deliver_many(self, payloads: list[bytes]) -> None:
        """deliver() each of `payloads`, in order (in one call to the receiver's `many` if it has one)."""
        if self._many is not None:
            self._many(payloads)
        else:
            for payload in payloads:
                self.deliver(payload)

    def set_receiver(self, callback: Receiver | None, many: ManyReceiver | None = None) -> None:
        """Deliver to `callback` from now on (a run of payloads to `many`, if given: it must do
        what `callback` does to each). Payloads that arrived before it was set (the peer may send
        the moment the handshake is done) are handed to it first, in order."""
        self._receiver = callback
        self._many = many if callback is not None else None
        while callback is not None and not self._queue.empty():
            payload = self._queue.get_nowait()
            if payload is not None:
                callback(payload)

    async def recv(self, closed: bool, closed_reason: str) -> bytes:
        if closed and self._queue.empty():
            raise TunnelError(closed_reason)
        payload = await self._queue.get()
        if payload is None:
            raise TunnelError("the peer closed the tunnel")
        return payload

    def wake(self) -> None:
        """The tunnel ended: a recv() that is waiting raises instead of hanging."""
        if self._receiver is None:
            self._queue.put_nowait(None)


class Channel:
    """One path: the application side of one Session on the endpoint's socket."""

    def __init__(self, endpoint: PathSender, session: Session) -> None:
        self.endpoint = endpoint
        self.session = session
        self.inbox = Inbox()
        self.ready: asyncio.Future[HandshakeDone] = asyncio.get_running_loop().create_future()
        self._pongs: list[asyncio.Future[float]] = []
        self.closed = False
        self.closed_by_peer = False

    # -- info (TunnelChannel): read from the session --
    path_id = forward("session", "path_id")
    peer_id = forward("session", "peer_id")
    peer_addr = forward("session", "peer_addr")
    via = forward("session", "via", 'The path in use: "candidate:<i>" or "peer" (direct), or "relay".')
    rtt = forward("session", "rtt", "Last round-trip time in seconds (handshake, then each ping).")
    stats = forward("session", "stats")
    established = forward("session", "established")

    @property
    def last_heard(self) -> float:
        """When an authenticated packet last arrived on this path (0.0: never)."""
        return self.session.last_received or 0.0

    @property
    def inner_mtu(self) -> int:
        """The longest inner packet this path carries in one datagram (its probed path MTU, §7 "Path MTU")."""
        return self.endpoint.inner_mtu(self.session)

    # -- data --
    def send_nowait(self, data: bytes) -> None:
        """Encrypt and send one datagram now; TunnelError if the tunnel has no keys."""
        if self.closed:
            raise TunnelError("channel is closed")
        self.endpoint.send_data(self.session, data)

    def send_segments(self, buf: bytearray | memoryview, segments: Segments, per_send: int) -> None:
        """send_nowait for each packet `buf[a:b]` that `segments` yields, in one call (a TUN
        super-packet cut in place: Endpoint.send_segments)."""
        if self.closed:
            raise TunnelError("channel is closed")
        self.endpoint.send_segments(self.session, buf, segments, per_send)

    async def send(self, data: bytes) -> None:
        self.send_nowait(data)

    async def recv(self) -> bytes:
        """Next payload received (in arrival order)."""
        return await self.inbox.recv(
            self.closed, "the peer closed the tunnel" if self.closed_by_peer else "channel is closed"
        )

    def set_receiver(self, callback: Receiver | None, many: ManyReceiver | None = None) -> None:
        """Deliver payloads to `callback` instead of the recv() queue (fast path; runs to `many`)."""
        self.inbox.set_receiver(callback, many)

    async def ping(self, timeout: float = 2.0) -> float:
        """Send a PING and wait for its PONG; returns the RTT in seconds."""
        fut: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._pongs.append(fut)
        self.endpoint.send_ping(self.session)
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            if fut in self._pongs:
                self._pongs.remove(fut)

    async def close(self) -> None:
        """Close the tunnel and tell the peer (authenticated CLOSE), so it does not try to repair it."""
        if not self.closed:
            self.endpoint.send_close(self.session)
        self.endpoint.remove(self.session.path_id)
        self.closed = True

    # -- events from the endpoint --
    def handshake_done(self, ev: HandshakeDone) -> None:
        if not self.ready.done():
            self.ready.set_result(ev)

    def pong(self, rtt: float) -> None:
        for fut in self._pongs:
            if not fut.done():
                fut.set_result(rtt)
        self._pongs.clear()

    def peer_closed(self) -> None:
        self.closed = self.closed_by_peer = True
        self.inbox.wake()


class Link:
    """A tunnel to one peer that survives the agent swapping the path under it.

    Sends go to the current path; what arrives on any attached path ends up in one Inbox.
    `clock` is the agent's: `last_app` and `switched_at` (its monotonic time) feed liveness decisions.
    """

    def __init__(self, channel: Channel, clock: Clock) -> None:
        self.clock = clock
        self.channels: list[Channel] = []
        self.current: Channel = channel
        self.inbox = Inbox()
        self.last_app = clock.now()  # last application send or receive (liveness: "in use")
        self.switched_at = 0.0
        self.closed = False
        self.attach(channel)

    # -- paths --
    def attach(self, channel: Channel) -> None:
        """Send on `channel` from now on; keep receiving on the older paths too."""
        channel.set_receiver(self._deliver, self._deliver_many)
        if channel not in self.channels:
            self.channels.append(channel)
        self.current = channel
        self.switched_at = self.clock.now()

    def detach(self, channel: Channel) -> None:
        if channel in self.channels and channel is not self.current:
            self.channels.remove(channel)

    @property
    def last_heard(self) -> float:
        """When an authenticated packet last arrived on any path (or the last switch)."""
        return max([self.switched_at, *(c.last_heard for c in self.channels)])

    # -- TunnelChannel: info of the current path --
    path_id = forward("current", "path_id")
    peer_id = forward("current", "peer_id")
    peer_addr = forward("current", "peer_addr")
    via = forward("current", "via")
    rtt = forward("current", "rtt")
    stats = forward("current", "stats")
    established = forward("current", "established")
    inner_mtu = forward("current", "inner_mtu")

    def send_nowait(self, data: bytes) -> None:
        if self.closed:
            raise TunnelError("tunnel is closed")
        self.last_app = self.clock.now()
        self.current.send_nowait(data)

    def send_segments(self, buf: bytearray | memoryview, segments: Segments, per_send: int) -> None:
        if self.closed:
            raise TunnelError("tunnel is closed")
        self.last_app = self.clock.now()
        self.current.send_segments(buf, segments, per_send)

    async def send(self, data: bytes) -> None:
        self.send_nowait(data)

    async def recv(self) -> bytes:
        return await self.inbox.recv(self.closed, "tunnel is closed")

    def set_receiver(self, callback: Receiver | None, many: ManyReceiver | None = None) -> None:
        self.inbox.set_receiver(callback, many)

    async def ping(self, timeout: float = 2.0) -> float:
        return await self.current.ping(timeout)

    async def close(self) -> None:
        self.closed = True
        for ch in self.channels:
            await ch.close()

    def peer_closed(self) -> None:
        """The peer closed the current path on purpose: the Link ends; a waiting recv() wakes."""
        self.closed = True
        self.inbox.wake()

    def _deliver(self, payload: bytes) -> None:
        self.last_app = self.clock.now()
        self.inbox.deliver(payload)

    def _deliver_many(self, payloads: list[bytes]) -> None:
        self.last_app = self.clock.now()  # one clock read per run
        self.inbox.deliver_many(payloads)
