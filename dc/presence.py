"""Which of the DC's nodes are online, where their NATs map them, and how to push to them.

A node proves key possession on its WebSocket (ntm/session_auth.py) and gets a keepalive token.
Keepalives (ntm/keepalive.py) sent from the node's tunnel socket tell the DC the node's public,
NAT-mapped address; one with a wrong MAC or an old sequence number changes nothing. The DC listens
on two UDP ports: a NAT that maps the node's socket to different ports for the two is symmetric
(ntm/route.py). One sequence counter spans both ports, so a keepalive cannot be replayed to the other.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable

from ntm import keepalive, keys
from ntm.errors import ParseError
from ntm.addr import format_endpoint

log = logging.getLogger("ntm.dc.presence")


@dataclass
class Session:
    node: bytes
    token: bytes
    send: Callable[[dict], Any]  # pushes one JSON message on the node's WebSocket
    local_addrs: tuple[str, ...] = ()  # the tunnel socket's addresses, announced at session start
    seq: int = 0
    observed: str | None = None  # "ip:port" seen on the last good keepalive to the first port
    observed_alt: str | None = None  # ... and to the second port
    counters: dict = field(default_factory=lambda: {"keepalives": 0})


class Presence:
    def __init__(self) -> None:
        self.sessions: dict[bytes, Session] = {}
        self.dropped_keepalives = 0

    def open(self, node: bytes, send: Callable[[dict], Any], local_addrs: tuple[str, ...] = ()) -> Session:
        """A new authenticated session replaces the node's previous one (the node reconnected)."""
        session = Session(node, os.urandom(keepalive.TOKEN_LEN), send, local_addrs)
        self.sessions[node] = session
        return session

    def close(self, session: Session) -> None:
        if self.sessions.get(session.node) is session:
            del self.sessions[session.node]

    def online(self, node: bytes) -> bool:
        return node in self.sessions

    def observed(self, node: bytes) -> tuple[str | None, str | None]:
        """The node's mappings as seen by the first and the second keepalive port."""
        s = self.sessions.get(node)
        return (s.observed, s.observed_alt) if s else (None, None)

    def on_keepalive(self, data: bytes, addr: tuple, alt: bool = False) -> bytes | None:
        """Apply a keepalive that arrived on the first (or, `alt`, the second) port; returns the
        reply to send, or None if it was refused."""
        try:
            node, seq, head, mac = keepalive.parse_request(data)
        except ParseError:
            self.dropped_keepalives += 1
            return None
        s = self.sessions.get(node)
        if s is None or not keepalive.mac_ok(s.token, head, mac) or seq <= s.seq:
            self.dropped_keepalives += 1
            log.info("keepalive refused for %s from %s", keys.checksum(node), addr[0])
            return None
        s.seq = seq
        s.counters["keepalives"] += 1
        endpoint = format_endpoint(addr[0], addr[1])
        if alt:
            s.observed_alt = endpoint
        elif endpoint != s.observed:
            log.info("node %s observed at %s", keys.checksum(node), endpoint)
            s.observed = endpoint
        return keepalive.encode_reply(seq, addr[0], addr[1])


class KeepaliveProtocol(asyncio.DatagramProtocol):
    """Thin UDP adapter around Presence.on_keepalive."""

    def __init__(self, presence: Presence, alt: bool = False) -> None:
        self.presence = presence
        self.alt = alt
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        reply = self.presence.on_keepalive(data, addr, self.alt)
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)
