"""Linux UDP offloads (include/uapi/linux/udp.h), which Python does not name: one recvmsg returns
a run of equal-size datagrams of one sender (GRO, with a cmsg giving the size), one sendmsg sends
a run of them (GSO, with a cmsg giving the size). Linux ≥ 5.0; elsewhere the options are refused."""

from __future__ import annotations

import errno
import socket
import sys
from typing import Sequence

SOL_UDP = 17
UDP_SEGMENT = 103
UDP_GRO = 104
#: The kernel's UDP_MAX_SEGMENTS: datagrams one GSO send may carry.
GSO_MAX_SEGMENTS = 64
#: Bytes one GSO send may carry (a UDP datagram's payload limit, IPv6 header room kept).
GSO_MAX_BYTES = 65000
#: One recvmsg's buffer: a GRO run is at most one 64 KiB super-datagram.
RECV_BUFFER = 65536
#: Ancillary room for the UDP_GRO cmsg (an int).
GRO_CMSG_SPACE = socket.CMSG_SPACE(4)
#: Errors of a GSO send that mean "no UDP GSO here" (kernel, device or path), not a lost datagram.
NO_GSO_ERRNOS = frozenset({errno.EIO, errno.EINVAL, errno.ENOPROTOOPT, errno.EOPNOTSUPP})


def segments_per_send(datagram_max: int) -> int:
    """Datagrams of at most `datagram_max` bytes that one GSO send may carry (at least 1)."""
    return max(1, min(GSO_MAX_SEGMENTS, GSO_MAX_BYTES // datagram_max))


def enable_gro(sock: socket.socket) -> bool:
    """Ask for GRO runs on `sock`; False where the kernel has no UDP GRO."""
    try:
        sock.setsockopt(SOL_UDP, UDP_GRO, 1)
    except OSError:
        return False
    return True


def gro_segment(ancdata: list) -> int:
    """The segment size of a GRO run from recvmsg's ancillary data; 0 for a single datagram."""
    for level, kind, data in ancdata:
        if level == SOL_UDP and kind == UDP_GRO:
            return int.from_bytes(data[:4], sys.byteorder)
    return 0


def send_gso(sock: socket.socket, buffers: Sequence[bytes], seg: int, addr: tuple) -> None:
    """Send the bytes of `buffers` (one run, or one buffer per datagram: the kernel gathers them)
    as datagrams of `seg` bytes (the last may be shorter) in one sendmsg; raises OSError as sendmsg
    does (errno in NO_GSO_ERRNOS: no GSO here, send one by one)."""
    sock.sendmsg(buffers, [(SOL_UDP, UDP_SEGMENT, seg.to_bytes(2, sys.byteorder))], 0, addr)
