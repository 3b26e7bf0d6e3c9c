"""Wake up when the kernel's addresses or routes change (Linux rtnetlink), so the daemon acts on a
move at once instead of at its next poll (docs/PROTOCOL.md §8.3, "Telling peers at once").

    watch = NetWatch.open()          # no rtnetlink (not Linux, no permission): waits are plain sleeps
    await watch.wait(1.0)            # the next change (after it settles), or 1 s
    watch.close()

It only says *that* something changed; the caller compares what it cares about (its local
addresses towards the DC) and ignores changes that do not matter to it.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Callable

log = logging.getLogger("ntm.node")

# rtnetlink multicast groups (linux/rtnetlink.h): links, IPv4/IPv6 addresses and routes.
RTMGRP_LINK = 0x1
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV4_ROUTE = 0x40
RTMGRP_IPV6_IFADDR = 0x100
RTMGRP_IPV6_ROUTE = 0x400
GROUPS = RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_IFADDR | RTMGRP_IPV6_ROUTE
# A move is a burst of events (link down, link up, address, default route) over some tens of ms;
# waking up once it has been quiet this long acts on the new state, not on a half-configured one.
SETTLE_S = 0.05
RECV_BYTES = 65536


class NetWatch:
    def __init__(self, sock: socket.socket | None) -> None:
        self._sock = sock
        self._changed = asyncio.Event()
        if sock is not None:
            asyncio.get_running_loop().add_reader(sock.fileno(), self._readable)

    @classmethod
    def open(cls) -> "NetWatch":
        """Subscribe to rtnetlink address/route/link changes; without rtnetlink, a watch that
        never wakes early (the caller's poll interval is then all there is)."""
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK, socket.NETLINK_ROUTE)
            sock.bind((0, GROUPS))
        except (AttributeError, OSError) as exc:
            log.info("no rtnetlink (%s): address changes are polled", exc)
            return cls(None)
        return cls(sock)

    def _readable(self) -> None:
        """Drain what the kernel sent (its content does not matter) and note the change."""
        try:
            while self._sock.recv(RECV_BYTES):
                pass
        except BlockingIOError:
            pass
        except OSError:
            pass  # ENOBUFS: events were lost, which still means something changed
        self._changed.set()

    async def wait(self, timeout: float) -> None:
        """Until the next change has settled (quiet for SETTLE_S), or `timeout`."""
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except asyncio.TimeoutError:
            return
        while self._changed.is_set():
            self._changed.clear()
            await asyncio.sleep(SETTLE_S)

    def close(self) -> None:
        if self._sock is not None:
            asyncio.get_running_loop().remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None


async def follow_addresses(local_addrs: Callable[[], list[str]], changed: Callable[[str], None], poll_s: float) -> None:
    """Call `changed(why)` whenever `local_addrs()` differs from the last time it was read:
    checked on every rtnetlink change and at least every `poll_s` (the daemon's and an embedded
    node's move detection)."""
    watch = NetWatch.open()
    try:
        last = local_addrs()
        while True:
            await watch.wait(poll_s)
            now = local_addrs()
            if now != last:
                log.info("local addresses changed: %s -> %s", last, now)
                last = now
                changed("local address changed")
    finally:
        watch.close()
