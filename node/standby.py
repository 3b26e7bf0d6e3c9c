"""The thin adapter around node/uplinks.py: reads the uplinks from the kernel's routing table
(woken by rtnetlink the moment a link or route changes, else polled), sends the DC probes and the
STANDBY packets it decides on, feeds it what arrives, and tells the node when the primary uplink
changed so every peer hears from our new address at once (docs/PROTOCOL.md §8.3 "Standby paths").
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import itertools
import logging
import socket
from pathlib import Path

from node.agent import Node
from node.uplinks import PrimaryChanged, ProbeDc, SendStandby, Standby, Uplink
from ntm import keepalive
from ntm.addr import for_socket, format_endpoint, parse_endpoint, unmapped
from ntm.errors import ParseError
from ntm.tunnel import Standby as StandbyEvent
from ntm.tunnel import TunnelError

log = logging.getLogger("ntm.node")

# Standby decisions run this often: echo rounds and first tries go out within it (a switch of
# uplink does not wait for it: rtnetlink wakes the adapter at once).
TICK_S = 0.1
# The routing table is also re-read this often: the safety net when rtnetlink is missing (not
# Linux, refused) or its events were dropped; a lost uplink is then noticed this late.
UPLINK_POLL_S = 0.5
# RTMGRP_LINK | IPV4_IFADDR | IPV4_ROUTE | IPV6_IFADDR | IPV6_ROUTE: a link going down sends its
# RTM_NEWLINK before IPv4 flushes the routes (no RTM_DELROUTE for those), then IPv6's deletions.
_RTMGRP = 0x1 | 0x10 | 0x40 | 0x100 | 0x400
_RTF_UP, _RTF_REJECT = 0x1, 0x200
ROUTE4, ROUTE6 = Path("/proc/net/route"), Path("/proc/net/ipv6_route")


@functools.lru_cache(maxsize=4096)
def _endpoint(host: str, port: int) -> str:
    """A socket address as node/uplinks.py names it (cached: every tunnel's, every tick)."""
    return format_endpoint(host, port)


def default_routes(family: int, route4: Path = ROUTE4, route6: Path = ROUTE6) -> list[Uplink]:
    """Interfaces with a usable default route of IP version `family`, from /proc (no tools)."""
    out: dict[str, int] = {}
    try:
        if family == 4:
            for line in route4.read_text().splitlines()[1:]:
                f = line.split()
                if len(f) >= 8 and f[1] == "00000000" and f[7] == "00000000" and int(f[3], 16) & _RTF_UP:
                    out[f[0]] = min(out.get(f[0], 1 << 32), int(f[6]))
        else:
            for line in route6.read_text().splitlines():
                f = line.split()
                flags = int(f[8], 16) if len(f) >= 10 else 0
                if len(f) >= 10 and f[0] == "0" * 32 and f[1] == "00" and flags & _RTF_UP and not flags & _RTF_REJECT:
                    out[f[9]] = min(out.get(f[9], 1 << 32), int(f[5], 16))
    except OSError:
        return []
    ups = []
    for name, metric in out.items():
        try:
            ups.append(Uplink(name, socket.if_nametoindex(name), metric))
        except OSError:
            continue  # gone since the table was read
    return ups


class StandbyPaths:
    """Runs node/uplinks.py's Standby for a running Node."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.ep = node.endpoint
        self.standby = Standby(node.session.keepalive_interval)
        self.family = 0  # IP version of the uplinks watched: the DC's (set at the first refresh)
        self._probe_seq = itertools.count(node.session.clock.wall_ms())
        self._probes: dict[int, int] = {}  # seq → ifindex of standby probes in flight
        self._changed = asyncio.Event()
        self._netlink: socket.socket | None = None
        self.ep.on_standby = self._on_standby
        self.ep.control_taps[keepalive.STANDBY_REPLY] = self._on_probe_reply

    def now(self) -> float:
        return self.node.session.clock.now()

    # --- life -----------------------------------------------------------------------------------
    async def run(self) -> None:
        self._open_netlink()
        try:
            polled = 0.0
            self._refresh_uplinks()
            while True:
                try:
                    await asyncio.wait_for(self._changed.wait(), TICK_S)
                except asyncio.TimeoutError:
                    pass
                now = self.now()
                if self._changed.is_set() or now - polled >= UPLINK_POLL_S:
                    self._changed.clear()
                    polled = now
                    self._refresh_uplinks()
                self.standby.set_tunnels(self._direct_tunnels())
                self._do(self.standby.tick(now))
        finally:
            if self._netlink is not None:
                asyncio.get_running_loop().remove_reader(self._netlink.fileno())
                self._netlink.close()

    def _open_netlink(self) -> None:
        try:
            s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK, 0)
            s.bind((0, _RTMGRP))
        except (OSError, AttributeError) as exc:
            log.info("no rtnetlink (%s): uplinks polled every %.1f s", exc, UPLINK_POLL_S)
            return
        self._netlink = s
        asyncio.get_running_loop().add_reader(s.fileno(), self._on_netlink)

    def _on_netlink(self) -> None:
        assert self._netlink is not None
        try:
            while self._netlink.recv(65536):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:  # ENOBUFS: events were lost; re-reading the table covers them all
            pass
        self._refresh_uplinks()  # right here: the first packets after a switch must not wait a tick
        self._changed.set()

    def _family(self) -> int:
        try:
            return ipaddress.ip_address(unmapped(self.node.session.dc_ip or "")).version
        except ValueError:
            return 4

    def _refresh_uplinks(self) -> None:
        family = self._family()
        if family != self.family:
            # The DC is now reached over the other IP version (the node moved to an IPv6-only
            # network): uplinks of that version are a new starting point, not a switch.
            self.family = family
            self.standby = Standby(self.node.session.keepalive_interval)
        self._do(self.standby.set_uplinks(default_routes(family)))

    def _direct_tunnels(self) -> dict[bytes, str]:
        out = {}
        for t in self.node.tunnel_table.table.values():
            ch = t.channel.current
            s = ch.session
            if not ch.closed and s.established and s.peer_addr is not None and ch.via != "relay":
                out[s.path_id] = _endpoint(*s.peer_addr[:2])
        return out

    # --- doing what it says -----------------------------------------------------------------------
    def _do(self, actions) -> None:
        for a in actions:
            if isinstance(a, SendStandby):
                s = self.ep.sessions.get(a.path)
                if s is None:
                    continue
                try:
                    self.ep.send_standby(s, a.payload, for_socket(parse_endpoint(a.to), self.ep.family), a.ifindex)
                except TunnelError:
                    continue  # no keys right now (rekey edge): the next round sends
            elif isinstance(a, ProbeDc):
                sess = self.node.session
                if not sess.keepalive_ports or not sess.token:
                    continue
                seq = next(self._probe_seq)
                self._probes = {k: v for k, v in self._probes.items() if k > seq - 64}
                self._probes[seq] = a.ifindex
                pkt = keepalive.encode_request(self.node.id, seq, sess.token, keepalive.STANDBY_PROBE)
                self.ep.send_control_via(pkt, (sess.dc_ip, sess.keepalive_ports[0]), a.ifindex)
            elif isinstance(a, PrimaryChanged):
                log.info("primary uplink %s -> %s", a.old, a.new)
                self.node.network_changed(f"primary uplink {a.old} -> {a.new}")

    def _on_probe_reply(self, data: bytes, addr) -> None:
        try:
            seq, ip, port = keepalive.parse_reply(data, self.node.session.token, keepalive.STANDBY_REPLY)
        except ParseError:
            return
        ifindex = self._probes.pop(seq, None)
        if ifindex is not None:
            self.standby.on_probe_reply(ifindex, format_endpoint(ip, port), self.now())

    def _on_standby(self, path: bytes, ev: StandbyEvent) -> None:
        self._do(self.standby.on_standby(path, _endpoint(*ev.addr[:2]), ev.payload, self.now()))

    # --- status -----------------------------------------------------------------------------------
    def annotate(self, rows: list[dict], path_of: dict[str, bytes]) -> list[dict]:
        """`ntm status` peer rows (by checksummed peer ID) with their tunnel's standby paths."""
        now = self.now()
        for row in rows:
            path = path_of.get(row["peer"])
            st = self.standby.status(path, now) if path is not None else {}
            if st:
                row["standby"] = st
        return rows
