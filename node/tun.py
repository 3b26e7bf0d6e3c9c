"""The TUN device: a Linux virtual interface whose packets the daemon reads and writes.

Thin by design: open /dev/net/tun, give the interface its addresses, routes and MTU with `ip`,
and hand whole IP packets to a callback from the event loop (several per wake-up, until the
device is drained). What to do with a packet is ntm/overlay.py's business.

    tun = Tun.open("ntm0", mtu=1419, v6=..., v4=..., v4_net=...)
    tun.start(on_packet); tun.write(pkt); tun.close()
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import shutil
import struct
import subprocess
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Callable

from ntm.errors import NtmError

TUN_DEVICE = "/dev/net/tun"
TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFNAMSIZ = 16
#: Packets read per wake-up before yielding to the loop: enough to amortise the wake-up, few
#: enough that the socket side is served between batches.
READ_BATCH = 64
#: Longest packet read: the interface MTU is far below it.
READ_SIZE = 65536


class TunError(NtmError):
    """The TUN interface cannot be created or configured (not root, no /dev/net/tun, bad name)."""


def tun_unavailable() -> str | None:
    """Why this process cannot run a TUN interface, or None if it can."""
    if os.geteuid() != 0:
        return "not root (a TUN interface needs CAP_NET_ADMIN)"
    if not os.path.exists(TUN_DEVICE):
        return f"{TUN_DEVICE} does not exist"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is missing"
    return None


def _ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if r.returncode != 0:
        raise TunError(f"ip {' '.join(args)}: {r.stderr.strip() or r.returncode}")


class Tun:
    def __init__(self, fd: int, name: str) -> None:
        self.fd = fd
        self.name = name
        self.rx_packets = self.tx_packets = self.write_errors = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def open(cls, name: str, mtu: int, v6: IPv6Address, v6_net: IPv6Network, v4: IPv4Address,
             v4_net: IPv4Network) -> Tun:
        """Create `name` with our addresses; the overlay prefixes route into it."""
        if not name or len(name.encode()) >= IFNAMSIZ or "/" in name or " " in name:
            raise TunError(f"bad interface name {name!r} (1-15 characters, no '/' or spaces)")
        why = tun_unavailable()
        if why:
            raise TunError(f"cannot create TUN interface {name}: {why}")
        fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            ifr = fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), IFF_TUN | IFF_NO_PI))
            real = ifr[:IFNAMSIZ].rstrip(b"\0").decode()
            _ip("link", "set", real, "mtu", str(mtu))
            _ip("-6", "addr", "add", f"{v6}/{v6_net.prefixlen}", "dev", real, "nodad")
            _ip("addr", "add", f"{v4}/{v4_net.prefixlen}", "dev", real)
            _ip("link", "set", real, "up")
        except (OSError, TunError) as exc:
            os.close(fd)
            raise TunError(f"cannot create TUN interface {name}: {exc}") from None
        return cls(fd, real)

    def start(self, on_packet: Callable[[bytes], None], on_drained: Callable[[], None]) -> None:
        """Call `on_packet` for every packet the kernel routes into the interface, and
        `on_drained` after each batch (up to READ_BATCH packets read in one wake-up)."""
        self._loop = asyncio.get_running_loop()
        fd, read = self.fd, os.read

        def readable() -> None:
            n = 0
            try:
                while n < READ_BATCH:
                    pkt = read(fd, READ_SIZE)
                    n += 1
                    on_packet(pkt)
            except OSError:
                pass  # EAGAIN: drained (anything else: the next wake-up tries again)
            self.rx_packets += n
            on_drained()

        self._loop.add_reader(fd, readable)

    def write(self, pkt: bytes) -> None:
        try:
            os.write(self.fd, pkt)
            self.tx_packets += 1
        except OSError:
            self.write_errors += 1  # full queue or a packet the kernel refuses: like a drop

    def close(self) -> None:
        """Remove the interface (closing the last descriptor deletes it, addresses and routes)."""
        if self._loop is not None:
            self._loop.remove_reader(self.fd)
        os.close(self.fd)

    def stats(self) -> dict[str, int]:
        return {"rx_packets": self.rx_packets, "tx_packets": self.tx_packets, "write_errors": self.write_errors}
