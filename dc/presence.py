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
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

from daemon.service import LogLimiter
from ntm import keepalive, keys
from ntm.clock import SYSTEM, Clock
from ntm.errors import ParseError
from ntm.addr import format_endpoint
from ntm.messages import RouteOffer

log = logging.getLogger("ntm.dc.presence")


@dataclass
class Session:
    node: bytes
    token: bytes
    send: Callable[[dict], Any]  # pushes one JSON message on the node's WebSocket
    local_addrs: tuple[str, ...] = ()  # the tunnel socket's addresses, announced at session start
    routes: RouteOffer | None = None  # the node's signed route offer (verified at session start, §10.10)
    seq: int = 0
    probe_seq: int = 0  # of standby probes (their own counter: they may come from another uplink)
    observed: str | None = None  # "ip:port" seen on the last good keepalive to the first port
    observed_alt: str | None = None  # ... and to the second port
    counters: dict = field(default_factory=lambda: {"keepalives": 0})
    # Ends the session from the DC's side (closes the WebSocket, telling the node why).
    end: Callable[[str], None] = field(default=lambda reason: None, repr=False)
    ended: str | None = None  # why the DC ended it; an ended session is served nothing more


# Refused keepalives are logged as a summary at most this often: anyone can send them.
REFUSED_LOG_INTERVAL_S = 10.0


class Presence:
    def __init__(self, clock: Clock = SYSTEM) -> None:
        self.sessions: dict[bytes, Session] = {}
        self.dropped: Counter[str] = Counter()  # refused keepalives by reason
        self._refused_log = LogLimiter(log, "keepalives", REFUSED_LOG_INTERVAL_S, clock)

    @property
    def dropped_keepalives(self) -> int:
        return sum(self.dropped.values())

    def _refuse(self, reason: str) -> None:
        self.dropped[reason] += 1
        self._refused_log.note(reason)

    def open(
        self,
        node: bytes,
        send: Callable[[dict], Any],
        local_addrs: tuple[str, ...] = (),
        end: Callable[[str], None] | None = None,
        routes: RouteOffer | None = None,
    ) -> Session:
        """A new authenticated session replaces the node's previous one, which the DC ends: one
        live session per node, so whoever held the old one (a thief of an earlier connection,
        or the node's own dead TCP connection) loses its authority at once."""
        session = Session(node, os.urandom(keepalive.TOKEN_LEN), send, local_addrs, routes=routes)
        if end is not None:
            session.end = end
        old = self.sessions.get(node)
        self.sessions[node] = session
        if old is not None:
            self._end(old, "superseded by a newer session of this node")
        return session

    def revoke(self, node: bytes) -> bool:
        """The node is revoked: end its session here, if it has one. True if one was ended."""
        session = self.sessions.pop(node, None)
        if session is None:
            return False
        self._end(session, "node revoked")
        return True

    @staticmethod
    def _end(session: Session, reason: str) -> None:
        if session.ended is None:
            session.ended = reason
            log.info("session of %s ended: %s", keys.checksum(session.node), reason)
            session.end(reason)

    def is_live(self, session: Session) -> bool:
        """Still the node's current session (not superseded, not revoked)."""
        return session.ended is None and self.sessions.get(session.node) is session

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
            self._refuse("malformed")
            return None
        s = self.sessions.get(node)
        if s is None:
            self._refuse("no_session")
            return None
        if not keepalive.mac_ok(s.token, head, mac):
            self._refuse("bad_mac")
            return None
        if data[0] == keepalive.STANDBY_PROBE:
            # A node's second uplink asking where it is seen from: answered, nothing recorded.
            if seq <= s.probe_seq:
                self._refuse("old_seq")
                return None
            s.probe_seq = seq
            return keepalive.encode_reply(seq, addr[0], addr[1], s.token, keepalive.STANDBY_REPLY)
        if seq <= s.seq:
            self._refuse("old_seq")
            return None
        s.seq = seq
        s.counters["keepalives"] += 1
        endpoint = format_endpoint(addr[0], addr[1])
        if alt:
            s.observed_alt = endpoint
        elif endpoint != s.observed:
            log.info("node %s observed at %s", keys.checksum(node), endpoint)
            s.observed = endpoint
        return keepalive.encode_reply(seq, addr[0], addr[1], s.token)


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
