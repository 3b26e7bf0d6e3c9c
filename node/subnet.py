"""Subnet routes in the kernel (docs/PROTOCOL.md §10.10): the daemon's adapter around ntm/routes.py.

A node that advertises routes forwards for the LAN behind it: `Forwarding` turns on IP forwarding
and adds masquerade and forward-accept rules (iptables/ip6tables), writing each rule to
$NTM_HOME/forwarding.json *before* adding it, so a daemon that crashed is cleaned up by the next
start, and removing exactly those rules (and restoring the sysctls it changed) on stop. A node
that uses peers' routes learns their signed offers from the DC (`RouteSync`: whois, verified here,
never trusted from the DC) and routes the accepted prefixes into its TUN interface.

    fw = Forwarding(base, run); fw.recover(); fw.apply(forwarding_rules("ntm0", v4_net, prefixes))
    ...; fw.remove()
"""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
from dataclasses import dataclass, field
from ipaddress import IPv4Network
from pathlib import Path
from typing import Awaitable, Callable

from ntm import keys, messages
from ntm.errors import NtmError
from ntm.routes import EXIT_ROUTES, Net, RouteError, RouteTable, verify_offer
from ntm.vaddr import V6_PREFIX

log = logging.getLogger("ntm.node")

STATE_FILE = "forwarding.json"
#: How often a user of routes asks the DC for its routers' offers once it knows them: an offer
#: changes only when a router restarts with other flags, and a minute is an acceptable delay then.
REFRESH_S = 60.0
#: ... and until it knows one (the router may come up after this node): soon, without hammering.
RETRY_S = 3.0
#: The iptables comment on every rule this daemon adds, so an operator can tell them apart.
COMMENT = "ntm-subnet-router"
#: The routing table an exit node's default routes go to (the NTM port, easy to remember): the
#: user's own `ip rule` decides what uses it (a LAN behind this node, a user), never the daemon's sockets.
EXIT_TABLE = 4330
SYSCTLS = {4: "/proc/sys/net/ipv4/ip_forward", 6: "/proc/sys/net/ipv6/conf/all/forwarding"}

Runner = Callable[[list[str]], None]


class ForwardingError(NtmError):
    code = "forwarding_failed"


def run(argv: list[str]) -> None:
    """Run a command; ForwardingError with its stderr if it fails."""
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ForwardingError(f"{' '.join(argv)}: {exc}") from None
    if r.returncode != 0:
        raise ForwardingError(f"{' '.join(argv)}: {r.stderr.strip() or r.returncode}")


def forwarding_rules(tun: str, v4_net: IPv4Network, prefixes: list[Net]) -> list[list[str]]:
    """The iptables/ip6tables rules (arguments after -A/-D) that let peers' packets from TUN into
    `prefixes` and their answers back, masqueraded behind this node's LAN address: the LAN's hosts
    need no route to the overlay. Sources are the overlay's (the IPv4 view, or the IPv6 prefix)."""
    rules = []
    for net in prefixes:
        cmd, src = ("iptables", str(v4_net)) if net.version == 4 else ("ip6tables", str(V6_PREFIX))
        tag = ["-m", "comment", "--comment", COMMENT]
        rules += [[cmd, "-t", "filter", "FORWARD", "-i", tun, "-s", src, "-d", str(net), *tag, "-j", "ACCEPT"],
                  [cmd, "-t", "filter", "FORWARD", "-o", tun, "-s", str(net), "-d", src,
                   "-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", *tag, "-j", "ACCEPT"],
                  [cmd, "-t", "nat", "POSTROUTING", "-s", src, "-d", str(net), "!", "-o", tun, *tag,
                   "-j", "MASQUERADE"]]
    return rules


def _argv(rule: list[str], op: str) -> list[str]:
    """iptables argv for `op` (-A, -D, -C) of a rule as forwarding_rules() gives it."""
    cmd, t, table, chain, *spec = rule
    return [cmd, "-w", t, table, op, chain, *spec]


@dataclass
class Forwarding:
    """The kernel state a subnet router adds, recorded on disk before it is added."""

    base: Path
    run: Runner = run
    sysctl_dir: Path | None = None  # tests: a directory standing for /proc/sys
    rules: list[list[str]] = field(default_factory=list)
    sysctls: dict[str, str] = field(default_factory=dict)  # path → the value before we changed it

    @property
    def path(self) -> Path:
        return self.base / STATE_FILE

    def _sysctl(self, path: str) -> Path:
        return Path(path) if self.sysctl_dir is None else self.sysctl_dir / Path(path).name

    def _save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"rules": self.rules, "sysctls": self.sysctls}))
        tmp.replace(self.path)

    def recover(self) -> int:
        """Remove what a daemon that died without cleaning up had added (its state file); the
        number of rules removed."""
        try:
            st = json.loads(self.path.read_text())
            self.rules, self.sysctls = list(st["rules"]), dict(st["sysctls"])
        except FileNotFoundError:
            return 0
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("%s unreadable (%s): nothing to clean up from it", self.path, exc)
            self.path.unlink()
            return 0
        n = len(self.rules)
        log.warning("removing the forwarding state a previous daemon left (%d rules)", n)
        self.remove()
        return n

    def apply(self, rules: list[list[str]], families: set[int]) -> None:
        """Turn forwarding on for `families` and add `rules`; on a failure, undo what was added."""
        try:
            for family in sorted(families):
                path = self._sysctl(SYSCTLS[family])
                old = path.read_text().strip()
                if old != "1":
                    self.sysctls[str(path)] = old
                    self._save()
                    path.write_text("1\n")
            for rule in rules:
                self.rules.append(rule)
                self._save()  # on disk first: a crash right after still gets it removed
                self.run(_argv(rule, "-A"))
        except (OSError, ForwardingError) as exc:
            self.remove()
            raise ForwardingError(f"cannot set up forwarding: {exc}") from None

    def remove(self) -> None:
        """Delete exactly the rules added (those no longer present are skipped) and restore sysctls."""
        for rule in reversed(self.rules):
            try:
                self.run(_argv(rule, "-C"))
            except ForwardingError:
                continue  # not there (never added, or removed by hand)
            try:
                self.run(_argv(rule, "-D"))
            except ForwardingError as exc:
                log.warning("%s", exc)
        for path, old in self.sysctls.items():
            try:
                Path(path).write_text(old + "\n")
            except OSError as exc:
                log.warning("cannot restore %s to %s: %s", path, old, exc)
        self.rules, self.sysctls = [], {}
        self.path.unlink(missing_ok=True)


class RouteSync:
    """Keeps the table's peers' offers fresh (from the DC, verified here) and the accepted routes
    in the kernel, pointing into TUN."""

    def __init__(self, table: RouteTable, whois: Callable[[bytes], Awaitable[messages.NodeInfo]],
                 tun: str | None, run: Runner = run) -> None:
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
        return {"advertised": [str(n) for n in t.advertised], "exit_offered": t.exit_offered,
                "accepted": {keys.checksum(p): [str(n) for n in ns] for p, ns in t.accepted.items()},
                "refused": t.refused, "unknown": self.errors}
