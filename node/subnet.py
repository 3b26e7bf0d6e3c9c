"""Subnet routes in the kernel (docs/PROTOCOL.md §10.10): the daemon's adapter around ntm/routes.py.

A node that advertises routes forwards for the LAN behind it: `Forwarding` (daemon/forwarding.py)
turns on IP forwarding and adds masquerade and forward-accept rules, recorded in
$NTM_HOME/forwarding.json before they are added and removed on stop or by the next start. A node
that uses peers' routes learns their signed offers from the DC (`RouteSync`: whois, verified here,
never trusted from the DC) and routes the accepted prefixes into its TUN interface.

    sync = RouteSync(table, whois, "ntm0"); await sync.loop()
"""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

from daemon.forwarding import ForwardingError, Runner, run
from ntm import keys, messages
from ntm.errors import NtmError
from ntm.routes import EXIT_ROUTES, Net, RouteError, RouteTable, verify_offer

log = logging.getLogger("ntm.node")

#: How often a user of routes asks the DC for its routers' offers once it knows them: an offer
#: changes only when a router restarts with other flags, and a minute is an acceptable delay then.
REFRESH_S = 60.0
#: ... and until it knows one (the router may come up after this node): soon, without hammering.
RETRY_S = 3.0
#: The routing table an exit node's default routes go to (the NTM port, easy to remember): the
#: user's own `ip rule` decides what uses it (a LAN behind this node, a user), never the daemon's sockets.
EXIT_TABLE = 4330


class RouteSync:
    """Keeps the table's peers' offers fresh (from the DC, verified here) and the accepted routes
    in the kernel, pointing into TUN."""

    def __init__(
        self,
        table: RouteTable,
        whois: Callable[[bytes], Awaitable[messages.NodeInfo]],
        tun: str | None,
        run: Runner = run,
    ) -> None:
        self.table, self.whois, self.tun, self.run = table, whois, tun, run
        self.installed: set[Net] = set()
        self.errors: dict[str, str] = {}  # peer → why its offer is not known

    async def fetch(self, peer: bytes) -> None:
        try:
            info = await self.whois(peer)
            if info.routes is None:
                raise RouteError("offers no routes (or is offline)")
            offer = verify_offer(info.routes)
            if offer.node != peer:
                raise RouteError(f"its DC answered with {info.routes.node}'s offer")
        except NtmError as exc:
            self.errors[keys.checksum(peer)] = str(exc)
            return
        self.errors.pop(keys.checksum(peer), None)
        if self.table.learn(offer):
            log.info("routes of %s: %s", keys.checksum(peer), ", ".join(map(str, offer.routes)) or "none")
            self.sync_kernel()

    def _route(self, op: str, net: Net) -> list[str]:
        """`ip route` argv: a subnet route in the main table; an exit's default route only in
        EXIT_TABLE (the main table's default would carry the tunnel's own packets into itself)."""
        argv = ["ip", f"-{net.version}", "route", op, str(net), "dev", str(self.tun)]
        return argv + (["table", str(EXIT_TABLE)] if net in EXIT_ROUTES else [])

    def sync_kernel(self) -> None:
        """Kernel routes into TUN = the accepted routes (they vanish with the TUN device)."""
        if self.tun is None:
            return
        want = {n for nets in self.table.accepted.values() for n in nets}
        for net in sorted(want - self.installed, key=str):
            try:
                self.run(self._route("replace", net))
                self.installed.add(net)
            except ForwardingError as exc:
                log.warning("%s", exc)
        for net in sorted(self.installed - want, key=str):
            try:
                self.run(self._route("del", net))
            except ForwardingError as exc:
                log.warning("%s", exc)
            self.installed.discard(net)

    async def loop(self) -> None:
        """Ask for every chosen peer's offer: soon while some are unknown, then every REFRESH_S."""
        while True:
            await asyncio.gather(*(self.fetch(p) for p in self.table.peers()))
            known = all(p in self.table.offers for p in self.table.peers())
            await asyncio.sleep(REFRESH_S if known else RETRY_S)

    def status(self) -> dict:
        t = self.table
        return {
            "advertised": [str(n) for n in t.advertised],
            "exit_offered": t.exit_offered,
            "accepted": {keys.checksum(p): [str(n) for n in ns] for p, ns in t.accepted.items()},
            "refused": t.refused,
            "unknown": self.errors,
        }
