"""NAT lab: real NATs, firewalls and IPv6 built from Linux network namespaces.

Pure stdlib; drives ``ip``, ``iptables`` (nft or legacy backend, detected) and ``conntrack``
through subprocess.  Needs root.  Nothing ever leaves the namespaces it creates: the
"internet" is a bridge in its own namespace with no uplink, public addresses are in
198.18.0.0/15 (benchmarking range) and 2001:db8::/32 (documentation range).

Topology (one ``Lab``; every box is a network namespace named ``<prefix>-...``)::

                          <prefix>-inet : bridge br0  198.18.0.1/24  2001:db8:0:1::1/64
                                   ("internet", L2 only, routes nowhere)
       +-------------------+-----------+-----------+---------------------+
       |                   |           |           |                     |
   h-srv (lab.server)   h-pub1      h-v6       r-siteA (NAT)         r-siteB (NAT)
   198.18.0.10          .11         no IPv4    wan 198.18.0.101      wan 198.18.0.102
   2001:db8:0:1::10     ::11        ::12       lan br 10.1.0.1/24    lan br 10.2.0.1/24
   (DCs, RS, chain;     kind        kind       MASQUERADE [--random] + home firewall
    add_public_host()   "public"    "ipv6only"     |                     |
    for more)                                  h-a 10.1.0.2          h-b 10.2.0.2
                                               (IPv4 only)           (IPv4 only)

Address plan
  * internet bridge: 198.18.0.1/24 + 2001:db8:0:1::1/64 (the "ISP gateway"; default route of
    every public host and NAT router).
  * public hosts (``add_public_host``, hosts of "public" sites, and hosts moved to the
    internet): 198.18.0.N + 2001:db8:0:1::N, N = 10, 11, 12, ... in creation order; the server
    made by the constructor is always N = 10.  A host keeps its N: moving it back to the
    internet gives it the same address again.
  * "ipv6only" hosts: 2001:db8:0:1::N only, no IPv4 address and no IPv4 route.
  * NAT routers: WAN 198.18.0.(100+i), i = 1, 2, ... (IPv4 only; NAT sites have no IPv6);
    LAN 10.i.0.0/24 on a bridge ``lan`` in the router namespace, gateway 10.i.0.1, hosts
    10.i.0.2, .3, ...  (private addresses exist only inside the namespaces).

NAT kinds (``add_site(name, kind)``)
  * "public": the host sits directly on the internet bridge (dual stack, no NAT, no firewall).
  * "eim": MASQUERADE (endpoint-independent mapping: one private ip:port maps to the same
    public port for every destination) + a home-router stateful firewall on the WAN: inbound
    is accepted only for conntrack ESTABLISHED,RELATED, everything else is dropped.  That
    firewall is what makes simultaneous hole punching reliable (DESIGN.md, measured).
  * "symmetric": ``MASQUERADE --random`` (a new public port per destination) + the same
    firewall.  Hole punching fails; use a relay.
  * "ipv6only": a host with only 2001:db8:0:1::N on the internet bridge.

Running programs
  ``lab.run(host, argv)`` starts ``ip netns exec <ns> argv`` as a subprocess.Popen in its own
  session, remembered by the lab; ``teardown()`` kills it (process group, by PID).
  ``lab.exec(host, argv)`` runs to completion and returns a CompletedProcess.
  ``expect(proc, regex, timeout)`` waits for a line of a running process's stdout.
  Bind sockets to the wildcard address in hosts that may ``move()``.

Mobility
  ``lab.move(host, site)`` deletes the host's uplink veth (``eth0``) and plugs a new one into
  the target site's bridge with the target's address plan and default route.  The host's
  namespace stays the same, so a running process keeps its wildcard-bound socket and simply
  starts sending from the new address (an unconnected socket; connect()ed sockets break).
  ``lab.add_uplink(host, site)`` gives a host a second uplink (``eth1`` on a NAT site, default
  route of a higher metric) and ``lab.set_link(host, "eth0", False)`` takes the first one down:
  make-before-break (labkit/lab/roam_mbb.py).

Typical use::

    import sys
    from .topology import Lab, expect
    with Lab() as lab:
        a = lab.add_site("a", "eim").host              # 10.1.0.2 behind 198.18.0.101
        b = lab.add_site("b", "symmetric").host        # 10.2.0.2 behind 198.18.0.102
        rs = lab.add_public_host("rs")                 # 198.18.0.11 + 2001:db8:0:1::11
        p = lab.run(rs, [sys.executable, "-m", "rs", "--listen", "[::]:4330"])
        lab.exec(a, [sys.executable, "-c", "print('hi from', 'a')"]).stdout
        lab.move(a, "b")                               # a now 10.2.0.3 behind 198.18.0.102
"""

from __future__ import annotations

import atexit
import ipaddress
import itertools
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from scripts.procs import pid_alive

__all__ = [
    "Lab",
    "Host",
    "Site",
    "Router",
    "LabError",
    "expect",
    "lab_available",
    "sweep_stale",
    "lines_of",
    "INET4",
    "INET6",
    "NS_PREFIX",
]

NS_PREFIX = "ntl"  # every namespace: ntl<pid>-<n>-<role>-<name>
INET4 = ipaddress.ip_network("198.18.0.0/24")
INET6 = ipaddress.ip_network("2001:db8:0:1::/64")
GW4 = "198.18.0.1"
GW6 = "2001:db8:0:1::1"
SERVER_INDEX = 10
ROUTER_BASE = 100
KINDS = ("public", "eim", "symmetric", "ipv6only")
_NAME_RE = re.compile(r"^[a-z0-9]{1,12}$")
_STALE_RE = re.compile(rf"^{NS_PREFIX}(\d+)-")  # lab namespaces and the availability probe's (ntl<pid>-probe<n>)

_counter = itertools.count()
_live_labs: "set[Lab]" = set()
_iptables_cmd: str | None = None


NETNS_ETC = Path("/etc/netns")  # per-namespace /etc files, bind-mounted by `ip netns exec`


class LabError(RuntimeError):
    """A lab command failed (message carries the command and its stderr)."""


def _run(argv: Sequence[str], check: bool = True, timeout: float = 20) -> subprocess.CompletedProcess:
    r = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise LabError(f"{' '.join(argv)} -> rc={r.returncode}: {r.stderr.strip() or r.stdout.strip()}")
    return r


def lab_available() -> str | None:
    """Return None if the lab can run here, else a human-readable reason why not."""
    if os.geteuid() != 0:
        return "NAT lab needs root (network namespaces, iptables)"
    for tool in ("ip", "iptables", "conntrack", "sysctl"):
        if shutil.which(tool) is None:
            return f"NAT lab needs '{tool}' (apt-get install -y iproute2 iptables conntrack)"
    name = f"{NS_PREFIX}{os.getpid()}-probe{next(_counter)}"
    try:
        r = _run(["ip", "netns", "add", name], check=False)
        if r.returncode != 0:
            return f"'ip netns add' failed: {r.stderr.strip()}"
        try:
            if _detect_iptables(name) is None:
                return "no working iptables backend (nft or legacy) with MASQUERADE + conntrack"
        finally:
            _run(["ip", "netns", "del", name], check=False)
    except (OSError, subprocess.SubprocessError) as e:
        return f"network namespaces unusable: {e}"
    return None


def _detect_iptables(ns: str) -> str | None:
    """Find an iptables binary whose NAT + conntrack match work inside namespace ``ns``."""
    global _iptables_cmd
    if _iptables_cmd is not None:
        return _iptables_cmd
    for cmd in ("iptables", "iptables-nft", "iptables-legacy"):
        if shutil.which(cmd) is None:
            continue
        x = ["ip", "netns", "exec", ns, cmd]
        ok = (
            _run(
                x + ["-t", "nat", "-A", "POSTROUTING", "-o", "lo", "-j", "MASQUERADE", "--random"], check=False
            ).returncode
            == 0
            and _run(
                x + ["-A", "INPUT", "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"], check=False
            ).returncode
            == 0
        )
        _run(x + ["-t", "nat", "-F"], check=False)
        _run(x + ["-F"], check=False)
        if ok:
            _iptables_cmd = cmd
            return cmd
    return None


def _netns_list() -> list[str]:
    r = _run(["ip", "netns", "list"], check=False)
    return [ln.split()[0] for ln in r.stdout.splitlines() if ln.strip()]


def _kill_ns_pids(ns: str) -> None:
    """SIGKILL processes still living in a namespace this lab created (so it really goes away)."""
    r = _run(["ip", "netns", "pids", ns], check=False)
    for tok in r.stdout.split():
        try:
            os.kill(int(tok), signal.SIGKILL)
        except (ValueError, ProcessLookupError):
            pass


def lab_ready(who: str) -> bool:
    """For a bench that needs the lab: False, having printed why `who` is skipped, where the lab
    cannot run; else True, with the namespaces that dead runs left removed."""
    reason = lab_available()
    if reason:
        print(f"{who} skipped: {reason}", flush=True)
        return False
    sweep_stale()
    return True


def sweep_stale() -> list[str]:
    """Delete lab namespaces left by a dead process (name carries the creator's PID).

    Only touches namespaces named ``ntl<pid>-...`` whose <pid> is no longer running.
    Returns the names removed.
    """
    removed = []
    for ns in _netns_list():
        m = _STALE_RE.match(ns)
        if m and not pid_alive(int(m.group(1))):
            _kill_ns_pids(ns)
            _run(["ip", "netns", "del", ns], check=False)
            shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)
            removed.append(ns)
    return removed


@dataclass(eq=False)
class Router:
    """A NAT router namespace: ``wan`` on the internet bridge, bridge ``lan`` for its site."""

    name: str
    ns: str
    wan4: str
    lan_net: ipaddress.IPv4Network
    kind: str  # "eim" | "symmetric"
    firewall: bool = True

    @property
    def gw4(self) -> str:
        return str(self.lan_net.network_address + 1)


@dataclass(eq=False)
class Site:
    """A place a host can be attached to.

    ``public4``/``public6``: the address the world sees for hosts of this site — the NAT's
    WAN address for "eim"/"symmetric", the first host's own address for "public"/"ipv6only"
    (every host of a public site has its own public address).
    """

    name: str
    kind: str
    router: Router | None = None
    hosts: list["Host"] = field(default_factory=list)  # hosts attached right now
    first: "Host | None" = None  # the host made with the site

    @property
    def host(self) -> "Host":
        """The host created together with the site (even if it has moved away since)."""
        return self.first

    @property
    def public4(self) -> str | None:
        if self.router is not None:
            return self.router.wan4
        return self.first.addr4 if self.first else None

    @property
    def public6(self) -> str | None:
        if self.router is not None:
            return None
        return self.first.addr6 if self.first else None

    @property
    def natted(self) -> bool:
        return self.router is not None


@dataclass(eq=False)
class Host:
    """An end host namespace with one uplink ``eth0``.

    ``addr4``/``addr6`` are the host's *own* current addresses (private 10.x for NATed hosts,
    None when absent); ``public4`` is what a public server sees (NAT WAN or own address).
    """

    lab: "Lab"
    name: str
    ns: str
    site: Site | None = None
    addr4: str | None = None
    addr6: str | None = None
    pub_index: int | None = None  # N of 198.18.0.N / ::N when on the internet
    uplinks: dict[str, str] = field(default_factory=dict)  # extra uplinks (add_uplink): ifname -> addr

    @property
    def public4(self) -> str | None:
        if self.site is not None and self.site.router is not None:
            return self.site.router.wan4
        return self.addr4

    @property
    def public6(self) -> str | None:
        return self.addr6

    def run(self, argv: Sequence[str], **popen_kw) -> subprocess.Popen:
        """``lab.run(self, argv, ...)``."""
        return self.lab.run(self, argv, **popen_kw)

    def exec(self, argv: Sequence[str], **kw) -> subprocess.CompletedProcess:
        """``lab.exec(self, argv, ...)``."""
        return self.lab.exec(self, argv, **kw)

    def __repr__(self) -> str:
        return f"Host({self.name!r}, ns={self.ns!r}, addr4={self.addr4}, addr6={self.addr6})"


NsLike = "Host | Router | Site | str"


class Lab:
    """One self-contained NAT lab (see the module docstring for the picture and address plan).

    The constructor builds the internet bridge and the server host ``lab.server``
    (198.18.0.10, 2001:db8:0:1::10).  Everything else is added on demand.  Use as a context
    manager or call ``teardown()``; an atexit hook tears down labs that were left up.
    """

    def __init__(self, prefix: str | None = None):
        self.prefix = prefix or f"{NS_PREFIX}{os.getpid()}-{next(_counter)}"
        self.namespaces: list[str] = []
        self.procs: list[subprocess.Popen] = []
        self.sites: dict[str, Site] = {}
        self.hosts: dict[str, Host] = {}
        self.routers: dict[str, Router] = {}
        self._next_pub = SERVER_INDEX
        self._next_router = 1
        self._next_port = 0
        self._torn_down = False
        _live_labs.add(self)
        try:
            self.inet = self._add_ns("inet")
            self.ipt = _detect_iptables(self.inet)
            if self.ipt is None:
                raise LabError("no working iptables backend (nft or legacy)")
            self._ip(self.inet, "link", "add", "br0", "type", "bridge")
            self._ip(self.inet, "link", "set", "br0", "up")
            self._ip(self.inet, "addr", "add", f"{GW4}/24", "dev", "br0")
            self._ip(self.inet, "-6", "addr", "add", f"{GW6}/64", "dev", "br0", "nodad")
            self.server = self.add_public_host("srv")
        except BaseException:
            self.teardown()
            raise

    # ------------------------------------------------------------------ plumbing
    def _nsname(self, role: str, name: str) -> str:
        return f"{self.prefix}-{role}" if not name else f"{self.prefix}-{role}-{name}"

    def _add_ns(self, role: str, name: str = "") -> str:
        ns = self._nsname(role, name)
        _run(["ip", "netns", "add", ns])
        self.namespaces.append(ns)
        self._ip(ns, "link", "set", "lo", "up")
        return ns

    def _ip(self, ns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return _run(["ip", "-n", ns, *args], check=check)

    def _nsx(self, ns: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        return _run(["ip", "netns", "exec", ns, *argv], check=check)

    def _iptables(self, ns: str, *args: str) -> None:
        self._nsx(ns, self.ipt, "-w", *args)

    def _sysctl(self, ns: str, **kv) -> None:
        self._nsx(ns, "sysctl", "-qw", *[f"{k.replace('__', '.')}={v}" for k, v in kv.items()])

    def _port_name(self) -> str:
        self._next_port += 1
        return f"v{self._next_port}"

    def _plug(self, ns: str, ifname: str, bridge_ns: str, bridge: str) -> None:
        """veth ``ifname`` in ``ns`` <-> fresh port enslaved to ``bridge`` in ``bridge_ns``."""
        port = self._port_name()
        _run(["ip", "link", "add", ifname, "netns", ns, "type", "veth", "peer", "name", port, "netns", bridge_ns])
        self._ip(bridge_ns, "link", "set", port, "master", bridge, "up")
        self._ip(ns, "link", "set", ifname, "up")

    @staticmethod
    def _check_name(name: str) -> None:
        if not _NAME_RE.match(name):
            raise ValueError(f"lab names are 1-12 chars of [a-z0-9], got {name!r}")

    def _ns_of(self, x) -> str:
        if isinstance(x, (Host, Router)):
            return x.ns
        if isinstance(x, Site):
            return x.router.ns if x.router is not None else x.first.ns
        if isinstance(x, str):
            if x in self.namespaces:
                return x
            if x in self.hosts:
                return self.hosts[x].ns
            if x in self.routers:
                return self.routers[x].ns
            if x == "inet":
                return self.inet
        raise KeyError(f"not a namespace of this lab: {x!r}")

    # ------------------------------------------------------------------ building
    def _alloc_pub(self, host: Host) -> int:
        if host.pub_index is None:
            if self._next_pub > 99:
                raise LabError("out of public host addresses (198.18.0.10-99)")
            host.pub_index = self._next_pub
            self._next_pub += 1
        return host.pub_index

    def _new_host(self, name: str) -> Host:
        self._check_name(name)
        if name in self.hosts:
            raise ValueError(f"host {name!r} exists")
        h = Host(self, name, self._add_ns("h", name))
        self.hosts[name] = h
        return h

    def _attach(self, host: Host, site: Site | None, v4: bool = True, v6: bool = True) -> None:
        """(Re)create ``eth0`` of ``host`` on ``site`` (None = plain public host)."""
        self._ip(host.ns, "link", "del", "eth0", check=False)  # also removes the old peer
        host.addr4 = host.addr6 = None
        if host.site is not None and host in host.site.hosts:
            host.site.hosts.remove(host)
        kind = site.kind if site is not None else "public"
        if kind in ("public", "ipv6only"):
            n = self._alloc_pub(host)
            self._plug(host.ns, "eth0", self.inet, "br0")
            if kind == "public" and v4:
                host.addr4 = str(INET4.network_address + n)
                self._ip(host.ns, "addr", "add", f"{host.addr4}/24", "dev", "eth0")
                self._ip(host.ns, "route", "replace", "default", "via", GW4)
            if kind == "ipv6only" or v6:
                host.addr6 = f"2001:db8:0:1::{n}"
                self._ip(host.ns, "-6", "addr", "add", f"{host.addr6}/64", "dev", "eth0", "nodad")
                self._ip(host.ns, "-6", "route", "replace", "default", "via", GW6)
        else:
            r = site.router
            used = {h.addr4 for h in site.hosts}
            addr = next(str(a) for a in itertools.islice(r.lan_net.hosts(), 1, None) if str(a) not in used)
            self._plug(host.ns, "eth0", r.ns, "lan")
            host.addr4 = addr
            self._ip(host.ns, "addr", "add", f"{addr}/{r.lan_net.prefixlen}", "dev", "eth0")
            self._ip(host.ns, "route", "replace", "default", "via", r.gw4)
        host.site = site
        if site is not None:
            site.hosts.append(host)

    def add_public_host(self, name: str, v4: bool = True, v6: bool = True) -> Host:
        """A host directly on the internet bridge with its own 198.18.0.N / 2001:db8:0:1::N.

        For servers (DCs, RS, chain) and public nodes.  ``lab.server`` is the first one ("srv").
        """
        h = self._new_host(name)
        self._attach(h, None, v4=v4, v6=v6)
        return h

    def add_site(self, name: str, kind: str, host: str | None = None) -> Site:
        """A site of ``kind`` ("public" | "eim" | "symmetric" | "ipv6only") with one host.

        The host is named ``host`` (default: the site name) and is ``site.host``.  NAT kinds
        also build a router namespace (``site.router``) with MASQUERADE (``--random`` for
        "symmetric") and the home-router firewall on its WAN.
        """
        self._check_name(name)
        if kind not in KINDS:
            raise ValueError(f"site kind must be one of {KINDS}, got {kind!r}")
        if name in self.sites:
            raise ValueError(f"site {name!r} exists")
        site = Site(name, kind)
        self.sites[name] = site
        if kind in ("eim", "symmetric"):
            i = self._next_router
            if i > 99:
                raise LabError("out of NAT routers")
            self._next_router += 1
            r = Router(
                name,
                self._add_ns("r", name),
                str(INET4.network_address + ROUTER_BASE + i),
                ipaddress.ip_network(f"10.{i}.0.0/24"),
                kind,
            )
            self.routers[name] = r
            site.router = r
            self._plug(r.ns, "wan", self.inet, "br0")
            self._ip(r.ns, "addr", "add", f"{r.wan4}/24", "dev", "wan")
            self._ip(r.ns, "route", "add", "default", "via", GW4)
            self._ip(r.ns, "link", "add", "lan", "type", "bridge")
            self._ip(r.ns, "link", "set", "lan", "up")
            self._ip(r.ns, "addr", "add", f"{r.gw4}/24", "dev", "lan")
            self._sysctl(r.ns, net__ipv4__ip_forward=1)
            self.set_nat(site, kind)
            self.set_firewall(site, True)
        site.first = self.add_host(host or name, site)
        return site

    def add_host(self, name: str, site: Site | str) -> Host:
        """Another host in an existing site (e.g. two hosts behind the same NAT)."""
        site = self.sites[site] if isinstance(site, str) else site
        h = self._new_host(name)
        self._attach(h, site)
        return h

    def add_lan_host(self, name: str, gateway: Host | str, net: str) -> Host:
        """A plain host on a private LAN ``net`` behind ``gateway`` (a host: a subnet router
        node): veth ``lan0`` in the gateway with the LAN's first address, ``eth0`` here with the
        second and a default route via the gateway, nothing else (no route to anything beyond)."""
        gw = self.hosts[gateway] if isinstance(gateway, str) else gateway
        lan = ipaddress.ip_network(net)
        gw_addr, addr = lan.network_address + 1, lan.network_address + 2
        h = self._new_host(name)
        _run(["ip", "link", "add", "lan0", "netns", gw.ns, "type", "veth", "peer", "name", "eth0", "netns", h.ns])
        self._ip(gw.ns, "addr", "add", f"{gw_addr}/{lan.prefixlen}", "dev", "lan0")
        self._ip(gw.ns, "link", "set", "lan0", "up")
        self._ip(h.ns, "addr", "add", f"{addr}/{lan.prefixlen}", "dev", "eth0")
        self._ip(h.ns, "link", "set", "eth0", "up")
        self._ip(h.ns, "route", "add", "default", "via", str(gw_addr))
        h.addr4 = str(addr)
        return h

    def add_uplink(self, host: Host | str, site: Site | str, ifname: str = "eth1", metric: int = 200) -> str:
        """A second uplink for ``host``: veth ``ifname`` on the LAN of NAT ``site``, with address
        10.i.0.(200+k) (clear of ``_attach``'s allocation from .2 up) and a default route of a
        higher ``metric``: the kernel sends through ``eth0`` while it is up and through this one as
        soon as ``eth0``'s routes go (a phone's Wi-Fi and cellular). Returns the address."""
        host = self.hosts[host] if isinstance(host, str) else host
        site = self.sites[site] if isinstance(site, str) else site
        r = site.router
        if r is None:
            raise ValueError("a second uplink goes to a NAT site")
        taken = {a for h in self.hosts.values() for a in h.uplinks.values()}
        addr = next(
            str(r.lan_net.network_address + n)
            for n in range(200, 254)
            if str(r.lan_net.network_address + n) not in taken
        )
        self._plug(host.ns, ifname, r.ns, "lan")
        self._ip(host.ns, "addr", "add", f"{addr}/{r.lan_net.prefixlen}", "dev", ifname)
        self._ip(host.ns, "route", "add", "default", "via", r.gw4, "dev", ifname, "metric", str(metric))
        host.uplinks[ifname] = addr
        return addr

    def set_link(self, host: Host | str, ifname: str, up: bool) -> None:
        """``ip link set <ifname> up|down`` in a host (down: the kernel drops its routes at once)."""
        host = self.hosts[host] if isinstance(host, str) else host
        self._ip(host.ns, "link", "set", ifname, "up" if up else "down")

    # ------------------------------------------------------------------ knobs
    def _router(self, x) -> Router:
        if isinstance(x, Router):
            return x
        if isinstance(x, Site) and x.router is not None:
            return x.router
        if isinstance(x, str) and x in self.routers:
            return self.routers[x]
        raise KeyError(f"not a NAT site/router of this lab: {x!r}")

    def _routers(self, router_or_all) -> list[Router]:
        if router_or_all is None or router_or_all == "all":
            return list(self.routers.values())
        if isinstance(router_or_all, (list, tuple, set)):
            return [self._router(x) for x in router_or_all]
        return [self._router(router_or_all)]

    def set_nat(self, site, kind: str) -> None:
        """Switch a NAT site between "eim" and "symmetric" (flushes its conntrack table)."""
        if kind not in ("eim", "symmetric"):
            raise ValueError("NAT kind must be 'eim' or 'symmetric'")
        r = self._router(site)
        self._iptables(r.ns, "-t", "nat", "-F", "POSTROUTING")
        extra = ["--random"] if kind == "symmetric" else []
        self._iptables(r.ns, "-t", "nat", "-A", "POSTROUTING", "-o", "wan", "-j", "MASQUERADE", *extra)
        r.kind = kind
        if r.name in self.sites:
            self.sites[r.name].kind = kind
        self.flush_conntrack(r)

    def set_firewall(self, site, on: bool) -> None:
        """Home-router WAN firewall: accept ESTABLISHED,RELATED inbound, drop the rest.

        Rules live in filter INPUT and FORWARD (``-i wan``).  Dropping unsolicited inbound
        keeps its conntrack entry unconfirmed, which is what makes hole punching reliable.
        """
        r = self._router(site)
        for chain in ("INPUT", "FORWARD"):
            self._iptables(r.ns, "-F", chain)
            if on:
                self._iptables(
                    r.ns,
                    "-A",
                    chain,
                    "-i",
                    "wan",
                    "-m",
                    "conntrack",
                    "--ctstate",
                    "ESTABLISHED,RELATED",
                    "-j",
                    "ACCEPT",
                )
                self._iptables(r.ns, "-A", chain, "-i", "wan", "-j", "DROP")
        r.firewall = on

    def restrict_egress(self, site, on: bool) -> None:
        """A network that lets out only DNS and web traffic (TCP 80/443), as hotel and corporate
        networks do: the router drops every other new flow from its LAN (chain EGRESS, jumped to
        first in FORWARD). ``on=False`` lets everything out again."""
        r = self._router(site)
        jump = ("FORWARD", "-i", "lan", "-o", "wan", "-j", "EGRESS")
        if on:
            self._nsx(r.ns, self.ipt, "-w", "-N", "EGRESS", check=False)
            self._iptables(r.ns, "-F", "EGRESS")
            for rule in (
                ("-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED"),
                ("-p", "udp", "--dport", "53"),
                ("-p", "tcp", "--dport", "53"),
                ("-p", "tcp", "-m", "multiport", "--dports", "80,443"),
            ):
                self._iptables(r.ns, "-A", "EGRESS", *rule, "-j", "RETURN")
            self._iptables(r.ns, "-A", "EGRESS", "-j", "DROP")
            self._iptables(r.ns, "-I", *jump[:1], "1", *jump[1:])
        else:
            self._iptables(r.ns, "-D", *jump)

    def redirect_port(self, ns, port: int, to_port: int) -> None:
        """Incoming TCP to `port` on `ns`'s IPv4 addresses goes to `to_port` (a service published on
        a web port, as behind a reverse proxy)."""
        self._iptables(
            self._ns_of(ns),
            "-t",
            "nat",
            "-A",
            "PREROUTING",
            "-p",
            "tcp",
            "--dport",
            str(port),
            "-j",
            "REDIRECT",
            "--to-ports",
            str(to_port),
        )

    def set_udp_timeout(self, router_or_all=None, seconds: int = 30) -> None:
        """Set net.netfilter.nf_conntrack_udp_timeout and ..._udp_timeout_stream in NAT routers.

        ``router_or_all``: a Site/Router/site name, a list of them, or None/"all" for every
        router.  Kernel defaults are 30 s / 120 s; existing entries keep their current expiry
        until their next packet.
        """
        for r in self._routers(router_or_all):
            self._sysctl(
                r.ns,
                net__netfilter__nf_conntrack_udp_timeout=int(seconds),
                net__netfilter__nf_conntrack_udp_timeout_stream=int(seconds),
            )

    def flush_conntrack(self, router_or_all=None) -> None:
        """Forget every NAT mapping (``conntrack -F``) in the given routers (default: all)."""
        for r in self._routers(router_or_all):
            self._nsx(r.ns, "conntrack", "-F", check=False)

    def conntrack(self, site, *args: str) -> str:
        """``conntrack -L [args]`` output in a NAT router (for debugging/assertions)."""
        return self._nsx(self._router(site).ns, "conntrack", "-L", *args, check=False).stdout

    def move(self, host: Host | str, to_site: Site | str | None) -> Host:
        """Re-home ``host`` onto ``to_site`` (a Site, site name, or None/"internet").

        The host namespace and its processes stay; only ``eth0`` is replaced: the old veth is
        deleted (its peer on the old bridge goes with it) and a new one is plugged into the
        target bridge (internet ``br0`` or the NAT router's ``lan``) with the target's
        addresses and default route.  Moving to the internet (None, "internet" or a "public"
        site) gives the host its own stable 198.18.0.N + ::N, to an "ipv6only" site only ::N,
        to a NAT site the next free 10.i.0.x.  Wildcard-bound unconnected sockets keep
        working and send from the new address right away.
        """
        host = self.hosts[host] if isinstance(host, str) else host
        if to_site in (None, "internet"):
            site = None
        else:
            site = self.sites[to_site] if isinstance(to_site, str) else to_site
        self._attach(host, site)
        return host

    def set_hosts(self, ns, names: dict[str, list[str]], nameserver: str | None = None) -> None:
        """Give programs in a namespace an /etc/hosts (and with `nameserver` an /etc/resolv.conf)
        of their own: `ip netns exec` bind-mounts /etc/netns/<ns>/*. E.g. a DC name with both
        its IPv4 and IPv6 address, so a node reaches it from IPv4-only and IPv6-only networks."""
        d = NETNS_ETC / self._ns_of(ns)
        d.mkdir(parents=True, exist_ok=True)
        lines = ["127.0.0.1 localhost", "::1 localhost"]
        lines += [f"{ip} {name}" for name, ips in names.items() for ip in ips]
        (d / "hosts").write_text("\n".join(lines) + "\n")
        if nameserver is not None:
            (d / "resolv.conf").write_text(f"nameserver {nameserver}\n")

    # ------------------------------------------------------------------ processes
    def run(self, ns, argv: Sequence[str], **popen_kw) -> subprocess.Popen:
        """Start ``argv`` inside a namespace (Host, Router, Site, host/router name or ns name).

        Returns the subprocess.Popen of ``ip netns exec <ns> argv`` (ip execs argv, so the
        PID is the program's).  Defaults: stdout/stderr PIPE, text mode, new session (so
        teardown can kill its whole process group).  With PIPEs, drain them (``expect()``
        does, in a thread) or pass files/DEVNULL for chatty long-running daemons.
        """
        popen_kw.setdefault("stdout", subprocess.PIPE)
        popen_kw.setdefault("stderr", subprocess.PIPE)
        popen_kw.setdefault("text", True)
        popen_kw.setdefault("start_new_session", True)
        p = subprocess.Popen(["ip", "netns", "exec", self._ns_of(ns), *argv], **popen_kw)
        self.procs.append(p)
        return p

    def exec(
        self, ns, argv: Sequence[str], check: bool = False, timeout: float = 30, **kw
    ) -> subprocess.CompletedProcess:
        """Run ``argv`` inside a namespace to completion; returns CompletedProcess (text)."""
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        return subprocess.run(["ip", "netns", "exec", self._ns_of(ns), *argv], check=check, timeout=timeout, **kw)

    def python(self, ns, *args: str, **popen_kw) -> subprocess.Popen:
        """``run(ns, [sys.executable, *args])`` — the venv interpreter, inside the namespace."""
        return self.run(ns, [sys.executable, *args], **popen_kw)

    def kill(self, proc: subprocess.Popen, grace: float = 2.0) -> None:
        """Stop a process started by ``run`` (SIGTERM to its group, SIGKILL after ``grace``)."""
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                proc.terminate()
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    proc.kill()
                proc.wait(5)
        for f in (proc.stdin, proc.stdout, proc.stderr):
            try:
                if f is not None and getattr(proc, "_lab_reader", None) is None:
                    f.close()
            except OSError:
                pass

    # ------------------------------------------------------------------ teardown
    def teardown(self) -> None:
        """Kill every process started here, delete every namespace created here.

        Idempotent; safe after a partial build; also run at interpreter exit.
        """
        if self._torn_down:
            return
        for p in self.procs:
            try:
                self.kill(p, grace=1.0)
            except Exception:
                pass
        for ns in reversed(self.namespaces):
            _kill_ns_pids(ns)
            _run(["ip", "netns", "del", ns], check=False)
            shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)
        self._torn_down = True
        _live_labs.discard(self)

    def __enter__(self) -> "Lab":
        return self

    def __exit__(self, *exc) -> None:
        self.teardown()

    def describe(self) -> str:
        """One line per host: name, namespace, site, addresses (handy in failure messages)."""
        out = []
        for h in self.hosts.values():
            site = f"{h.site.name}({h.site.kind})" if h.site else "internet"
            out.append(f"{h.name:8} {h.ns:28} {site:16} v4={h.addr4} v6={h.addr6} pub4={h.public4}")
        for r in self.routers.values():
            out.append(f"{'nat ' + r.name:8} {r.ns:28} {r.kind:16} wan={r.wan4} lan={r.lan_net}")
        return "\n".join(out)


@atexit.register
def _teardown_all() -> None:
    for lab in list(_live_labs):
        try:
            lab.teardown()
        except Exception:
            pass


# ---------------------------------------------------------------------- output helpers
class _LineReader:
    def __init__(self, stream):
        self.q: queue.Queue = queue.Queue()
        self.lines: list[str] = []
        self.t = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self.t.start()

    def _pump(self, stream) -> None:
        try:
            for line in stream:
                self.q.put(line.rstrip("\n"))
        except (ValueError, OSError):
            pass
        self.q.put(None)


def _ending_of(proc: subprocess.Popen) -> str:
    """How an expected process ended: its exit status and the tail of its stderr (the reason a
    failed lab test needs, which would otherwise stay in the pipe)."""
    try:
        rc = proc.wait(5)
    except subprocess.TimeoutExpired:
        return "stdout closed, process still running"
    err = proc.stderr.read()[-2000:] if proc.stderr is not None and not proc.stderr.closed else ""
    return f"exit {rc}; stderr: {err.strip() or '(empty)'}"


def expect(proc: subprocess.Popen, pattern: str, timeout: float = 10.0) -> re.Match:
    """Wait until a stdout line of ``proc`` (started by ``Lab.run`` with stdout=PIPE, text)
    matches ``pattern`` (re.search); return the match.  Lines read so far are kept in
    ``proc._lab_reader.lines`` (see ``lines_of``).  Raises TimeoutError / EOFError.
    """
    rd = getattr(proc, "_lab_reader", None)
    if rd is None:
        rd = proc._lab_reader = _LineReader(proc.stdout)
    rx = re.compile(pattern)
    end = time.monotonic() + timeout
    while True:
        left = end - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no line matching {pattern!r} within {timeout}s; got {rd.lines[-20:]}")
        try:
            line = rd.q.get(timeout=left)
        except queue.Empty:
            continue
        if line is None:
            rd.q.put(None)
            raise EOFError(
                f"process ended before a line matching {pattern!r}; got {rd.lines[-20:]}; {_ending_of(proc)}"
            )
        rd.lines.append(line)
        m = rx.search(line)
        if m:
            return m


def lines_of(proc: subprocess.Popen, wait: float | None = None) -> list[str]:
    """All stdout lines of ``proc`` seen so far (if ``wait``: first wait for it to exit)."""
    if wait is not None:
        proc.wait(wait)
    rd = getattr(proc, "_lab_reader", None)
    if rd is None:
        rd = proc._lab_reader = _LineReader(proc.stdout)
    if wait is not None:
        rd.t.join(wait)
    while True:
        try:
            line = rd.q.get_nowait()
        except queue.Empty:
            break
        if line is None:
            rd.q.put(None)
            break
        rd.lines.append(line)
    return list(rd.lines)
