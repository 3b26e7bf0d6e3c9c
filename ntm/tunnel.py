"""Tunnel data-plane session (docs/PROTOCOL.md §7), sans-I/O in the style of h11/aioquic.

One `Session` per path: it runs the handshake (ntm.handshake), encrypts and decrypts transport
packets (AES-256-GCM, header as associated data), keeps the replay window, rekeys on time or
count, sends keepalives, falls back to a relay, and follows the peer's address (roaming) only on
authenticated, fresh packets. It never touches a socket or a clock:

    session.start(now)                          begin (sends Requests if initiating)
    session.encrypt(payload, now) -> bytes      a DATA packet for session.peer_addr
    session.receive(datagram, addr, now)        -> list[Event]; never raises on bad input
    session.poll(now) -> list[(bytes, addr)]    run timers and drain everything queued to send
    session.next_timer() -> float | None        when poll() wants to run next

`now` is monotonic seconds (timers). The one wall-clock value, the handshake timestamp that must
grow across restarts, comes from the injected `wall` callable.

Drops are counted in `session.stats` by reason and never raise out of `receive`.
"""

from __future__ import annotations

import enum
import os
import struct
from dataclasses import dataclass
from itertools import chain
from typing import Callable, Iterator, Sequence

import coincurve
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ntm.addr import Addr
from ntm.clock import SYSTEM
from ntm.errors import NtmError, ParseError
from ntm.offload import Stretch
from ntm.handshake import (
    MAX_PENDING_ATTEMPTS,
    HandshakeAuthError,
    HandshakeError,
    HandshakeMacError,
    HandshakeRateError,
    HandshakeReplayError,
    Initiator,
    Keys,
    NoPendingHandshakeError,
    Rand,
    Responder,
)
from ntm.packet import (
    HEADER,
    HEADER_LEN,
    MAX_DATAGRAM,
    MAX_PAYLOAD,
    MIN_TRANSPORT_LEN,
    PING_ID_LEN,
    PREFIX_LEN,
    PROBE_ID_LEN,
    TAG_LEN,
    TOKEN_LEN,
    TRANSPORT_TYPES,
    TYPE_CLOSE,
    TYPE_DATA,
    TYPE_HANDSHAKE_REQUEST,
    TYPE_HANDSHAKE_RESPONSE,
    TYPE_KEEPALIVE,
    TYPE_PING,
    TYPE_PONG,
    TYPE_PROBE,
    TYPE_PROBE_ACK,
    TYPE_RELAY_BIND_ACK,
    TYPE_STANDBY,
    NO_COOKIE,
    RelayBind,
    RelayBindAck,
)

# --- constants (each injectable through TunnelConfig) -----------------------------------------
#: Replay window in packets: WireGuard's 2048-bit bitmap; absorbs reordering of a whole burst
#: at multi-Gbit/s while costing one 256-byte integer per key.
REPLAY_WINDOW = 2048
#: Start a new handshake when the current keys are this old (WireGuard REKEY_AFTER_TIME).
REKEY_AFTER_TIME = 120.0
#: The side that answered the current handshake waits this much longer before rekeying itself,
#: so the two sides do not usually start rekeys at the same moment.
REKEY_RESPONDER_EXTRA = 10.0
#: Keys older than this are never used again (WireGuard REJECT_AFTER_TIME): bounds exposure
#: if a rekey keeps failing.
REJECT_AFTER_TIME = 180.0
#: Rekey after this many packets sent with one key: 2^36 packets of at most 2^12 AES blocks
#: stay under 2^48 blocks per key, far inside AES-GCM's confidentiality bound.
REKEY_AFTER_MESSAGES = 2**36
#: Hard stop for a key's counter (never reached in practice; keeps the 64-bit nonce unique).
REJECT_AFTER_MESSAGES = 2**64 - 2**13 - 1
#: Previous keys still decrypt for this long after a rekey, for packets already in flight.
PREVIOUS_KEY_GRACE = 10.0
#: Send a keepalive after this long without sending: below the common 30 s UDP NAT timeout.
KEEPALIVE_INTERVAL = 25.0
#: Retransmit the Tunnel Request this often while no keys exist (fast connection setup).
HANDSHAKE_RETRANSMIT = 0.25
#: Retransmit interval of a rekey Request (traffic still flows on the current keys).
REKEY_RETRANSMIT = 1.0
#: Without a completed handshake after this long, also try the relay (if the DC gave one):
#: six Request rounds, so 5% loss (one lost round in 20) never gets there and 20% rarely does.
RELAY_FALLBACK_AFTER = 1.5
#: Key confirmations (a PING the responder answers with a PONG) the initiator sends, one per
#: HANDSHAKE_RETRANSMIT, until something arrives on the new keys: a lost confirmation otherwise
#: leaves the responder unable to send, and at 1.5 s it falls back to the relay (seen at 20% loss).
#: 8 × 0.25 s outlasts the responder's relay fallback.
CONFIRM_ATTEMPTS = 8
#: On the relay with direct candidates, keep sending them a Request every HANDSHAKE_RETRANSMIT
#: until this long after start: a direct handshake that completes after the relay's moves the
#: tunnel off the relay (~40 small Requests; later the node's 30 s direct retry takes over).
DIRECT_UPGRADE_FOR = 10.0
#: Older answered, unconfirmed key sets a responder keeps besides the newest: the initiator
#: completes on a Response to any of its last MAX_PENDING_ATTEMPTS Requests, and when the RTT
#: or a lost Response makes it complete on an older one, its confirmation must still decrypt.
ANSWERED_KEPT = MAX_PENDING_ATTEMPTS - 1
# Tunnel Requests sent to an unverified candidate (an address a node announced but no DC saw it
# send from): one, so a node that lies about its addresses makes its peer send one 82-byte
# datagram per direction to a stranger, less than the direction request cost it (§8.1).
UNVERIFIED_ATTEMPTS = 1

NONCE_PREFIX = b"\x00\x00\x00\x00"
_Q = struct.Struct("!Q")
_HEADER_UNPACK = HEADER.unpack_from
_HEADER_PACK_INTO = HEADER.pack_into
_NONCE = struct.Struct("!4xQ").pack  # NONCE_PREFIX + the 8-byte counter: the AES-GCM nonce (§7)
_SEQ_PACK_INTO = struct.Struct("!I").pack_into  # a Stretch's TCP sequence numbers (ntm/offload.py)
#: encrypt_segments' default limit: packets one GSO send may carry (daemon/udpgso.py).
MAX_SEGMENTS = 64


#: Buffers and datagram lengths whose slots _slots keeps: an endpoint's send and receive buffers,
#: a few datagram lengths each (a path's full-size segments).
SLOT_CACHE_MAX = 8
#: Shorter datagrams (acknowledgements, control) are sliced each time: their lengths vary and a
#: 64 KB buffer holds hundreds of them.
SLOT_MIN_LEN = 1000
_SLOT_CACHE: dict[tuple[int, int], tuple[memoryview, list[tuple[memoryview, memoryview]]]] = {}


def _slots(out: memoryview, dlen: int) -> list[tuple[memoryview, memoryview]]:
    """(header, body) views of `out` cut into `dlen`-byte datagram slots from its start: made once
    per buffer and length (three slices per segment were a tenth of the sealing loop). The entry
    holds `out`, so its id is not reused for another buffer while cached."""
    key = (id(out), dlen)
    hit = _SLOT_CACHE.get(key)
    if hit is not None and hit[0] is out:
        return hit[1]
    if len(_SLOT_CACHE) >= SLOT_CACHE_MAX:
        _SLOT_CACHE.clear()
    slots = _slot_views(out, 0, (len(out) - dlen) // dlen + 1, dlen)
    _SLOT_CACHE[key] = (out, slots)
    return slots


def _slot_views(out: memoryview, pos: int, count: int, dlen: int) -> list[tuple[memoryview, memoryview]]:
    """(header, body) views of the `count` datagram slots of `dlen` bytes from `out[pos]` on."""
    return [(out[x : x + HEADER_LEN], out[x + HEADER_LEN : x + dlen]) for x in range(pos, pos + count * dlen, dlen)]


def _fold(bits: int, ahead: int) -> int:
    """A replay bitmap with the `ahead` counters accepted in order since shifted in (receive_run)."""
    return (bits << ahead) | ((1 << ahead) - 1)


class TunnelError(NtmError):
    """A tunnel operation that cannot be done now (e.g. sending before a handshake)."""


@dataclass(frozen=True, slots=True)
class TunnelConfig:
    replay_window: int = REPLAY_WINDOW
    rekey_after_time: float = REKEY_AFTER_TIME
    rekey_responder_extra: float = REKEY_RESPONDER_EXTRA
    reject_after_time: float = REJECT_AFTER_TIME
    rekey_after_messages: int = REKEY_AFTER_MESSAGES
    reject_after_messages: int = REJECT_AFTER_MESSAGES
    previous_key_grace: float = PREVIOUS_KEY_GRACE
    keepalive_interval: float = KEEPALIVE_INTERVAL
    handshake_retransmit: float = HANDSHAKE_RETRANSMIT
    rekey_retransmit: float = REKEY_RETRANSMIT
    relay_fallback_after: float = RELAY_FALLBACK_AFTER
    unverified_attempts: int = UNVERIFIED_ATTEMPTS
    confirm_attempts: int = CONFIRM_ATTEMPTS
    direct_upgrade_for: float = DIRECT_UPGRADE_FOR


@dataclass(frozen=True, slots=True)
class RelayInfo:
    """Relay endpoint from the DC's Route Direction: address, our side's 32-byte key (the DC
    derives it from the path token: `packet.relay_side_key`), our side (0/1)."""

    addr: Addr
    token: bytes
    side: int

    def __post_init__(self) -> None:
        if len(self.token) != TOKEN_LEN or self.side not in (0, 1):
            raise ValueError("relay token must be 32 bytes and side 0 or 1")


# --- events -------------------------------------------------------------------------------------
@dataclass(slots=True)
class Data:
    """Decrypted payload of a DATA packet (not frozen: built per packet, kept cheap)."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class HandshakeDone:
    """Keys usable for sending. `rekey` is False for the first handshake of the session."""

    rekey: bool
    addr: Addr
    via: str  # "candidate:<i>", "relay", "peer" (answered a Request) or "rekey"


@dataclass(frozen=True, slots=True)
class EndpointChanged:
    addr: Addr
    previous: Addr


@dataclass(frozen=True, slots=True)
class Pong:
    rtt: float


@dataclass(frozen=True, slots=True)
class RelayBound:
    addr: Addr


@dataclass(frozen=True, slots=True)
class ProbeAck:
    """The peer answered our path MTU probe `probe_id` (ntm/pmtu.py)."""

    probe_id: bytes


@dataclass(frozen=True, slots=True)
class PeerClosed:
    """The peer closed the tunnel on purpose (authenticated CLOSE): end it, do not repair it."""


@dataclass(frozen=True, slots=True)
class Standby:
    """An authenticated STANDBY from `addr` (maybe not the peer's current address: it proves that
    address reaches the peer). Its opaque `payload` is for the node (node/uplinks.py)."""

    addr: Addr
    payload: bytes


Event = Data | HandshakeDone | EndpointChanged | Pong | RelayBound | PeerClosed | Standby | ProbeAck


# --- replay window ------------------------------------------------------------------------------
class ReplayWindow:
    """Sliding window over packet counters (RFC 6479 idea with a Python int as the bitmap).

    Bit i of `bits` is set when counter `top - i` has been accepted. `check` is run before
    decryption (cheap reject), `update` only after the tag verified.
    """

    __slots__ = ("size", "top", "bits", "mask")

    def __init__(self, size: int = REPLAY_WINDOW) -> None:
        self.size = size
        self.top = -1
        self.bits = 0
        self.mask = (1 << size) - 1

    def check(self, n: int) -> str | None:
        """None if `n` may be new, else the drop reason ("replay" or "too_old")."""
        if n > self.top:
            return None
        off = self.top - n
        if off >= self.size:
            return "too_old"
        if (self.bits >> off) & 1:
            return "replay"
        return None

    def update(self, n: int) -> bool:
        """Mark `n` seen (after check passed); True if it is the highest counter so far."""
        if n > self.top:
            shift = n - self.top
            self.bits = 1 if shift >= self.size else ((self.bits << shift) | 1) & self.mask
            self.top = n
            return True
        self.bits |= 1 << (self.top - n)
        return False


class _KeyPair:
    __slots__ = (
        "send",
        "recv",
        "counter",
        "window",
        "created",
        "initiator",
        "expires",
        "send_ok",
        "reject_time",
        "soft_limit",
        "rekey_time",
    )

    def __init__(self, k: Keys, now: float, window: int, cfg: TunnelConfig | None = None) -> None:
        cfg = cfg or TunnelConfig()
        self.reject_time = now + cfg.reject_after_time
        self.rekey_time = now + cfg.rekey_after_time
        self.soft_limit = cfg.rekey_after_messages - 1  # fast-path bound on the send counter
        self.send = AESGCM(k.send)
        self.recv = AESGCM(k.recv)
        self.counter = 0
        self.window = ReplayWindow(window)
        self.created = now
        self.initiator = k.initiator
        self.expires: float | None = None  # set when demoted to "previous"
        self.send_ok = k.initiator  # a responder sends only after the initiator confirmed


STAT_KEYS = (
    "rx_keepalive",
    "tx_keepalive",
    "rx_standby",
    "handshakes",
    "rekeys",
    "requests_sent",
    "responses_sent",
    "confirms_sent",
    "endpoint_changes",
    "relay_binds_sent",
    "relay_acks",
    "drop_truncated",
    "drop_unknown_type",
    "drop_unknown_path",
    "drop_replay",
    "drop_too_old",
    "drop_bad_tag",
    "drop_no_keys",
    "drop_expired_key",
    "drop_handshake_malformed",
    "drop_handshake_auth",
    "drop_handshake_mac",
    "drop_handshake_replay",
    "drop_handshake_rate",
    "drop_handshake_collision",
    "drop_unexpected_response",
    "drop_malformed",
)


class Phase(enum.Enum):
    NEW = "new"  # created; start() not called yet
    HANDSHAKE = "handshake"  # no keys to send with: Requests (or waiting for the peer's)
    ESTABLISHED = "established"  # current keys confirmed; rekeys happen underneath


class Session:
    """One tunnel (path ID) with one peer.

    role: "initiate" sends Requests to `candidates`; "wait" only answers; "punch" does both, and
    when both sides' Requests meet, the side with the lower node ID wins (its Request is
    answered, the other side's Requests just opened its NAT). The same tie-break settles
    simultaneous rekeys.
    """

    def __init__(
        self,
        static_key: coincurve.PrivateKey,
        peer_id: bytes,
        peer_pub: bytes,
        path_id: bytes,
        *,
        role: str = "initiate",
        candidates: Sequence[Addr] = (),
        relay: RelayInfo | None = None,
        config: TunnelConfig | None = None,
        rand: Rand = os.urandom,
        wall: Callable[[], float] = SYSTEM.wall,
        unverified: Sequence[Addr] = (),
    ) -> None:
        if role not in ("initiate", "wait", "punch"):
            raise ValueError(f"role must be initiate, wait or punch, not {role!r}")
        self.config = config or TunnelConfig()
        self.path_id = bytes(path_id)
        self.role = role
        self.phase = Phase.NEW
        self._wall = wall
        self.initiator = Initiator(static_key, peer_id, peer_pub, path_id, rand=rand)
        self.responder = Responder(static_key, peer_id, peer_pub, path_id, rand=rand)
        self.local_id = self.initiator.local_id
        self.peer_id = bytes(peer_id)
        self.wins_collisions = self.local_id < self.peer_id
        # Verified candidates first; the unverified ones (announced, not observed by a DC) after
        # them get at most `unverified_attempts` Requests in all (a reflection bound, §8.1).
        self.candidates = list(candidates) + list(unverified)
        self.verified = len(candidates)
        self._unverified_rounds = 0
        self.relay = relay
        self.relay_active = False
        self.peer_addr: Addr | None = None
        self.via: str | None = None
        self.rtt: float | None = None
        self._stats: dict[str, int] = dict.fromkeys(STAT_KEYS, 0)
        # hot-path counters live in attributes (cheaper than dict updates); see `stats`
        self.tx_data = self.tx_bytes = self.rx_data = self.rx_bytes = 0
        self._reject_msgs = self.config.reject_after_messages
        self._data_prefix = bytes([TYPE_DATA]) + self.path_id
        self.current: _KeyPair | None = None
        self.previous: _KeyPair | None = None
        self.next: _KeyPair | None = None
        self._answered: list[_KeyPair] = []  # older unconfirmed key sets (ANSWERED_KEPT); next is newest
        self._outbox: list[tuple[bytes, Addr]] = []
        self._started: float | None = None
        self._hs_next: float | None = None  # next Request (re)transmission, while one is wanted
        self._bind_next: float | None = None  # next relay bind refresh, while on the relay
        self._bind_counter = 0  # of our latest RELAY_BIND (grows across restarts: wall µs)
        self._relay_cookie = NO_COOKIE  # the relay's proof-of-address for where we send from
        self.last_sent = 0.0
        self.last_received: float | None = None
        self._pings: dict[bytes, float] = {}
        self._ping_seq = 0
        self._resp_sent_at: float | None = None
        self._last_request: bytes | None = None  # our newest Request, the addresses it went to,
        self._request_sent_to: list[Addr] = []  # and whether it already went early to one of
        self._resent = False  # them (_resend_on_collision)
        self._confirm_next: float | None = None  # next key confirmation, while unconfirmed
        self._confirms_left = 0
        self._direct_sent: float | None = None  # last Request to the direct candidates (upgrade)

    # --- state ---------------------------------------------------------------------------------
    @property
    def established(self) -> bool:
        """Keys exist that this side may send with."""
        return self.phase is Phase.ESTABLISHED

    @property
    def last_handshake(self) -> float | None:
        """When the keys in use were made (monotonic), None before the first handshake."""
        return self.current.created if self.current is not None else None

    @property
    def has_output(self) -> bool:
        """Datagrams are queued (drain them with datagrams_to_send() or poll())."""
        return bool(self._outbox)

    @property
    def stats(self) -> dict[str, int]:
        """Counters: traffic, handshakes, and every drop by reason (a fresh dict)."""
        d = dict(self._stats)
        d.update(tx_data=self.tx_data, tx_bytes=self.tx_bytes, rx_data=self.rx_data, rx_bytes=self.rx_bytes)
        return d

    def _count(self, reason: str) -> None:
        self._stats[reason] = self._stats.get(reason, 0) + 1

    # --- handshake driving ---------------------------------------------------------------------
    def start(self, now: float) -> None:
        """Begin: queue the first Requests (initiate/punch). Call poll() to get them."""
        self._started = now
        self.last_sent = now
        self.phase = Phase.HANDSHAKE
        if self.role in ("initiate", "punch"):
            self._hs_next = now

    def _request_targets(self) -> list[Addr]:
        if self.current is not None and self.peer_addr is not None:
            return [self.peer_addr]  # rekey: the peer is where the current keys reach it
        if self._unverified_rounds < self.config.unverified_attempts:
            targets = list(self.candidates)
        else:
            targets = self.candidates[: self.verified]
        if self.peer_addr is not None and self.peer_addr not in targets:
            targets.insert(0, self.peer_addr)
        if self.relay_active and self.relay is not None:
            targets.append(self.relay.addr)
        return targets

    def _send_requests(self, now: float) -> None:
        targets = self._request_targets()
        if not targets:
            self._hs_next = now + self.config.handshake_retransmit
            return
        if self.current is None and len(self.candidates) > self.verified:
            self._unverified_rounds += 1
        if self.current is None and self.relay is not None and self.verified:
            self._direct_sent = now  # the direct candidates had a Request (see _on_direct_upgrade)
        self._emit_request(targets, now)
        self.last_sent = now
        interval = self.config.rekey_retransmit if self.current is not None else self.config.handshake_retransmit
        self._hs_next = now + interval

    def _emit_request(self, targets: list[Addr], now: float) -> None:
        """One fresh Request to each of `targets` (remembered for _resend_on_collision)."""
        req = self.initiator.request(now, self._wall())
        for addr in targets:
            self._outbox.append((req, addr))
            self._stats["requests_sent"] += 1
        self._last_request, self._request_sent_to, self._resent = req, targets, False

    def _resend_on_collision(self, datagram: bytes, addr: Addr) -> None:
        """The peer's Request lost a simultaneous open, but it came through the peer's NAT from
        `addr`, so that NAT now lets ours in: send our newest Request there at once instead of at
        the next retransmission (the first one usually met the peer's firewall before the peer had
        sent anything: +250 ms on half of the punched tunnels, measured in the NAT lab). Once per
        Request of ours, only to an address it went to, and only for a Request whose mac1
        verifies: nobody but the peer can make us send, and never more than we would anyway."""
        if self._resent or self._last_request is None or addr not in self._request_sent_to:
            return
        if not self.responder.from_peer(datagram):
            return
        self._resent = True
        self._outbox.append((self._last_request, addr))
        self._stats["requests_sent"] += 1

    def _request_via_relay(self) -> None:
        """Just bound at the relay while handshaking: our newest Request went there before the
        binding and was dropped, so it goes again at once instead of at the next retransmission
        (every relayed setup waited one, measured in the NAT lab). Once per bind the relay
        acknowledged: no more than the binds we send."""
        relay = self.relay
        if (
            self.phase is Phase.HANDSHAKE
            and relay is not None
            and self._last_request is not None
            and relay.addr in self._request_sent_to
        ):
            self._outbox.append((self._last_request, relay.addr))
            self._stats["requests_sent"] += 1

    def _send_confirm(self, now: float) -> None:
        """Key confirmation: a PING on the new keys. Any packet on them lets the responder send;
        a PING also makes it answer, so we know when to stop repeating (_on_confirm)."""
        self._confirms_left -= 1
        self._ping_seq += 1  # not in self._pings: its PONG is no Pong event for the application
        self._outbox.append((self._seal(TYPE_PING, _Q.pack(self._ping_seq), now), self.peer_addr))
        self._stats["confirms_sent"] += 1
        self._confirm_next = now + self.config.handshake_retransmit if self._confirms_left > 0 else None

    def _send_bind(self, now: float) -> None:
        """A RELAY_BIND MAC'd with our side's key, with a counter that grows across restarts (wall
        time in µs) and the cookie the relay last gave us (§8.2)."""
        assert self.relay is not None
        self._bind_counter = max(self._bind_counter + 1, int(self._wall() * 1_000_000))
        bind = RelayBind.make(self.path_id, self.relay.side, self._bind_counter, self._relay_cookie, self.relay.token)
        self._outbox.append((bind.encode(), self.relay.addr))
        self._stats["relay_binds_sent"] += 1
        interval = self.config.keepalive_interval if self.established else self.config.handshake_retransmit
        self._bind_next = now + interval

    def local_address_changed(self, now: float) -> None:
        """Our socket moved: tell the peer (and the relay) at once with authenticated packets."""
        if self.relay_active and self.relay is not None:
            self._send_bind(now)
        if self.established and self.peer_addr is not None:
            self._outbox.append((self._seal(TYPE_KEEPALIVE, b"", now), self.peer_addr))
            self._stats["tx_keepalive"] += 1

    def _relay_after(self) -> float:
        """Delay before using the relay: none when there is no direct candidate to try first
        (a relay route), else RELAY_FALLBACK_AFTER."""
        return self.config.relay_fallback_after if self.candidates else 0.0

    def _rekey_due(self) -> float | None:
        """When the current keys should be replaced; the side that answered waits a little longer
        so both sides do not usually start rekeys at the same moment."""
        cur = self.current
        if cur is None:
            return None
        after = self.config.rekey_after_time
        if not cur.initiator:
            after += self.config.rekey_responder_extra
        return cur.created + after

    # --- timers: one table of named deadlines ------------------------------------------------
    # Each timer is (name, when it is due given the state or None, what to do). next_timer() is
    # the earliest due time; poll() runs the due ones in this order, re-reading each deadline
    # after the previous handler ran (a due rekey sets the Request deadline to now).
    def _due_relay_fallback(self) -> float | None:
        if self.relay is None or self.relay_active or self.phase is not Phase.HANDSHAKE:
            return None
        return self._started + self._relay_after()  # type: ignore[operator]

    def _on_relay_fallback(self, now: float) -> None:
        self.relay_active = True
        self._send_bind(now)
        if self.role != "wait":
            self._hs_next = now  # send a Request through the relay right away

    def _due_relay_bind(self) -> float | None:
        return self._bind_next if self.relay_active else None

    def _on_relay_bind(self, now: float) -> None:
        if self.current is None or self.peer_addr == self.relay.addr:  # type: ignore[union-attr]
            self._send_bind(now)
        else:
            self._bind_next = None  # direct path won: stop refreshing the relay binding

    def _due_keys_expire(self) -> float | None:
        return self.current.reject_time if self.current is not None else None

    def _on_keys_expire(self, now: float) -> None:
        self.current = None  # too old: back to handshaking from scratch
        self.phase = Phase.HANDSHAKE
        self._count("keys_expired")
        if self._hs_next is None and self.role != "wait":
            self._hs_next = now

    def _due_previous_expire(self) -> float | None:
        return self.previous.expires if self.previous is not None else None

    def _on_previous_expire(self, now: float) -> None:
        self.previous = None

    def _due_rekey(self) -> float | None:
        if self.phase is not Phase.ESTABLISHED or self._hs_next is not None or self.next is not None:
            return None
        return self._rekey_due()

    def _on_rekey(self, now: float) -> None:
        self._hs_next = now

    def _due_request(self) -> float | None:
        return self._hs_next

    def _on_request(self, now: float) -> None:
        self._send_requests(now)

    def _due_confirm(self) -> float | None:
        return self._confirm_next

    def _on_confirm(self, now: float) -> None:
        cur = self.current
        self._confirm_next = None  # unless one more goes out below
        if cur is not None and cur.window.top < 0:  # nothing from the peer on the new keys yet
            try:
                self._send_confirm(now)
            except TunnelError:
                pass  # keys used up: the rekey that replaces them confirms itself

    def _due_direct_upgrade(self) -> float | None:
        """While on the relay: the next direct attempt; otherwise once more at the end of the
        upgrade window, to forget unanswered attempts."""
        if self._direct_sent is None or self.current is None:
            return None
        end = self._started + self.config.direct_upgrade_for  # type: ignore[operator]
        if self.relay is not None and self.peer_addr == self.relay.addr:
            return min(self._direct_sent + self.config.handshake_retransmit, end)
        return end

    def _on_direct_upgrade(self, now: float) -> None:
        """On the relay although direct candidates were given: a fresh Request to them (both ends
        of a punch do this; the lower node ID wins as in §6). The Response, or the peer's answer
        to ours, moves the tunnel off the relay (roaming rules)."""
        if now >= self._started + self.config.direct_upgrade_for:  # type: ignore[operator]
            self._direct_sent = None
            if self._hs_next is None:
                self.initiator.cancel()  # unanswered, they would win collisions with the peer's rekeys
            return
        self._direct_sent = now
        if self._hs_next is None:  # a rekey under way sends its own Requests
            self._emit_request(self.candidates[: self.verified], now)

    def _due_keepalive(self) -> float | None:
        if self.phase is not Phase.ESTABLISHED or self.peer_addr is None:
            return None
        return self.last_sent + self.config.keepalive_interval

    def _on_keepalive(self, now: float) -> None:
        self._outbox.append((self._seal(TYPE_KEEPALIVE, b"", now), self.peer_addr))
        self._stats["tx_keepalive"] += 1

    TIMERS = (
        ("relay_fallback", _due_relay_fallback, _on_relay_fallback),
        ("relay_bind", _due_relay_bind, _on_relay_bind),
        ("keys_expire", _due_keys_expire, _on_keys_expire),
        ("previous_expire", _due_previous_expire, _on_previous_expire),
        ("rekey", _due_rekey, _on_rekey),
        ("request", _due_request, _on_request),
        ("confirm", _due_confirm, _on_confirm),
        ("direct_upgrade", _due_direct_upgrade, _on_direct_upgrade),
        ("keepalive", _due_keepalive, _on_keepalive),
    )

    def deadlines(self) -> dict[str, float]:
        """Every armed timer by name (for status and tests)."""
        out = {}
        for name, due, _ in self.TIMERS:
            t = due(self)
            if t is not None:
                out[name] = t
        return out

    def next_timer(self) -> float | None:
        """Earliest time poll() has something to do (None: nothing scheduled)."""
        if self._outbox:
            return 0.0
        if self.phase is Phase.NEW:
            return None
        times = self.deadlines().values()
        return min(times) if times else None

    def poll(self, now: float) -> list[tuple[bytes, Addr]]:
        """Run due timers; return (and forget) every datagram queued to send, with its address."""
        if self.phase is not Phase.NEW:
            for _, due, run in self.TIMERS:
                t = due(self)
                if t is not None and now >= t:
                    run(self, now)
        out, self._outbox = self._outbox, []
        return out

    def datagrams_to_send(self) -> list[tuple[bytes, Addr]]:
        """Drain the outbox without running timers."""
        out, self._outbox = self._outbox, []
        return out

    # --- sending -------------------------------------------------------------------------------
    def _seal(self, kind: int, payload: bytes, now: float) -> bytes:
        k = self.current
        if k is None or not k.send_ok:
            raise TunnelError("no tunnel keys yet (handshake not complete)")
        n = k.counter
        if n >= self.config.reject_after_messages or now - k.created >= self.config.reject_after_time:
            raise TunnelError("tunnel keys exhausted; waiting for a rekey")
        k.counter = n + 1
        header = HEADER.pack(kind, self.path_id, n)
        self.last_sent = now
        if n + 1 >= self.config.rekey_after_messages and self._hs_next is None and self.next is None:
            self._send_requests(now)
        return header + k.send.encrypt(NONCE_PREFIX + header[9:], payload, header)

    def encrypt(self, payload: bytes, now: float) -> bytes:
        """A DATA packet carrying `payload`, to be sent to `self.peer_addr`. TunnelError if no keys."""
        k = self.current
        if k is None or not k.send_ok or now >= k.rekey_time or len(payload) > MAX_PAYLOAD:
            return self._encrypt_slow(payload, now)
        n = k.counter
        if n >= k.soft_limit:
            return self._encrypt_slow(payload, now)
        k.counter = n + 1
        ctr = _Q.pack(n)
        header = self._data_prefix + ctr
        self.last_sent = now
        self.tx_data += 1
        self.tx_bytes += len(payload)
        return header + k.send.encrypt(NONCE_PREFIX + ctr, payload, header)

    def encrypt_segments(
        self,
        segments: Iterator[tuple[int, int] | Stretch],
        src: memoryview,
        out: memoryview,
        now: float,
        limit: int = MAX_SEGMENTS,
    ) -> list[int]:
        """encrypt() for each payload `src[a:b]` that `segments` yields, the DATA packets sealed one
        after the other into `out` from its start (AES-GCM straight into place: no bytes object per
        packet), until `limit` packets (one GSO send; a Stretch is never cut, see split_into).
        Returns where each packet ends in `out`. A segment is sealed before the next is asked for
        (ntm/offload.split_into rewrites the source in place; a Stretch's headers are written here,
        each just before its segment is sealed). TunnelError when the first cannot go (no keys, keys
        used up); on a later one, the run ends before it (that one is lost, as on the network; the
        rest stay in `segments`)."""
        k = self.current
        if k is None or not k.send_ok or now >= k.rekey_time:
            return self._encrypt_segments_slow(segments, src, out, 0, now, limit)
        seal, path, soft = k.send.encrypt_into, self.path_id, k.soft_limit
        n = k.counter
        pos, nbytes, ends, rest = 0, 0, [], None
        try:
            for item in segments:
                if type(item) is Stretch:
                    at, count, size, head, seq_at, seq = item
                    plain = len(head) + size
                    if n + count >= soft or plain > MAX_PAYLOAD:
                        rest = item
                        break
                    hl, dlen, first = len(head), HEADER_LEN + plain + TAG_LEN, len(ends)
                    # the stretch's datagrams go in slots of `out` that every run of this length uses
                    slots = _slots(out, dlen)[first : first + count] if pos == first * dlen else ()
                    if len(slots) < count:
                        slots = _slot_views(out, pos, count, dlen)
                    for aad, body in slots:
                        src[at : at + hl] = head  # split_into's work for this segment, then the seal
                        _SEQ_PACK_INTO(src, at + seq_at, seq)
                        _HEADER_PACK_INTO(aad, 0, TYPE_DATA, path, n)
                        seal(_NONCE(n), src[at : at + plain], aad, body)
                        n += 1
                        at += size
                        seq = (seq + size) & 0xFFFFFFFF
                    ends += range(pos + dlen, pos + (count + 1) * dlen, dlen)
                    pos = ends[-1]
                    nbytes += count * plain
                else:
                    a, b = item
                    size = b - a
                    if n >= soft or size > MAX_PAYLOAD:  # a rekey is due, or too long: encrypt() decides
                        rest = item
                        break
                    end = pos + HEADER_LEN + size + TAG_LEN
                    _HEADER_PACK_INTO(out, pos, TYPE_DATA, path, n)  # the header is the associated data
                    seal(_NONCE(n), src[a:b], out[pos : pos + HEADER_LEN], out[pos + HEADER_LEN : end])
                    n += 1
                    nbytes += size
                    ends.append(end)
                    pos = end
                if len(ends) >= limit:
                    break
        finally:
            k.counter = n  # whatever happens (an `out` too short), a counter is never used twice
            self._count_sent(len(ends), nbytes, now)
        if rest is not None:
            ends += self._encrypt_segments_slow(segments, src, out, pos, now, limit - len(ends), rest)
        return ends

    def _count_sent(self, packets: int, nbytes: int, now: float) -> None:
        if packets:
            self.last_sent = now
            self.tx_data += packets
            self.tx_bytes += nbytes

    def _encrypt_segments_slow(
        self,
        segments: Iterator[tuple[int, int] | Stretch],
        src: memoryview,
        out: memoryview,
        pos: int,
        now: float,
        limit: int,
        first: tuple[int, int] | Stretch | None = None,
    ) -> list[int]:
        """encrypt_segments from `out[pos]` on (`first`, then `segments`), through encrypt() one by
        one (keys missing, expiring or near their limit): its checks, counters and count-triggered
        rekey. What cannot go is given back to `segments` if it takes it (ntm/offload.Cuts): a
        Stretch from the segment that failed on."""
        ends: list[int] = []
        for item in chain((first,), segments) if first is not None else segments:
            for k, (a, b) in enumerate(item.cut(src) if type(item) is Stretch else (item,)):  # type: ignore[union-attr]
                try:
                    pkt = self.encrypt(bytes(src[a:b]), now)
                except TunnelError:
                    give_back = getattr(segments, "give_back", None)
                    if give_back is not None:  # what is left of the item, from the segment that failed
                        if k:  # a Stretch, from segment k on
                            item = item._replace(
                                at=a, count=item.count - k, seq=(item.seq + k * item.size) & 0xFFFFFFFF
                            )  # type: ignore[union-attr]
                        give_back(item)
                    if ends or pos:
                        return ends
                    raise
                out[pos : pos + len(pkt)] = pkt
                pos += len(pkt)
                ends.append(pos)
            if len(ends) >= limit:
                break
        return ends

    def _encrypt_slow(self, payload: bytes, now: float) -> bytes:
        if len(payload) > MAX_PAYLOAD:
            raise TunnelError(f"payload of {len(payload)} bytes does not fit one datagram")
        pkt = self._seal(TYPE_DATA, payload, now)
        self.tx_data += 1
        self.tx_bytes += len(payload)
        return pkt

    def close_packet(self, now: float) -> bytes | None:
        """A CLOSE packet for `self.peer_addr`, or None if there are no keys to authenticate it."""
        try:
            return self._seal(TYPE_CLOSE, b"", now) if self.peer_addr is not None else None
        except TunnelError:
            return None

    def standby(self, payload: bytes, now: float) -> bytes:
        """A STANDBY packet carrying `payload` (node/uplinks.py), to the peer out of a second
        uplink, or to a standby address of the peer's. It is not traffic of the current path: that
        path's keepalive stays due. TunnelError if there are no keys."""
        last = self.last_sent
        pkt = self._seal(TYPE_STANDBY, payload, now)
        self.last_sent = last
        return pkt

    def ping(self, now: float) -> bytes:
        """A PING packet (to `self.peer_addr`); the matching PONG yields a Pong(rtt) event."""
        self._ping_seq += 1
        pid = _Q.pack(self._ping_seq)
        self._pings[pid] = now
        if len(self._pings) > 16:
            self._pings.pop(next(iter(self._pings)))
        return self._seal(TYPE_PING, pid, now)

    def mtu_probe(self, probe_id: bytes, length: int, now: float) -> bytes:
        """A PROBE of `length` bytes (at least 41) carrying `probe_id`, padded with zeros (§7 "Path MTU");
        the peer answers with a PROBE_ACK (a ProbeAck event)."""
        pad = max(length - MIN_TRANSPORT_LEN - PROBE_ID_LEN, 0)
        return self._seal(TYPE_PROBE, probe_id + bytes(pad), now)

    # --- receiving -----------------------------------------------------------------------------
    def receive(self, datagram: bytes, addr: Addr, now: float) -> list[Event]:
        """Process one datagram from `addr`. Bad input is counted in stats and yields []."""
        n = len(datagram)
        if n < PREFIX_LEN:
            self._stats["drop_truncated"] += 1
            return []
        kind = datagram[0]
        if kind in TRANSPORT_TYPES:
            return self._receive_transport(kind, datagram, addr, now)
        if datagram[1:PREFIX_LEN] != self.path_id:
            self._stats["drop_unknown_path"] += 1
            return []
        if kind == TYPE_HANDSHAKE_REQUEST:
            return self._receive_request(datagram, addr, now)
        if kind == TYPE_HANDSHAKE_RESPONSE:
            return self._receive_response(datagram, addr, now)
        if kind == TYPE_RELAY_BIND_ACK:
            return self._receive_bind_ack(datagram, addr, now)
        self._stats["drop_unknown_type"] += 1
        return []

    def _receive_bind_ack(self, datagram: bytes, addr: Addr, now: float) -> list[Event]:
        """The relay's answer to our latest bind: bound, or a cookie to prove our address with
        (then one more bind goes out at once, carrying it)."""
        try:
            ack = RelayBindAck.parse(datagram)
        except ParseError:
            ack = None
        if (
            ack is None
            or self.relay is None
            or addr != self.relay.addr
            or ack.side != self.relay.side
            or ack.counter != self._bind_counter
        ):
            self._stats["drop_malformed"] += 1
            return []
        if ack.bound:
            self._relay_cookie = ack.cookie
            self._stats["relay_acks"] += 1
            self._request_via_relay()
            return [RelayBound(addr)]
        if ack.cookie == self._relay_cookie:
            self._stats["drop_malformed"] += 1  # refused with the cookie we already sent: not ours to fix
            return []
        self._relay_cookie = ack.cookie
        self._send_bind(now)
        return []

    def _handshake_drop(self, exc: HandshakeError) -> list[Event]:
        """Count a refused handshake message by reason. (A wrong path ID never gets here:
        receive() drops it as drop_unknown_path before the handshake sees it.)"""
        if isinstance(exc, HandshakeReplayError):
            self._stats["drop_handshake_replay"] += 1
        elif isinstance(exc, HandshakeRateError):
            self._stats["drop_handshake_rate"] += 1
        elif isinstance(exc, HandshakeAuthError):
            self._stats["drop_handshake_auth"] += 1
        elif isinstance(exc, HandshakeMacError):
            self._stats["drop_handshake_mac"] += 1
        elif isinstance(exc, NoPendingHandshakeError):
            self._stats["drop_unexpected_response"] += 1
        else:
            self._stats["drop_handshake_malformed"] += 1
        return []

    def _via_of(self, addr: Addr) -> str:
        """How `addr` reaches the peer: "relay", "candidate:<i>" (a direct candidate) or "peer"."""
        if self.relay is not None and addr == self.relay.addr:
            return "relay"
        if addr in self.candidates:
            return f"candidate:{self.candidates.index(addr)}"
        return "peer"

    def _set_peer(self, addr: Addr) -> list[Event]:
        old = self.peer_addr
        if addr == old:
            return []
        self.peer_addr = addr
        if old is None:
            return []
        if self.via is not None and (self.via == "relay") != (self._via_of(addr) == "relay"):
            self.via = self._via_of(addr)  # moved onto or off the relay: `via` names the path in use
        self._stats["endpoint_changes"] += 1
        return [EndpointChanged(addr, old)]

    def _receive_request(self, datagram: bytes, addr: Addr, now: float) -> list[Event]:
        if self.initiator.pending and self.wins_collisions:
            # Both sides initiated: ours wins; the peer will answer it. Its Request opened its NAT.
            self._stats["drop_handshake_collision"] += 1
            self._resend_on_collision(datagram, addr)
            return []
        try:
            resp, k = self.responder.respond(datagram, now)
        except HandshakeError as exc:
            return self._handshake_drop(exc)
        self.initiator.cancel()
        self._hs_next = None
        # The Request is authenticated by the peer's static key and fresh (timestamp): it may move us.
        events = self._set_peer(addr)
        if self.next is not None:
            kept = [*self._answered, self.next]
            self._answered = kept[max(0, len(kept) - ANSWERED_KEPT) :]
        self.next = _KeyPair(k, now, self.config.replay_window, self.config)
        self._outbox.append((resp, addr))
        self._stats["responses_sent"] += 1
        self._resp_sent_at = now
        self.last_sent = now
        return events

    def _receive_response(self, datagram: bytes, addr: Addr, now: float) -> list[Event]:
        sent_at = self.initiator.sent_at()
        try:
            k = self.initiator.response(datagram)
        except HandshakeError as exc:
            return self._handshake_drop(exc)
        rekey = self.current is not None
        self._install(_KeyPair(k, now, self.config.replay_window, self.config), now)
        self.next, self._answered = None, []
        self._hs_next = None
        events = self._set_peer(addr)
        if sent_at is not None:
            self.rtt = now - sent_at if self.rtt is None else self.rtt
        via = "rekey" if rekey else self._via_of(addr)
        self.via = via if not rekey else self.via
        # Confirm the keys to the responder right away (it sends only after seeing them used),
        # and again until it answers: a lost confirmation must not cost the direct path.
        self._confirms_left = self.config.confirm_attempts
        self._send_confirm(now)
        events.append(HandshakeDone(rekey, addr, via))
        return events

    def _install(self, kp: _KeyPair, now: float) -> None:
        kp.send_ok = True
        if self.current is not None:
            self.current.expires = now + self.config.previous_key_grace
            self.previous = self.current
            self._stats["rekeys"] += 1
        self.current = kp
        self.phase = Phase.ESTABLISHED
        self._stats["handshakes"] += 1

    def _decrypt_other_keys(self, counter: int, nonce: bytes, body: bytes, header: bytes):
        """Slow path: try the unconfirmed next keys and the previous keys; count the drop."""
        reason = None
        for cand in (self.current, self.next, *self._answered, self.previous):
            if cand is None:
                continue
            r = cand.window.check(counter)
            if r is not None:
                reason = reason or r
                continue
            if cand is self.current:
                continue  # already tried by the fast path
            try:
                return cand, cand.recv.decrypt(nonce, body, header)
            except InvalidTag:
                continue
        st = self._stats
        if self.current is None and self.next is None and self.previous is None:
            st["drop_no_keys"] += 1
        else:
            st["drop_" + (reason or "bad_tag")] += 1
        return None, None

    def _receive_transport(self, kind: int, datagram: bytes, addr: Addr, now: float) -> list[Event]:
        """One transport packet: receive_run's fast path, then the slow path (which counts drops)."""
        plain, events, used = self.receive_run(datagram, 0, len(datagram), len(datagram), addr, now)
        if plain:
            return [Data(plain[0])]
        return events if used else self._receive_transport_slow(kind, datagram, addr, now)

    def receive_run(
        self, buf: bytes | memoryview, off: int, end: int, seg: int, addr: Addr, now: float
    ) -> tuple[list[bytes], list[Event], int]:
        """receive() for the datagrams of one read from `addr` (a GRO run: `buf[off:end]` cut every
        `seg` bytes, the last maybe shorter) while they carry this session's path ID. Returns the
        payloads of the DATA packets decrypted in a row from `off`, the events of the first one that
        took the slow path (after it, the caller dispatches again), and where the datagrams not
        taken start. Checks, counters and replay window are exactly one receive() per datagram; the
        fast path (DATA from the peer on the current keys) reads `buf` in place, never copying it."""
        out: list[bytes] = []
        kp = self.current
        fast = kp is not None and addr == self.peer_addr and now < kp.reject_time
        if fast:
            decrypt, w = kp.recv.decrypt, kp.window  # type: ignore[union-attr]
            top, bits, size, mask = w.top, w.bits, w.size, w.mask
        # The window's bits are `bits` shifted left by `ahead`, with the `ahead` low bits set: the
        # counters accepted in order (top + 1, each in turn) since, folded in at once (a 2048-bit
        # shift per packet cost a tenth of this loop).
        path_id, reject_msgs, events, ahead = self.path_id, self._reject_msgs, [], 0
        # A receive buffer read again and again: the views of its full-size datagrams are made once,
        # for a GRO run whose first datagram proved itself (a stranger's lengths never fill the cache).
        slots: Sequence[tuple[memoryview, memoryview]] = ()
        slotted = fast and seg >= SLOT_MIN_LEN and end - off > seg and type(buf) is memoryview and not off % seg
        while off < end:
            stop = off + seg
            if stop > end:
                stop = end
            if stop - off >= MIN_TRANSPORT_LEN:
                kind, path, counter = _HEADER_UNPACK(buf, off)
                if path != path_id:
                    break  # another path's: the caller dispatches it
                if fast and kind == TYPE_DATA and counter < reject_msgs:
                    if ahead and counter != top + 1:
                        bits, ahead = _fold(bits, ahead), 0
                    if counter > top or (top - counter < size and not (bits >> (top - counter)) & 1):
                        if slots and stop - off == seg:
                            aad, body = slots[off // seg]
                        else:
                            aad, body = buf[off : off + 17], buf[off + 17 : stop]
                        try:
                            plain = decrypt(_NONCE(counter), body, aad)
                        except InvalidTag:
                            pass  # the slow path counts it
                        else:
                            if counter == top + 1:
                                ahead += 1
                                top = counter
                            elif counter > top:
                                shift = counter - top
                                bits = 1 if shift >= size else (bits << shift) | 1  # masked once, at the end
                                top = counter
                            else:
                                bits |= 1 << (top - counter)
                            out.append(plain)
                            off = stop
                            if slotted:
                                slots, slotted = _slots(buf, seg), False  # type: ignore[arg-type]
                            continue
            elif stop - off < PREFIX_LEN or buf[off + 1 : off + PREFIX_LEN] != path_id:
                break
            if fast:  # the slow path reads the window: what the fast path accepted first
                w.top, w.bits = top, _fold(bits, ahead) & mask
                fast = False
            datagram = bytes(buf[off:stop])
            if datagram[0] in TRANSPORT_TYPES:
                events = self._receive_transport_slow(datagram[0], datagram, addr, now)
            else:
                events = self.receive(datagram, addr, now)
            off = stop
            break
        if fast:
            w.top, w.bits = top, _fold(bits, ahead) & mask
        if out:
            self.last_received = now
            self.rx_data += len(out)
            self.rx_bytes += sum(map(len, out))
        return out, events, off

    def _receive_transport_slow(self, kind: int, datagram: bytes, addr: Addr, now: float) -> list[Event]:
        st = self._stats
        n = len(datagram)
        if n < MIN_TRANSPORT_LEN:
            st["drop_truncated"] += 1
            return []
        if n > MAX_DATAGRAM:
            st["drop_malformed"] += 1
            return []
        _, path, counter = HEADER.unpack_from(datagram)
        if path != self.path_id:
            st["drop_unknown_path"] += 1
            return []
        if counter >= self.config.reject_after_messages:
            st["drop_too_old"] += 1
            return []
        header = datagram[:HEADER_LEN]
        nonce = NONCE_PREFIX + datagram[9:HEADER_LEN]
        body = datagram[HEADER_LEN:]
        plain = None
        kp = self.current
        if kp is not None and kp.window.check(counter) is None:
            try:
                plain = kp.recv.decrypt(nonce, body, header)
            except InvalidTag:
                kp = None
        else:
            kp = None
        if kp is None:
            kp, plain = self._decrypt_other_keys(counter, nonce, body, header)
            if kp is None:
                return []
        if now - kp.created >= self.config.reject_after_time:
            st["drop_expired_key"] += 1
            return []
        if kp is self.previous and kp.expires is not None and now >= kp.expires:
            st["drop_expired_key"] += 1
            return []
        newest = kp.window.update(counter)
        events: list[Event] = []
        if kp is self.next or kp in self._answered:  # first packet on keys we answered for
            rekey = self.current is not None
            self._install(kp, now)
            self.next, self._answered = None, []
            if not rekey and self.rtt is None and self._resp_sent_at is not None:
                self.rtt = now - self._resp_sent_at
            if not rekey:
                self.via = "relay" if (self.relay is not None and addr == self.relay.addr) else "peer"
            events.append(HandshakeDone(rekey, addr, "rekey" if rekey else self.via))
        if kind == TYPE_STANDBY:
            # Proves `addr` reaches the peer, but the peer keeps using its current path: no roaming,
            # and it says nothing about the current path's liveness.
            st["rx_standby"] += 1
            if addr == self.peer_addr:
                self.last_received = now
            events.append(Standby(addr, plain))
            return events
        if addr != self.peer_addr and newest:
            # Roaming: only an authenticated packet that is the newest seen may move the peer.
            events.extend(self._set_peer(addr))
        self.last_received = now
        if kind == TYPE_DATA:
            self.rx_data += 1
            self.rx_bytes += len(plain)
            events.append(Data(plain))
        elif kind == TYPE_KEEPALIVE:
            st["rx_keepalive"] += 1
        elif kind == TYPE_PING:
            if len(plain) == PING_ID_LEN and self.established:
                self._outbox.append((self._seal(TYPE_PONG, plain, now), addr))
        elif kind == TYPE_PONG:
            sent = self._pings.pop(plain, None)
            if sent is not None:
                self.rtt = now - sent
                events.append(Pong(self.rtt))
        elif kind == TYPE_CLOSE:
            events.append(PeerClosed())
        elif kind == TYPE_PROBE:
            if len(plain) >= PROBE_ID_LEN and self.established:  # answered short: the way back may be smaller
                self._outbox.append((self._seal(TYPE_PROBE_ACK, plain[:PROBE_ID_LEN], now), addr))
        elif kind == TYPE_PROBE_ACK:
            if len(plain) == PROBE_ID_LEN:
                events.append(ProbeAck(plain))
        return events
