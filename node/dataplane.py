"""The daemon's data plane: packets between the TUN interface and the peers' tunnels.

A packet read from TUN names a peer (ntm/overlay.py); its tunnel carries it, or is opened on
demand (Direction Request → Route Direction → handshake) while a few packets wait. What arrives
on a tunnel is either an IP packet (checked and translated by the overlay, then written to TUN)
or an application datagram (`ntm send`), kept for `ntm recv`. Without TUN (no root) only
application datagrams flow.

With TUN offloads (daemon/tun.py), a read may be a super-packet: it is split into segments no longer
than the peer's path carries, each sent as its own tunnel packet (the endpoint batches them into
UDP GSO sends). What arrives is collected until the socket is drained (one event-loop turn),
coalesced per TCP flow (ntm/offload.py) and written once per run.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from functools import partial
from ipaddress import IPv4Address, IPv6Address
from typing import Callable

from daemon.service import BackgroundTasks
from node.agent import Node, NodeError, Tunnel
from daemon.tun import Tun
from daemon.udpgso import segments_per_send
from ntm import keys
from ntm.addr import display
from ntm.errors import NtmError
from ntm.packet import MIN_TRANSPORT_LEN
from ntm.offload import (
    GSO_TCPV4,
    GSO_TCPV6,
    VNET_HDR_LEN,
    OffloadError,
    Coalescer,
    VnetHdr,
    flatten,
    split,
    split_into,
)
from ntm.overlay import (
    IPV6_HEADER,
    KIND_APP,
    KIND_FRAG,
    KIND_GROUP,
    KIND_GROUP_ACK,
    KIND_IPV6,
    KIND_JUNK,
    KIND_VIEW,
    VIEW_CSUM,
    Overlay,
    frame_app,
    frame_group,
    frame_view,
    group_ack,
    kind_of,
    parse_view,
)
from ntm.overlay import QUIC_TO_CLIENT, QUIC_TO_SERVER  # stream packets (node/daemon_streams.py)
from ntm.toobig import SYN_MAX_LEN, Reassembly, clamp_mss, pieces, too_big
from ntm.vaddr import AddressError

log = logging.getLogger("ntm.node")

#: Packets kept per peer while its tunnel opens: a TCP initial window (10 segments) plus a few
#: SYNs and pings; beyond that the application retransmits anyway.
PENDING_PER_PEER = 32
#: Peers whose tunnels may be opening at once (bounds memory for a scan of the address space).
MAX_OPENING = 64
#: After a failed open, packets to that peer are dropped for this long instead of asking again.
OPEN_RETRY_S = 3.0
#: Application datagrams kept for `ntm recv` (oldest dropped first).
APP_INBOX = 256
#: An unacknowledged group datagram goes again after this long (a lost datagram on a live path).
GROUP_RESEND_S = 0.5


class DataPlane:
    def __init__(self, node: Node, overlay: Overlay, tun: Tun | None, echo: bool = False) -> None:
        self.node = node
        self.overlay = overlay
        self.tun = tun
        self.echo = echo
        self.by_peer: dict[bytes, Tunnel] = {}
        self.pending: dict[bytes, deque[bytes]] = {}
        self.failed_at: dict[bytes, float] = {}
        self.inbox: deque[tuple[bytes, bytes]] = deque(maxlen=APP_INBOX)
        self._inbox_event = asyncio.Event()
        self.stats = dict.fromkeys(
            ("queued", "queue_drops", "open_failures", "opens", "app_rx", "junk_rx", "too_big", "offload_errors"), 0
        )
        self._coalescer: Coalescer | None = None  # packets for TUN, written once the socket is drained
        self._run_peer: bytes | None = None  # whose IPv6 packet the coalescer took last (see _from_tunnel_many)
        self._frag_id = 0  # numbers the packets split: IPv6 for a path below 1280 (§10.4), QUIC (§10.9)
        self._reasm: dict[bytes, Reassembly] = {}
        self.tasks = BackgroundTasks()
        self._opening: dict[bytes, asyncio.Task] = {}
        # group datagrams: handed to on_group(peer, data) and acknowledged; our sends wait for acks
        self.on_group: Callable[[bytes, bytes], None] | None = None
        self._acks: dict[tuple[bytes, bytes], asyncio.Future] = {}
        # QUIC packets of streams (node/daemon_streams.py): handed to on_quic(peer, payload)
        self.on_quic: Callable[[bytes, bytes], None] | None = None
        # the IPv4 address each peer with a tunnel says it gives this node (VIEW, §10.2): `ntm status`
        self.seen_as: dict[bytes, IPv4Address] = {}
        # peers whose tunnel said (VIEW_CSUM) that they finish TCP/UDP checksums: segments to them
        # carry partial ones, and nothing here sums a payload (§10.11)
        self.csum_partial: set[bytes] = set()

    def start(self) -> None:
        if self.tun is not None:
            self.tun.start(self.from_tun_vnet if self.tun.vnet else self.from_tun, self.node.endpoint.flush)
        self.tasks.spawn(self._accept_loop())

    async def close(self) -> None:
        await self.tasks.cancel()
        if self.tun is not None:
            self.tun.close()

    # --- TUN → tunnel --------------------------------------------------------------------------
    def from_tun(self, pkt: bytes) -> None:
        """One packet the kernel routed into TUN (the reader flushes the endpoint after a batch)."""
        self.node.endpoint.hold()
        peer = self.overlay.outbound(pkt)
        if peer is not None:
            self._to_peer(peer, pkt)

    def from_tun_vnet(self, buf: memoryview) -> None:
        """One read from an offloading TUN: a virtio-net header and a packet that may stand for
        many (TSO/USO); its segments, no longer than the peer's path carries, go as from_tun's. A
        TCP super-packet to an open tunnel is cut in place in `buf` (the TUN's read buffer) and
        sealed from there (split_into, send_segments): no bytes object per segment."""
        self.node.endpoint.hold()
        peer = self.overlay.outbound(bytes(buf[VNET_HDR_LEN : VNET_HDR_LEN + IPV6_HEADER]))  # reads the headers only
        if peer is None:
            return
        t = self.by_peer.get(peer)
        if t is not None and t.channel.closed:
            t = None
        # No tunnel yet: the kernel's own segment size (the packets wait for the tunnel whole).
        max_len = t.channel.inner_mtu if t is not None else 65535
        try:
            hdr = VnetHdr.unpack(buf)
            if t is not None and hdr.gso_type in (GSO_TCPV4, GSO_TCPV6):
                # a TCP super-packet's segments: each fits the path, none is a SYN (no MSS clamp)
                per_send = segments_per_send(max_len + MIN_TRANSPORT_LEN)
                partial = peer in self.csum_partial
                segments = split_into(hdr, buf, VNET_HDR_LEN, len(buf), max_len, partial, per_send)
                try:
                    t.channel.send_segments(buf, segments, per_send)
                    return
                except NtmError:
                    # keys exhausted or the tunnel just ended: the rest queued, the tunnel reopened
                    for a, b in flatten(segments, buf):
                        self._to_peer(peer, bytes(buf[a:b]))
                    return
            pkts = split(hdr, bytes(buf[VNET_HDR_LEN:]), max_len, peer in self.csum_partial)
        except OffloadError as exc:
            self.stats["offload_errors"] += 1  # the kernel never sends these: count, never raise
            log.debug("TUN read dropped: %s", exc)
            return
        for pkt in pkts:
            self._to_peer(peer, pkt)

    def _to_peer(self, peer: bytes, pkt: bytes) -> None:
        t = self.by_peer.get(peer)
        if t is not None and not t.channel.closed:
            try:
                self._to_tunnel(t, pkt)
                return
            except NtmError:
                pass  # keys exhausted or the tunnel just ended: queue and reopen
        self._queue(peer, pkt)
        self.ensure_open(peer)

    def _to_tunnel(self, t: Tunnel, pkt: bytes) -> None:
        """An IP packet from TUN into `t`: a TCP SYN announces segments that fit the peer's path,
        a packet longer than the path carries is answered or split (§10.4)."""
        if len(pkt) > t.channel.inner_mtu:
            self._too_big(t, pkt)
        else:
            t.channel.send_nowait(clamp_mss(pkt, t.channel.inner_mtu) if len(pkt) <= SYN_MAX_LEN else pkt)

    def _too_big(self, t: Tunnel, pkt: bytes) -> None:
        """An inner packet longer than the peer's path carries: answered as a router would (ICMP
        "too big" into TUN, so the sender's PMTUD follows this peer's path), or fragmented (§10.4)."""
        self.stats["too_big"] += 1
        self._frag_id += 1
        sends, reply = too_big(pkt, t.channel.inner_mtu, self._frag_id)
        if reply is not None and self.tun is not None:
            self.tun.write(reply)
        for p in sends:
            t.channel.send_nowait(p)

    def _queue(self, peer: bytes, pkt: bytes) -> None:
        q = self.pending.get(peer)
        if q is None:
            if len(self.pending) >= MAX_OPENING:
                self.stats["queue_drops"] += 1
                return
            q = self.pending[peer] = deque(maxlen=PENDING_PER_PEER)
        if len(q) == q.maxlen:
            self.stats["queue_drops"] += 1
        q.append(pkt)
        self.stats["queued"] += 1

    def ensure_open(self, peer: bytes) -> None:
        """Open a tunnel to `peer` in the background unless one is opening or just failed."""
        if peer in self._opening:
            return
        now = self.node.session.clock.now()
        if now - self.failed_at.get(peer, -OPEN_RETRY_S) < OPEN_RETRY_S or len(self._opening) >= MAX_OPENING:
            self.pending.pop(peer, None)
            return
        self._opening[peer] = self.tasks.spawn(self._open(peer))

    async def _open(self, peer: bytes) -> None:
        try:
            await self.tunnel_to(peer)
        except (NtmError, asyncio.TimeoutError) as exc:
            self.stats["open_failures"] += 1
            self.failed_at[peer] = self.node.session.clock.now()
            dropped = len(self.pending.pop(peer, ()))
            log.warning("no tunnel to %s (%d packets dropped): %s", keys.checksum(peer), dropped, exc)
        finally:
            self._opening.pop(peer, None)

    async def tunnel_to(self, peer: bytes, force_relay: bool = False) -> Tunnel:
        """The open tunnel to `peer`, or a new one (NodeError with the DC's reason if refused)."""
        t = self.by_peer.get(peer)
        if t is not None and not t.channel.closed and not force_relay:
            return t
        self.overlay.learn(peer)  # refuses a colliding address before any network work
        t = await self.node.connect(peer, force_relay)
        self.stats["opens"] += 1
        self.attach(t)
        return t

    # --- tunnel → TUN ----------------------------------------------------------------------------
    async def _accept_loop(self) -> None:
        while True:
            t = await self.node.accept()
            self.attach(t)

    def attach(self, t: Tunnel) -> None:
        """Make `t` the tunnel to its peer: deliver what it carries, flush what waited for it."""
        peer = t.peer
        try:
            self.overlay.addresses(peer)  # its IPv6 routes to it; it has an IPv4 in our view
        except AddressError as exc:
            log.warning("closing tunnel from %s: %s", keys.checksum(peer), exc)
            self.tasks.spawn(t.channel.close())
            return
        self.by_peer[peer] = t
        t.channel.set_receiver(partial(self._from_tunnel, peer, t), partial(self._from_tunnel_many, peer, t))
        for pkt in self.pending.pop(peer, ()):  # typically the SYN that opened the tunnel
            try:
                self._to_tunnel(t, pkt)
            except NtmError:
                break
        self.seen_as.pop(peer, None)  # a new tunnel: the peer may have restarted with another view
        self.csum_partial.discard(peer)  # ... or without offloads: complete checksums until it says
        self._tell_view(peer, t, ask=True)

    def _from_tunnel(self, peer: bytes, t: Tunnel, payload: bytes) -> None:
        if payload and payload[0] >> 4 in (4, 6) and self.tun is not None:
            self._to_tun(peer, t, payload)  # the common case first: an IP packet for TUN
            return
        if payload and payload[0] in (QUIC_TO_SERVER, QUIC_TO_CLIENT) and self.on_quic is not None:
            self.on_quic(peer, payload)
            return
        kind = kind_of(payload)
        if kind == KIND_VIEW:
            self._view(peer, t, payload)
            return
        if kind == KIND_GROUP and self.on_group is not None:
            self.on_group(peer, payload[1:])  # durable (or refused for good) before we acknowledge
            try:
                t.channel.send_nowait(group_ack(payload))
            except NtmError:
                pass
            return
        if kind == KIND_GROUP_ACK:
            waiter = self._acks.get((peer, payload[1:]))
            if waiter is not None and not waiter.done():
                waiter.set_result(True)
            return
        if kind == KIND_APP:
            self.stats["app_rx"] += 1
            self.inbox.append((peer, payload[1:]))
            self._inbox_event.set()
            if self.echo:
                try:
                    t.channel.send_nowait(payload)
                except NtmError:
                    pass
            return
        if kind == KIND_FRAG:
            joins = self._reasm.get(peer) or self._reasm.setdefault(peer, Reassembly())
            payload = joins.add(payload, self.node.session.clock.now())
            if payload is None:
                return
            if payload[0] in (QUIC_TO_SERVER, QUIC_TO_CLIENT) and self.on_quic is not None:
                self.on_quic(peer, payload)  # a stream's QUIC packet larger than the path (§10.9)
                return
            kind = kind_of(payload)
            if kind != KIND_IPV6:
                kind = KIND_JUNK  # only IPv6 packets and QUIC packets are ever split (§10.4, §10.9)
        if kind == KIND_JUNK or self.tun is None:
            self.stats["junk_rx"] += 1
            return
        self._to_tun(peer, t, payload)

    def _from_tunnel_many(self, peer: bytes, t: Tunnel, payloads: list[bytes]) -> None:
        """The payloads of one read (a GRO run), in order: _from_tunnel's. A segment that continues
        the run of the same peer's previous IPv6 packet joins it at once: its addresses are that
        run's first's (_Run.take compares them), which overlay.inbound passed for this peer,
        so inbound would pass it too, unchanged (and count it: counted here)."""
        i, end, joined = 0, len(payloads), 0
        while i < end:
            c = self._coalescer
            if c is not None and c.last is not None and self._run_peer == peer:
                taken = c.last.take_many(payloads, i)
                joined += taken - i
                i = taken
                if i == end:
                    break
            self._from_tunnel(peer, t, payloads[i])
            i += 1
        if joined:
            self.overlay.stats["rx_ipv6"] += joined

    def _to_tun(self, peer: bytes, t: Tunnel, payload: bytes) -> None:
        """An IP packet from `peer`'s tunnel: checked and translated (overlay), then written to TUN
        (with offloads: collected until the socket is drained, then coalesced)."""
        assert self.tun is not None
        pkt = self.overlay.inbound(peer, payload)
        if pkt is not None:
            # A SYN from the peer says how long our segments to it may be: no longer than our path allows.
            pkt = clamp_mss(pkt, t.channel.inner_mtu) if len(pkt) <= SYN_MAX_LEN else pkt
            if not self.tun.vnet:
                self.tun.write(pkt)
                return
            c = self._coalescer
            if c is None:
                c = self._coalescer = Coalescer()
                asyncio.get_running_loop().call_soon(self._write_coalesced)
            c.add(pkt)
            self._run_peer = peer if pkt[0] >> 4 == 6 else None  # an IPv4 run holds translated headers

    def _view(self, peer: bytes, t: Tunnel, payload: bytes) -> None:
        """The peer says where it sees this node (§10.2); it gets ours back if it asks."""
        view = parse_view(payload)
        if view is None:
            self.stats["junk_rx"] += 1
            return
        self.seen_as[peer], ask = view
        if payload[1] & VIEW_CSUM and self.by_peer.get(peer) is t:  # said on the tunnel in use
            self.csum_partial.add(peer)
        else:
            self.csum_partial.discard(peer)
        if ask:
            self._tell_view(peer, t, ask=False)

    def _tell_view(self, peer: bytes, t: Tunnel, ask: bool) -> None:
        """Tell the peer its IPv4 address in this node's view (a VIEW; asking for its view of us)."""
        try:
            csum = self.tun is not None and self.tun.vnet  # coalesce_buffers() finishes every checksum
            t.channel.send_nowait(frame_view(self.overlay.addresses(peer)[1], ask, csum))
        except NtmError:
            pass  # the tunnel just ended, or no address: status shows the view as unknown

    def view_of(self, peer: bytes, t: Tunnel) -> dict[str, str | None]:
        """Where `peer` sees this node: IPv6 as every node does, IPv4 as the peer said (None until
        it has; asked again then, in case a VIEW was lost)."""
        seen = self.seen_as.get(peer)
        if seen is None:
            self._tell_view(peer, t, ask=True)
        return {"ipv6": str(IPv6Address(self.overlay.my_v6)), "ipv4": str(seen) if seen else None}

    def _write_coalesced(self) -> None:
        """Write what arrived in this event-loop turn (the socket drained, up to RECV_BATCH GRO
        reads), consecutive segments of each TCP flow as one GSO super-packet."""
        c, self._coalescer = self._coalescer, None
        if self.tun is not None and c is not None:
            for bufs in c.writes():
                self.tun.write_buffers(bufs)

    def send_quic(self, peer: bytes, payload: bytes) -> None:
        """A stream's QUIC packet: on the peer's tunnel, or lost while one opens (QUIC resends)."""
        t = self.by_peer.get(peer)
        if t is None or t.channel.closed:
            self.ensure_open(peer)
            return
        self._frag_id += 1
        try:
            for piece in pieces(payload, t.channel.inner_mtu, self._frag_id):
                t.channel.send_nowait(piece)
        except NtmError:
            self.ensure_open(peer)

    # --- application datagrams -------------------------------------------------------------------
    async def send_app(self, peer: bytes, data: bytes, force_relay: bool = False) -> Tunnel:
        t = await self.tunnel_to(peer, force_relay)
        t.channel.send_nowait(frame_app(data))
        return t

    async def send_group(self, peer: bytes, data: bytes) -> bool:
        """A group datagram over the tunnel to `peer` (opened if need be); True once acknowledged
        (the caller bounds the wait). Sent again every GROUP_RESEND_S until then."""
        framed = frame_group(data)
        key = (peer, group_ack(framed)[1:])
        waiter = self._acks[key] = asyncio.get_running_loop().create_future()
        try:
            while True:
                t = await self.tunnel_to(peer)
                t.channel.send_nowait(framed)
                try:
                    return await asyncio.wait_for(asyncio.shield(waiter), GROUP_RESEND_S)
                except asyncio.TimeoutError:
                    continue
        finally:
            self._acks.pop(key, None)

    async def recv_app(self, timeout: float, peer: bytes | None = None) -> list[tuple[bytes, bytes]]:
        """Application datagrams received (from `peer` only, if given), waiting up to `timeout` for
        the first; they are taken out of the inbox."""
        clock = self.node.session.clock
        end = clock.now() + timeout
        while True:
            got = [m for m in self.inbox if peer is None or m[0] == peer]
            if got or clock.now() >= end:
                for m in got:
                    self.inbox.remove(m)
                return got
            self._inbox_event.clear()
            try:
                await asyncio.wait_for(self._inbox_event.wait(), end - clock.now())
            except asyncio.TimeoutError:
                pass

    # --- status ---------------------------------------------------------------------------------
    def peers(self, names_of: Callable[[bytes], list[str]]) -> list[dict]:
        """One row per peer with an open tunnel (like `wg show`); closed tunnels are not listed."""
        now = self.node.session.clock.now()
        rows = []
        for peer, t in list(self.by_peer.items()):
            if t.channel.closed:
                del self.by_peer[peer]
                self._reasm.pop(peer, None)
                self.seen_as.pop(peer, None)
                self.csum_partial.discard(peer)
                continue
            ch = t.channel
            v6, v4 = self.overlay.addresses(peer)
            hs = ch.current.session.last_handshake
            rows.append(
                {
                    "peer": keys.checksum(peer),
                    "names": names_of(peer),
                    "ipv6": str(v6),
                    "ipv4": str(v4),
                    "sees_you_as": self.view_of(peer, t),
                    "route": route_name(t),
                    "endpoint": display(ch.peer_addr) if ch.peer_addr else None,
                    "transport": self.node.endpoint.transport(ch.current.session),
                    "reason": t.reason,
                    "last_handshake_s": round(now - hs, 1) if hs is not None else None,
                    "rx_bytes": ch.stats.get("rx_bytes", 0),
                    "tx_bytes": ch.stats.get("tx_bytes", 0),
                    "rtt_ms": round(ch.rtt * 1000, 2) if ch.rtt else None,
                    "redirects": t.redirects,
                    **self.node.endpoint.mtu_status(ch.current.session),
                }
            )
        return rows


def route_name(t: Tunnel) -> str:
    """What carries the tunnel now: "relay", "punched" (both behind NATs) or "direct"."""
    if t.channel.via == "relay":
        return "relay"
    return "punched" if t.kind == "punch" else "direct"


__all__ = ["DataPlane", "NodeError"]
