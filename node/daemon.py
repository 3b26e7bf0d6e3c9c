"""`ntm up`: the node daemon. One per $NTM_HOME (a lock), in the foreground until SIGINT/SIGTERM
or `ntm down`.

It runs the node (DC session, keepalives, tunnels), the TUN interface with this node's virtual
addresses when it can (root), the `.ntm` DNS responder, and the control socket the other
commands use. It watches the local addresses, so a move to another network is noticed at once
(rtnetlink, node/netwatch.py) or within ADDRESS_POLL_S, even when no tunnel is busy.
"""

from __future__ import annotations

import asyncio
import logging
import logging.handlers
import os
from dataclasses import dataclass, field
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

from daemon.forwarding import Forwarding, ForwardingError, forwarding_rules
from daemon.service import LOG_FORMAT, BackgroundTasks, LockHeld, hold_lock, settle_heap, stop_on_signals
from daemon.tun import Tun, tun_unavailable
from node import control, netcheck, state
from node.agent import Node
from node.control import ControlError, ControlServer
from node.daemon_streams import DaemonStreams
from node.dataplane import DataPlane
from node.dc_client import DcError
from node.dns import DnsServer
from node.exit_relay import ExitRelay
from node.group_link import GroupLink, take_inbox, take_item
from node.groups import Groups
from node.netwatch import follow_addresses
from node.splitdns import LOOPBACK_DNS, SplitDns
from node.peers import PeerBook, PeerBookError
from node.standby import StandbyPaths
from node.subnet import EXIT_ROUTES, RouteSync
from ntm import keys, messages
from ntm.addr import display
from ntm.clock import SYSTEM, Clock
from ntm.errors import NtmError
from ntm.overlay import Overlay
from ntm.routes import RouteError, RouteTable, parse_choice, sign_offer
from ntm.vaddr import V6_PREFIX, AddressError, V4Book, tun_mtu, v6_of

log = logging.getLogger("ntm.node")

LOCK_FILE = "ntm.lock"
INBOX_DIR = "inbox"  # Cache Server items fetched by the daemon: <item> (content) and <item>.json
#: How often the daemon compares its local addresses with the last ones besides each rtnetlink
#: change (a move is noticed in at most this long even where rtnetlink is missing).
ADDRESS_POLL_S = 1.0
#: How often a failover's new registration is copied into state.json.
STATE_SYNC_S = 1.0
#: A ping waits this long for each reply.
PING_TIMEOUT_S = 2.0
#: `ntm status` shows the DC's view of our record; a DC slower than this is reported, not waited for.
RECORD_TIMEOUT_S = 2.0
DNS_PORT = 53


LOG_FILE = "ntm.log"
LOG_BYTES, LOG_BACKUPS = 1 << 20, 3  # a few MB of recent history: failovers, reconnects, refusals


def log_to_file(base: Path) -> None:
    """The daemon's log also goes to $NTM_HOME/ntm.log (rotated), beside stderr."""
    base.mkdir(parents=True, exist_ok=True)
    handler = logging.handlers.RotatingFileHandler(base / LOG_FILE, maxBytes=LOG_BYTES, backupCount=LOG_BACKUPS)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logging.getLogger().addHandler(handler)


class DaemonError(NtmError):
    """The daemon cannot start (another one runs, no registration, TUN refused, ...)."""


def take_lock(base: Path) -> int:
    """Hold $NTM_HOME/ntm.lock for the daemon's life (released by the kernel even on SIGKILL)."""
    try:
        return hold_lock(base / LOCK_FILE)
    except LockHeld as exc:
        raise DaemonError(f"a daemon already runs for {base} (pid {exc.pid or '?'}); `ntm down` stops it") from None


@dataclass
class UpOptions:
    tun: str | None  # interface name, or None for no TUN
    require_tun: bool  # --tun given explicitly: fail instead of falling back
    v4_net: IPv4Network
    path_mtu: int
    dns: list[tuple[str, int]] | None  # None: on the TUN addresses, port 53
    accept_any: bool
    echo: bool
    host: str | None
    port: int
    keepalive: float
    offload: bool = True  # TUN offloads (super-packets) where the kernel has them (--no-offload: never), §10.11
    advertise_routes: list = field(default_factory=list)  # subnets this node forwards for (§10.10)
    advertise_exit: bool = False
    use_routes: list[str] = field(default_factory=list)  # "PEER" or "PEER:PREFIX" items (--use-routes)
    exit_node: str | None = None
    exit_relay: bool = False  # use a relay's exit, booked by the DC (--exit-relay, §10.13)


class Daemon:
    def __init__(
        self, base: Path, node: Node, book: PeerBook, overlay: Overlay, plane: DataPlane, opts: UpOptions
    ) -> None:
        self.base, self.node, self.book, self.overlay, self.plane, self.opts = base, node, book, overlay, plane, opts
        self.groups = Groups(base, node.key, lambda: node.dc_url, GroupLink(node.key, plane), self.allows)
        plane.on_group = lambda peer, data: self.groups.on_payload(peer, data, "tunnel")
        self.stop = asyncio.Event()
        self.dns: DnsServer | None = None
        self.split: SplitDns | None = None  # .ntm names registered with the system resolver (node/splitdns.py)
        self.dns_route: str | None = None  # how the system's resolver reaches our DNS
        self.control: ControlServer | None = None
        self.standby = StandbyPaths(node)  # make-before-break over a second uplink
        self.streams = DaemonStreams(plane, self.admit, lambda peer: self._peer({"peer": peer}))
        self.routes = RouteSync(
            overlay.routes, lambda peer: node.session.dc.whois(peer), plane.tun.name if plane.tun else None
        )
        self.forwarding = Forwarding(base)
        self.exit_relay: ExitRelay | None = None
        self.tasks = BackgroundTasks()
        self.started = node.session.clock.now()

    # --- policy and names ----------------------------------------------------------------------
    def admit(self, peer: bytes) -> bool:
        """Allowed peers, and our groups' members (not who merely invites us: §12.1)."""
        return self.allows(peer) or self.groups.knows(peer)

    def allows(self, peer: bytes) -> bool:
        """The user's own choice: --accept-any or the allow list."""
        return self.opts.accept_any or peer in self.book.allow

    def resolve(self, label: str):
        """DNS: `<node-id>` or `<alias>` → (IPv6, IPv4) as this node's applications see the peer."""
        try:
            peer = self.book.resolve(label)
        except PeerBookError:
            return None
        if peer == self.node.id:
            return v6_of(peer), self.overlay.book.own
        try:  # a lookup persists nothing unless the peer is in the book (aliased or allowed)
            return self.overlay.addresses(peer, keep=peer in self.book.allow or peer in self.book.aliases.values())
        except AddressError as exc:
            log.warning("no address for %s: %s", label, exc)
            return None

    def learn_book(self) -> None:
        """Aliased and allowed peers are reachable at their IPv6 address from the start."""
        for peer in {*self.book.aliases.values(), *self.book.allow}:
            try:
                self.overlay.learn(peer)
            except AddressError as exc:
                log.warning("%s", exc)

    def save_book(self) -> None:
        """Persist the IPv4 view (after every new address: V4Book.on_assign)."""
        self.book.v4 = self.overlay.book.dump()
        self.book.save(self.base)

    # --- control requests ----------------------------------------------------------------------
    def _peer(self, body: dict[str, Any]) -> bytes:
        try:
            return self.book.resolve(str(body.get("peer", "")))
        except PeerBookError as exc:
            raise ControlError("bad_peer", str(exc)) from None

    async def _guard(self, coro):
        try:
            return await coro
        except (NtmError, asyncio.TimeoutError) as exc:
            raise ControlError(getattr(exc, "code", "failed"), str(exc) or type(exc).__name__) from None

    async def h_status(self, body: dict[str, Any]) -> dict[str, Any]:
        tun = self.plane.tun
        return {
            "node": keys.checksum(self.node.id),
            "pid": os.getpid(),
            "uptime_s": round(self.node.session.clock.now() - self.started, 1),
            **self.node.session.status(),
            "local": display(self.node.endpoint.local_addr),
            "tun": tun.name if tun else None,
            "ipv6": str(v6_of(self.node.id)),
            "ipv4": str(self.overlay.book.own),
            "dns": [f"{h}:{p}" for h, p in self.dns.bound] if self.dns else [],
            "dns_route": self.dns_route,
            "accept_any": self.opts.accept_any,
            "allowed": len(self.book.allow),
            "peers": self.standby.annotate(
                self.plane.peers(self.book.names_of),
                {keys.checksum(p): t.channel.path_id for p, t in self.plane.by_peer.items()},
            ),
            **self.node.inbox_status(),
            "groups": self.groups.list(),
            "group_refusals": dict(self.groups.refused),
            "routes": self.routes.status(),
            "record": await self._record(),
            "counters": {
                **self.overlay.stats,
                **self.plane.stats,
                "refused_tunnels": self.node.tunnel_table.refused,
                "dns_refused": self.dns.refused if self.dns else 0,
                **({f"tun_{k}": v for k, v in tun.stats().items()} if tun else {}),
            },
        }

    async def _record(self) -> dict[str, Any]:
        """Our record as our DC sees it (whois), for `ntm status`; {"dc_error", "unreachable"} if it
        does not say."""
        try:
            return messages.encode(await asyncio.wait_for(self.node.session.dc.whois(self.node.id), RECORD_TIMEOUT_S))
        except DcError as exc:
            return {"dc_error": str(exc), "unreachable": exc.code == "unreachable"}
        except asyncio.TimeoutError:
            return {"dc_error": f"no answer within {RECORD_TIMEOUT_S:.0f} s", "unreachable": True}

    async def h_netcheck(self, body: dict[str, Any]) -> dict[str, Any]:
        return await netcheck.run(self.node.session, self.plane.peers(self.book.names_of))

    async def h_ping(self, body: dict[str, Any]) -> dict[str, Any]:
        peer = self._peer(body)
        t = await self._guard(self.plane.tunnel_to(peer, bool(body.get("relay"))))
        rtts: list[float | None] = []
        for i in range(int(body.get("count", 1))):
            if i:
                await asyncio.sleep(float(body.get("interval", 0.2)))
            try:
                rtts.append(round(await t.channel.ping(PING_TIMEOUT_S) * 1000, 3))
            except (asyncio.TimeoutError, NtmError):
                rtts.append(None)
        return {"peer": keys.checksum(peer), "route": t.kind, "via": t.channel.via, "rtt_ms": rtts}

    async def h_send(self, body: dict[str, Any]) -> dict[str, Any]:
        peer = self._peer(body)
        data = str(body.get("text", "")).encode()
        t = await self._guard(self.plane.send_app(peer, data, bool(body.get("relay"))))
        wait = float(body.get("wait_reply", 0))
        got = await self.plane.recv_app(wait, peer) if wait > 0 else []
        return {
            "peer": keys.checksum(peer),
            "route": t.kind,
            "via": t.channel.via,
            "sent": len(data),
            "reply": got[0][1].decode(errors="replace") if got else None,
        }

    async def h_recv(self, body: dict[str, Any]) -> dict[str, Any]:
        got = await self.plane.recv_app(float(body.get("wait", 0)))
        return {"messages": [{"peer": keys.checksum(p), "text": d.decode(errors="replace")} for p, d in got]}

    # --- groups (node/groups.py) --------------------------------------------------------------------
    def _group_handlers(self) -> dict:
        G = self.groups

        def node_of(body: dict) -> bytes:
            return self._peer({"peer": body.get("node", "")})

        async def create(b):
            return await self._guard(G.create(str(b.get("name", ""))))

        async def invite(b):
            return await self._guard(G.invite(str(b.get("group", "")), node_of(b)))

        async def accept(b):
            return await self._guard(G.accept(str(b.get("group", ""))))

        async def leave(b):
            return await self._guard(G.leave(str(b.get("group", ""))))

        async def remove(b):
            return await self._guard(G.remove(str(b.get("group", "")), node_of(b)))

        async def send(b):
            return await self._guard(G.send(str(b.get("group", "")), str(b.get("text", "")).encode()))

        async def members(b):
            if not b.get("group"):
                return {"groups": G.list()}
            return await self._guard(G.members(str(b["group"])))

        async def recv(b):
            ref = str(b["group"]) if b.get("group") else None
            return {"messages": await self._guard(G.wait_messages(ref, float(b.get("wait", 0))))}

        async def invitations(b):
            return {"invitations": G.invitations()}

        async def decline(b):
            return await self._guard(G.decline(str(b.get("group", ""))))

        return {
            f"group.{f.__name__}": f
            for f in (create, invite, accept, leave, remove, send, members, recv, invitations, decline)
        }

    async def h_inbox_fetch(self, body: dict[str, Any]) -> dict[str, Any]:
        """`ntm inbox fetch ITEM...`: the user fetches items the daemon left at their Cache Server."""
        mb = self.node.mailbox
        assert mb is not None, "the daemon always has an inbox"
        wanted = {str(i) for i in body.get("items", [])}
        return {"fetched": await self._guard(mb.fetch_on_request(self.node.dc_url, wanted))}

    async def h_reload(self, body: dict[str, Any]) -> dict[str, Any]:
        try:
            fresh = PeerBook.load(self.base)
        except PeerBookError as exc:
            raise ControlError("bad_peers_file", str(exc)) from None
        self.book.aliases, self.book.allow = fresh.aliases, fresh.allow
        self.learn_book()
        return {"aliases": len(self.book.aliases), "allowed": len(self.book.allow)}

    async def h_down(self, body: dict[str, Any]) -> dict[str, Any]:
        self.stop.set()
        return {"stopping": True, "pid": os.getpid()}

    # --- life ------------------------------------------------------------------------------------
    def dns_binds(self) -> list[tuple[str, int]]:
        if self.opts.dns is not None:
            return self.opts.dns
        if self.plane.tun is None:
            return []
        return [(str(self.overlay.book.own), DNS_PORT), (str(v6_of(self.node.id)), DNS_PORT)]

    def start_forwarding(self) -> None:
        """A subnet router (or exit): forwarding and masquerade for what it advertises (§10.10);
        first remove whatever a daemon that crashed here left."""
        self.forwarding.recover()
        t = self.overlay.routes
        nets = list(t.advertised) + (list(EXIT_ROUTES) if t.exit_offered else [])
        if nets and self.plane.tun is not None:
            self.forwarding.apply(
                forwarding_rules(self.plane.tun.name, self.overlay.book.net, nets), {n.version for n in nets}
            )

    async def serve(self) -> None:
        self.learn_book()
        self.start_forwarding()
        binds = self.dns_binds()
        system_dns = self.opts.dns is None and self.plane.tun is not None  # our TUN, our default DNS: tell the system
        if binds:
            self.dns = await DnsServer.start(
                binds,
                self.resolve,
                {str(self.overlay.book.own), str(v6_of(self.node.id))},
                optional=[LOOPBACK_DNS] if system_dns else [],
                clock=self.node.session.clock,
            )
        if system_dns and self.plane.tun is not None:
            self.split = SplitDns(self.plane.tun.name, [h for h, _ in binds])
            self.dns_route = await asyncio.to_thread(self.split.register)
        self.control = await ControlServer.start(
            self.base,
            {
                "status": self.h_status,
                "netcheck": self.h_netcheck,
                "ping": self.h_ping,
                "send": self.h_send,
                "recv": self.h_recv,
                "inbox.fetch": self.h_inbox_fetch,
                "reload": self.h_reload,
                "down": self.h_down,
                **self._group_handlers(),
            },
            self.streams.sockets(),
        )
        self.groups.start()
        take_inbox(self.groups, self.base / INBOX_DIR)
        self.plane.start()
        self.tasks.spawn(self._watch_addresses())
        self.tasks.spawn(self._sync_state())
        self.tasks.spawn(self.standby.run())
        if self.overlay.routes.peers():
            self.tasks.spawn(self.routes.loop())
        if self.opts.exit_relay:
            await self.use_exit_relay()

    async def use_exit_relay(self) -> None:
        """--exit-relay: book a relay's exit through the DC and route table 4330 into it (§10.13)."""
        if self.plane.tun is None:
            raise DaemonError("--exit-relay needs the TUN interface (root)")
        self.exit_relay = ExitRelay(
            self.node,
            self.plane,
            self.routes,
            lambda: self.node.session.dc.book_exit(self.node.key, self.node.session.clock.wall_ms()),
        )
        await self.exit_relay.start()

    async def _watch_addresses(self) -> None:
        await follow_addresses(self.node.local_addrs, self.node.network_changed, ADDRESS_POLL_S)

    async def _sync_state(self) -> None:
        while True:
            await asyncio.sleep(STATE_SYNC_S)
            st = state.read_json(self.base / state.STATE_FILE)
            home = self.node.home
            if home and st.get("timestamp", 0) < home["timestamp"]:  # the node failed over to another DC
                state.write_json(self.base / state.STATE_FILE, {**st, **home})

    async def close(self) -> None:
        await self.tasks.cancel()
        await self.groups.close()
        if self.control is not None:
            await self.control.close()
        await self.streams.close()
        if self.split is not None:
            await asyncio.to_thread(self.split.revert)
        if self.dns is not None:
            self.dns.close()
        await self.plane.close()
        self.forwarding.remove()
        await self.node.close()


def route_table(key, book: PeerBook, opts: UpOptions, clock: Clock) -> tuple[RouteTable, messages.RouteOffer | None]:
    """The routes this node advertises (and its signed offer, None if none) and the peers' routes
    its user chose to use; DaemonError naming what is wrong."""
    try:
        table = RouteTable(opts.advertise_routes, opts.advertise_exit, local=opts.v4_net)
        clash = [str(n) for n in opts.advertise_routes if n.version == 4 and n.overlaps(opts.v4_net)]
        if clash:
            raise RouteError(f"advertised {', '.join(clash)} overlaps the virtual network {opts.v4_net}")
        exit_node = book.resolve(opts.exit_node) if opts.exit_node else None
        table.choose(parse_choice(opts.use_routes, book.resolve), exit_node)
    except (RouteError, PeerBookError) as exc:
        raise DaemonError(str(exc)) from None
    if not opts.advertise_routes and not opts.advertise_exit:
        return table, None
    return table, sign_offer(key, list(opts.advertise_routes), opts.advertise_exit, clock.wall_ms())


def open_tun(node_id: bytes, book: V4Book, opts: UpOptions) -> Tun | None:
    if opts.tun is None:
        return None
    why = tun_unavailable()
    if why and not opts.require_tun:
        log.info("no TUN interface (%s): datagram mode only (`ntm send`, `ntm ping`)", why)
        return None
    return Tun.open(
        opts.tun, tun_mtu(opts.path_mtu), v6_of(node_id), V6_PREFIX, book.own, book.net, offload=opts.offload
    )


async def up(base: Path, key, st: dict, opts: UpOptions, ready) -> None:
    """Run the daemon until stopped; `ready(info)` is called once everything listens."""
    lock = take_lock(base)
    clock = SYSTEM  # the real clock: the daemon's parts are given it from here
    try:
        try:
            book = PeerBook.load(base)
        except PeerBookError as exc:
            raise DaemonError(str(exc)) from None
        try:
            v4 = V4Book.load(opts.v4_net, book.v4)
        except (AddressError, ValueError) as exc:
            log.warning("virtual IPv4 addresses start afresh (%s)", exc)
            v4 = V4Book(opts.v4_net)
        node_id = keys.node_id_of(key)
        table, offer = route_table(key, book, opts, clock)
        overlay = Overlay(node_id, v4, table)
        tun = open_tun(node_id, v4, opts)
        if offer is not None and tun is None:
            raise DaemonError("--advertise-routes/--advertise-exit need the TUN interface (root)")
        daemon: Daemon | None = None
        try:
            node = await Node.start(
                key,
                st["dc_url"],
                host=opts.host,
                port=opts.port,
                last_timestamp=st.get("timestamp", 0),
                keepalive_interval=opts.keepalive,
                admit=lambda peer: daemon is not None and daemon.admit(peer),
                inbox=base / INBOX_DIR,
                take_item=lambda item: daemon is not None and take_item(daemon.groups, item),
                dc_pin=keys.parse_node_id(st["dc"]) if st.get("dc") else None,
                route_offer=offer,
                clock=clock,
            )
        except BaseException:
            if tun is not None:
                tun.close()
            raise
        plane = DataPlane(node, overlay, tun, echo=opts.echo)
        daemon = Daemon(base, node, book, overlay, plane, opts)
        v4.on_assign = lambda peer, addr: daemon.save_book()
        try:
            try:
                await daemon.serve()
            except ForwardingError as exc:
                raise DaemonError(str(exc)) from None
            stop = stop_on_signals()
            settle_heap()  # the data plane allocates per packet: young collections stay rare and short
            ready(
                {
                    "node": keys.checksum(node_id),
                    "dc": node.dc_url,
                    "observed": node.observed,
                    "tun": tun.name if tun else None,
                    "ipv6": str(v6_of(node_id)),
                    "ipv4": str(v4.own),
                    "mtu": tun_mtu(opts.path_mtu) if tun else None,
                    "offload": bool(tun and tun.vnet),
                    "socket": str(control.socket_path(base)),
                    "dns": [f"{h}:{p}" for h, p in daemon.dns.bound] if daemon.dns else [],
                    "dns_route": daemon.dns_route,
                }
            )
            waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(daemon.stop.wait())]
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            for w in waiters:
                w.cancel()
        finally:
            await daemon.close()
    finally:
        os.close(lock)
