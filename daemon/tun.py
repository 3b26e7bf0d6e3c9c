"""The TUN device: a Linux virtual interface whose packets the daemon reads and writes.

Thin by design: open /dev/net/tun, give the interface its addresses, routes and MTU with `ip`,
and hand whole IP packets to a callback from the event loop (several per wake-up, until the
device is drained). What to do with a packet is ntm/overlay.py's business.

With offloads (the default where the kernel has them: IFF_VNET_HDR and TUNSETOFFLOAD, Linux ≥ 2.6
for TCP, ≥ 6.2 for UDP), every read starts with a virtio-net header and may be a TCP or UDP
super-packet of up to 64 KB, and writes may be one (ntm/offload.py splits and coalesces them).

    tun = Tun.open("ntm0", mtu=1419, v6=..., v4=..., v4_net=..., offload=True)
    tun.start(on_packet, on_drained); tun.write(pkt); tun.write_buffers([hdr, *pieces]); tun.close()
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import shutil
import struct
import subprocess
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Callable, Sequence

from ntm.errors import NtmError
from ntm.offload import NO_OFFLOAD, VNET_HDR_LEN

TUN_DEVICE = "/dev/net/tun"
TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUNSETOFFLOAD = 0x400454D0
# include/uapi/linux/if_tun.h: checksums may be left partial, TCP segmentation (IPv4, IPv6), UDP
# segmentation (IPv4, IPv6). Never TUN_F_TSO_ECN: ntm/offload.py does not split CWR runs.
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_USO4, TUN_F_USO6 = 0x01, 0x02, 0x04, 0x20, 0x40
TCP_OFFLOADS = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6
UDP_OFFLOADS = TUN_F_USO4 | TUN_F_USO6
IFNAMSIZ = 16
#: Packets read per wake-up before yielding to the loop: enough to amortise the wake-up, few
#: enough that the socket side is served between batches.
READ_BATCH = 64
#: Reads per wake-up with offloads: each may be a 64 KB super-packet (~45 segments), so 8 of
#: them are a batch as long as READ_BATCH plain packets ×6, yet the socket side still gets its turn.
READ_BATCH_VNET = 8
#: Longest read: a 64 KB super-packet and its virtio-net header (without offloads, far above the MTU).
READ_SIZE = 65536 + VNET_HDR_LEN


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


def _attach(name: str, flags: int) -> tuple[int, bytes]:
    """A new TUN descriptor attached to interface `name` (created if need be), and the ifreq answer."""
    fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        return fd, fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), flags))
    except OSError:
        os.close(fd)
        raise


def _create(name: str, offload: bool) -> tuple[int, bytes, bool, bool]:
    """A TUN descriptor for `name`, its ifreq answer, and whether TCP and UDP offloads are on.
    Offloads are asked for first; a kernel that refuses them gets a plain TUN, as before."""
    if offload:
        try:
            fd, ifr = _attach(name, IFF_TUN | IFF_NO_PI | IFF_VNET_HDR)
        except OSError:
            fd = -1
        if fd >= 0:
            try:
                fcntl.ioctl(fd, TUNSETOFFLOAD, TCP_OFFLOADS)
            except OSError:
                os.close(fd)  # the interface goes with its last descriptor: attach again, plain
            else:
                try:
                    fcntl.ioctl(fd, TUNSETOFFLOAD, TCP_OFFLOADS | UDP_OFFLOADS)
                    return fd, ifr, True, True
                except OSError:
                    return fd, ifr, True, False  # before Linux 6.2: TCP only
    fd, ifr = _attach(name, IFF_TUN | IFF_NO_PI)
    return fd, ifr, False, False


class Tun:
    def __init__(self, fd: int, name: str, vnet: bool = False, uso: bool = False) -> None:
        self.fd = fd
        self.name = name
        self.vnet = vnet  # reads and writes carry a virtio-net header (TCP offloads on)
        self.uso = uso  # UDP segmentation offload on too
        self.rx_packets = self.tx_packets = self.write_errors = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def open(
        cls,
        name: str,
        mtu: int,
        v6: IPv6Address,
        v6_net: IPv6Network,
        v4: IPv4Address,
        v4_net: IPv4Network,
        offload: bool = True,
    ) -> Tun:
        """Create `name` with our addresses; the overlay prefixes route into it. `offload`: use
        the kernel's TUN offloads if it has them (False: the one-packet-per-read path)."""
        if not name or len(name.encode()) >= IFNAMSIZ or "/" in name or " " in name:
            raise TunError(f"bad interface name {name!r} (1-15 characters, no '/' or spaces)")
        why = tun_unavailable()
        if why:
            raise TunError(f"cannot create TUN interface {name}: {why}")
        try:
            fd, ifr, vnet, uso = _create(name, offload)
        except OSError as exc:
            raise TunError(f"cannot create TUN interface {name}: {exc}") from None
        try:
            real = ifr[:IFNAMSIZ].rstrip(b"\0").decode()
            _ip("link", "set", real, "mtu", str(mtu))
            _ip("-6", "addr", "add", f"{v6}/{v6_net.prefixlen}", "dev", real, "nodad")
            _ip("addr", "add", f"{v4}/{v4_net.prefixlen}", "dev", real)
            _ip("link", "set", real, "up")
        except (OSError, TunError) as exc:
            os.close(fd)
            raise TunError(f"cannot create TUN interface {name}: {exc}") from None
        return cls(fd, real, vnet, uso)

    def start(self, on_packet: Callable[[bytes], None], on_drained: Callable[[], None]) -> None:
        """Call `on_packet` for every packet the kernel routes into the interface, and
        `on_drained` after each batch (up to READ_BATCH packets read in one wake-up). With
        offloads, each packet starts with its virtio-net header and is a writable view of one
        reused read buffer, valid until `on_packet` returns (its segments are cut in place)."""
        self._loop = asyncio.get_running_loop()
        fd = self.fd
        if self.vnet:
            buf = memoryview(bytearray(READ_SIZE))
            readv, bufs = os.readv, [buf]

            def read(fd: int, size: int) -> memoryview:
                return buf[: readv(fd, bufs)]

        else:
            read = os.read
        batch = READ_BATCH_VNET if self.vnet else READ_BATCH

        def readable() -> None:
            n = 0
            try:
                while n < batch:
                    pkt = read(fd, READ_SIZE)
                    n += 1
                    on_packet(pkt)
            except OSError:
                pass  # EAGAIN: drained (anything else: the next wake-up tries again)
            self.rx_packets += n
            on_drained()

        self._loop.add_reader(fd, readable)

    def write(self, pkt: bytes) -> None:
        """Write one whole packet (checksums complete)."""
        if self.vnet:
            self.write_buffers((NO_OFFLOAD, pkt))
            return
        try:
            os.write(self.fd, pkt)
            self.tx_packets += 1
        except OSError:
            self.write_errors += 1  # full queue or a packet the kernel refuses: like a drop

    def write_buffers(self, bufs: Sequence[bytes | memoryview]) -> None:
        """Write a virtio-net header and a packet given in pieces (offloads on; one writev, so a
        coalesced run's payloads are never joined in Python): a GSO super-packet the kernel takes
        as the segments it stands for, or NO_OFFLOAD and one whole packet."""
        try:
            os.writev(self.fd, bufs)
            self.tx_packets += 1
        except OSError:
            self.write_errors += 1

    def close(self) -> None:
        """Remove the interface (closing the last descriptor deletes it, addresses and routes)."""
        if self._loop is not None:
            self._loop.remove_reader(self.fd)
        os.close(self.fd)

    def stats(self) -> dict[str, int]:
        return {
            "rx_packets": self.rx_packets,
            "tx_packets": self.tx_packets,
            "write_errors": self.write_errors,
            "offload": int(self.vnet) + int(self.uso),
        }
