"""The relay's UDP adapter on real loopback sockets: a node's GSO send arrives as one GRO run, is
forwarded in order less the datagrams the table drops, with or without the kernel's offloads."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
from typing import AsyncIterator

import pytest

from daemon import udpgso
from daemon.service import udp_socket
from ntm import packet
from ntm.addr import for_socket
from rs import server
from rs.relay import RelayTable
from rs.server import Relay, RelayUdp
from rs.trust import DcTrust
from tests.fakes import FakeClock

PATH, TOKEN = os.urandom(8), os.urandom(32)
SIZE = 1200  # a full tunnel datagram's size, about


def dgram(i: int, path: bytes = PATH) -> bytes:
    return bytes([packet.TYPE_DATA]) + path + i.to_bytes(4, "big") + bytes(SIZE - 13)


async def recv(sock: socket.socket, timeout: float = 5.0) -> bytes:
    return await asyncio.wait_for(asyncio.get_running_loop().sock_recv(sock, 65536), timeout)


@contextlib.asynccontextmanager
async def bound_relay(offload: bool) -> AsyncIterator[tuple[Relay, RelayUdp, socket.socket, socket.socket]]:
    """A relay with one path, its sides bound by two node sockets A and B (§8.2's two-step bind)."""
    clock = FakeClock()
    relay = Relay(RelayTable(), DcTrust(), [], 0, clock=clock, family=socket.AF_INET)
    relay.table.add_path(PATH, TOKEN, clock.now() + 3600, 1 << 30, clock.now())
    udp = RelayUdp(relay, udp_socket("127.0.0.1", 0), offload=offload)
    dst = udp.sock.getsockname()
    nodes = []
    for side in (0, 1):
        s = udp_socket("127.0.0.1", 0)
        s.setblocking(False)
        key, cookie = packet.relay_side_key(TOKEN, side), packet.NO_COOKIE
        for counter in (1, 2):
            s.sendto(packet.RelayBind.make(PATH, side, counter, cookie, key).encode(), dst)
            cookie = packet.RelayBindAck.parse(await recv(s)).cookie
        nodes.append(s)
    assert all(a is not None for a in relay.table.paths[PATH].addrs)
    try:
        yield relay, udp, *nodes
    finally:
        for s in nodes:
            s.close()
        udp.close()


@pytest.mark.parametrize("offload", [True, False], ids=["gro-gso", "fallback"])
async def test_a_gso_send_is_forwarded_in_order_less_the_foreign_datagram(offload, monkeypatch):
    """Adversary: one datagram of a path that does not exist rides in a node's GSO run. It alone is
    dropped and counted; the rest reach the other side in order, whether the relay reads the run
    whole (GRO, sent on with GSO) or datagram by datagram (the fallback: no offloads here)."""
    async with bound_relay(offload) as (relay, udp, a, b):
        assert udp.gro == offload
        run = [dgram(i) for i in range(20)]
        run[7] = dgram(7, os.urandom(8))
        udpgso.send_gso(a, [b"".join(run)], SIZE, udp.sock.getsockname())
        got = [await recv(b) for _ in range(19)]
        assert got == run[:7] + run[8:]
        assert relay.table.dropped == {"unknown_path": 1}
        assert relay.udp_received == 4 + 20  # the two sides' binds, then the run
        assert relay.udp_runs == (1 if offload else 0)


@pytest.mark.parametrize("code", [errno.EIO, errno.EAGAIN], ids=["no-gso", "buffer-full"])
async def test_a_refused_gso_send(code, monkeypatch):
    """Hostile condition: the kernel reads GRO runs but refuses the GSO send. EIO (a device without
    UDP segmentation): the run still goes out whole, datagram by datagram, and GSO is not tried
    again. EAGAIN (the send buffer is full): the run is lost, as the network would lose it, and
    each of its datagrams is counted as refused."""
    async with bound_relay(True) as (relay, udp, a, b):
        run = [dgram(i) for i in range(10)]

        def refuse(*_args) -> None:
            raise OSError(code, "refused")

        real = udpgso.send_gso
        monkeypatch.setattr(udpgso, "send_gso", refuse)
        real(a, [b"".join(run)], SIZE, udp.sock.getsockname())
        if code == errno.EIO:
            assert [await recv(b) for _ in range(10)] == run
            assert relay.udp_runs == 1 and not udp.gso and relay.udp_errors == 0
        else:
            for _ in range(500):  # up to 5 s on a loaded machine
                if relay.udp_runs:
                    break
                await asyncio.sleep(0.01)
            assert udp.gso and relay.udp_errors == 10 and relay.table.forwarded_packets == 10


async def test_a_spray_from_ever_new_source_addresses_keeps_the_address_memory_bounded(monkeypatch):
    """Adversary: a stranger sends from ever new (spoofed) source addresses. Each is parsed once,
    as without the memory, and the memory never holds more than ADDR_CACHE of them."""
    monkeypatch.setattr(server, "ADDR_CACHE", 4)
    async with bound_relay(True) as (relay, udp, _a, _b):
        for port in range(1000, 1010):
            raw = ("::ffff:198.51.100.7", port, 0, 0)
            assert udp._addr(raw) == for_socket(raw, socket.AF_INET) == ("198.51.100.7", port)
            assert len(udp._addrs) <= 4
