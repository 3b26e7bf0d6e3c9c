"""Wire format of tunnel datagrams (docs/PROTOCOL.md §6 and §7): encode and parse, nothing else.

Every tunnel datagram starts with `type (1) || path ID (8)` in clear, so a demultiplexer (the
node's endpoint) and a relay can find the path without any key. Parsers raise
`ntm.errors.ParseError` and nothing else on bad bytes.

    0x01 HANDSHAKE_REQUEST   type | path | ephemeral (33) | sealed timestamp (8 + 16) | mac1 (16)  82 bytes
    0x02 HANDSHAKE_RESPONSE  type | path | ephemeral (33) | sealed empty (16) | mac1 (16)          74 bytes
    0x03 DATA                type | path | counter (8) | AEAD(payload) (len + 16)       >= 33 bytes
    0x04 KEEPALIVE           type | path | counter (8) | AEAD(empty) (16)               33 bytes
    0x05 PING / 0x06 PONG    type | path | counter (8) | AEAD(ping id (8)) (24)         41 bytes
    0x07 CLOSE               type | path | counter (8) | AEAD(empty) (16)               33 bytes
    0x08 STANDBY             type | path | counter (8) | AEAD(standby payload) (len + 16) >= 33 bytes
    0x09 PROBE               type | path | counter (8) | AEAD(probe id (8) || zeros) (len + 16) >= 41 bytes
    0x0a PROBE_ACK           type | path | counter (8) | AEAD(probe id (8)) (24)        41 bytes
    0x10 RELAY_BIND          type | path | side (1) | counter (8) | cookie (16) | mac (16)  50 bytes
    0x11 RELAY_BIND_ACK      type | path | side (1) | bound (1) | counter (8) | cookie (16) 35 bytes
    0x12..0x1f               reserved for relay control
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass
from typing import ClassVar, Self

import coincurve

from ntm.errors import ParseError

TYPE_HANDSHAKE_REQUEST = 0x01
TYPE_HANDSHAKE_RESPONSE = 0x02
TYPE_DATA = 0x03
TYPE_KEEPALIVE = 0x04
TYPE_PING = 0x05
TYPE_PONG = 0x06
TYPE_CLOSE = 0x07  # the sender closed the tunnel on purpose: the peer ends it, no repair
TYPE_STANDBY = 0x08  # keeps a second uplink's path warm; never moves the peer (node/uplinks.py)
TYPE_PROBE = 0x09  # padded to a candidate path MTU (ntm/pmtu.py); answered by a PROBE_ACK
TYPE_PROBE_ACK = 0x0A
TYPE_RELAY_BIND = 0x10
TYPE_RELAY_BIND_ACK = 0x11
RELAY_RESERVED = range(0x12, 0x20)

#: Types carried by a relay unchanged between the two bound endpoints of a path.
FORWARDED_TYPES = frozenset(
    {
        TYPE_HANDSHAKE_REQUEST,
        TYPE_HANDSHAKE_RESPONSE,
        TYPE_DATA,
        TYPE_KEEPALIVE,
        TYPE_PING,
        TYPE_PONG,
        TYPE_CLOSE,
        TYPE_PROBE,
        TYPE_PROBE_ACK,
    }
)
#: Types whose body is `counter (8) || AEAD ciphertext` (transport packets).
TRANSPORT_TYPES = frozenset(
    {TYPE_DATA, TYPE_KEEPALIVE, TYPE_PING, TYPE_PONG, TYPE_CLOSE, TYPE_STANDBY, TYPE_PROBE, TYPE_PROBE_ACK}
)
#: STANDBY is not forwarded by relays: a standby path is a direct one by definition.
KNOWN_TYPES = FORWARDED_TYPES | {TYPE_RELAY_BIND, TYPE_RELAY_BIND_ACK, TYPE_STANDBY}

PATH_ID_LEN = 8
PREFIX_LEN = 1 + PATH_ID_LEN  # type + path ID: all a relay or demultiplexer reads
COUNTER_LEN = 8
HEADER = struct.Struct("!B8sQ")  # transport header, also the AEAD associated data
HEADER_LEN = HEADER.size  # 17
TAG_LEN = 16
EPHEMERAL_LEN = 33  # compressed SEC1 point
TIMESTAMP_LEN = 8
TOKEN_LEN = 32
PING_ID_LEN = 8
PROBE_ID_LEN = 8

MAC1_LEN = 16
REQUEST_LEN = PREFIX_LEN + EPHEMERAL_LEN + TIMESTAMP_LEN + TAG_LEN + MAC1_LEN  # 82
RESPONSE_LEN = PREFIX_LEN + EPHEMERAL_LEN + TAG_LEN + MAC1_LEN  # 74
MIN_TRANSPORT_LEN = HEADER_LEN + TAG_LEN  # 33
KEEPALIVE_LEN = MIN_TRANSPORT_LEN
COOKIE_LEN = 16
BIND_MAC_LEN = 16
RELAY_BIND_LEN = PREFIX_LEN + 1 + COUNTER_LEN + COOKIE_LEN + BIND_MAC_LEN  # 50
RELAY_BIND_ACK_LEN = PREFIX_LEN + 2 + COUNTER_LEN + COOKIE_LEN  # 35
NO_COOKIE = bytes(COOKIE_LEN)
_RELAY_SIDE_LABEL = b"ntm relay side"
#: Largest datagram payload over UDP/IPv4 (65535 - 8 UDP - 20 IP); nothing longer is valid.
MAX_DATAGRAM = 65507
MAX_PAYLOAD = MAX_DATAGRAM - MIN_TRANSPORT_LEN


def _check_point(raw: bytes) -> None:
    if raw[0] not in (2, 3):
        raise ParseError("ephemeral key is not a compressed secp256k1 point")
    try:
        coincurve.PublicKey(raw)
    except (ValueError, TypeError):
        raise ParseError("ephemeral key is not on secp256k1") from None


def _exact(data: bytes, kind: int, length: int, name: str) -> bytes:
    """`data` as bytes if it is a `name` message: exactly `length` bytes starting with type `kind`."""
    data = bytes(data)
    if len(data) != length:
        raise ParseError(f"{name} is {len(data)} bytes, expected {length}")
    if data[0] != kind:
        raise ParseError(f"type 0x{data[0]:02x} is not a {name}")
    return data


def _side(data: bytes, name: str) -> int:
    """The relay side (0 or 1): the byte after the prefix of a relay message."""
    side = data[PREFIX_LEN]
    if side not in (0, 1):
        raise ParseError(f"{name} side is {side}, expected 0 or 1")
    return side


def _parse_handshake(data: bytes, kind: int, length: int, name: str) -> tuple[bytes, bytes, bytes, bytes]:
    """(path ID, ephemeral key, sealed part, mac1) of a Tunnel Request or Response of exact `length`."""
    data = _exact(data, kind, length, name)
    eph = data[PREFIX_LEN : PREFIX_LEN + EPHEMERAL_LEN]
    _check_point(eph)
    return data[1:PREFIX_LEN], eph, data[PREFIX_LEN + EPHEMERAL_LEN : -MAC1_LEN], data[-MAC1_LEN:]


def peek(datagram: bytes) -> tuple[int, bytes]:
    """(type, path ID) of any tunnel datagram, from the clear prefix only (relays, demultiplexers)."""
    if len(datagram) < PREFIX_LEN:
        raise ParseError(f"datagram of {len(datagram)} bytes is shorter than the {PREFIX_LEN}-byte prefix")
    kind = datagram[0]
    if kind not in KNOWN_TYPES:
        raise ParseError(f"unknown tunnel packet type 0x{kind:02x}")
    return kind, bytes(datagram[1:PREFIX_LEN])


@dataclass(frozen=True, slots=True)
class _Handshake:
    """type | path ID | sender's ephemeral key (33-byte compressed point) | AEAD-sealed part | mac1
    (a MAC over everything before it, keyed from the two nodes' static-static secret: §6)."""

    TYPE: ClassVar[int]
    LEN: ClassVar[int]
    NAME: ClassVar[str]
    path_id: bytes
    ephemeral: bytes
    sealed: bytes
    mac1: bytes = bytes(MAC1_LEN)

    def body(self) -> bytes:
        """What mac1 covers."""
        return bytes([self.TYPE]) + self.path_id + self.ephemeral + self.sealed

    def encode(self) -> bytes:
        return self.body() + self.mac1

    @classmethod
    def parse(cls, data: bytes) -> Self:
        return cls(*_parse_handshake(data, cls.TYPE, cls.LEN, cls.NAME))


class HandshakeRequest(_Handshake):
    """Tunnel Request: sealed = the initiator's timestamp (8-byte ciphertext + 16-byte tag)."""

    __slots__ = ()
    TYPE, LEN, NAME = TYPE_HANDSHAKE_REQUEST, REQUEST_LEN, "Tunnel Request"


class HandshakeResponse(_Handshake):
    """Tunnel Response: sealed = an AEAD tag over the transcript (16 bytes)."""

    __slots__ = ()
    TYPE, LEN, NAME = TYPE_HANDSHAKE_RESPONSE, RESPONSE_LEN, "Tunnel Response"


@dataclass(frozen=True, slots=True)
class TransportPacket:
    """DATA / KEEPALIVE / PING / PONG / CLOSE / STANDBY / PROBE / PROBE_ACK: clear header (the AEAD
    associated data) and ciphertext."""

    type: int
    path_id: bytes
    counter: int
    ciphertext: bytes  # payload ciphertext || 16-byte tag

    @property
    def header(self) -> bytes:
        return HEADER.pack(self.type, self.path_id, self.counter)

    def encode(self) -> bytes:
        return self.header + self.ciphertext

    @classmethod
    def parse(cls, data: bytes) -> TransportPacket:
        data = bytes(data)
        if len(data) < MIN_TRANSPORT_LEN:
            raise ParseError(f"transport packet is {len(data)} bytes, at least {MIN_TRANSPORT_LEN} needed")
        if len(data) > MAX_DATAGRAM:
            raise ParseError(f"transport packet is {len(data)} bytes, more than {MAX_DATAGRAM}")
        kind, path_id, counter = HEADER.unpack_from(data)
        if kind not in TRANSPORT_TYPES:
            raise ParseError(f"type 0x{kind:02x} is not a transport packet")
        if kind in (TYPE_KEEPALIVE, TYPE_CLOSE) and len(data) != KEEPALIVE_LEN:
            raise ParseError("keepalive or close carries a payload")
        if kind in (TYPE_PING, TYPE_PONG) and len(data) != MIN_TRANSPORT_LEN + PING_ID_LEN:
            raise ParseError("ping/pong payload is not 8 bytes")
        if kind == TYPE_PROBE and len(data) < MIN_TRANSPORT_LEN + PROBE_ID_LEN:
            raise ParseError("probe is shorter than its 8-byte id")
        if kind == TYPE_PROBE_ACK and len(data) != MIN_TRANSPORT_LEN + PROBE_ID_LEN:
            raise ParseError("probe ack payload is not 8 bytes")
        return cls(kind, path_id, counter, data[HEADER_LEN:])


def relay_side_key(token: bytes, side: int) -> bytes:
    """The key of one side of a relay path: HMAC-SHA256(path token, "ntm relay side" || side).
    The DC gives each node only its own side's key; the relay derives both from the token."""
    if len(token) != TOKEN_LEN or side not in (0, 1):
        raise ValueError("relay side key needs a 32-byte token and side 0 or 1")
    return hmac.digest(token, _RELAY_SIDE_LABEL + bytes([side]), "sha256")  # one C call: 1/8 of hmac.new's time


def relay_bind_mac(side_key: bytes, signed: bytes) -> bytes:
    return hmac.new(side_key, signed, hashlib.sha256).digest()[:BIND_MAC_LEN]


@dataclass(frozen=True, slots=True)
class RelayBind:
    """Node → relay: "I am side `side` of path `path_id`", MAC'd with that side's key.

    `counter` must grow with every bind of the side (freshness: a replayed bind is refused);
    `cookie` is what the relay's last RELAY_BIND_ACK to this address said (return routability:
    the relay binds the side to an address only once a bind from it carries its cookie)."""

    path_id: bytes
    side: int
    counter: int
    cookie: bytes = NO_COOKIE
    mac: bytes = bytes(BIND_MAC_LEN)

    def signed_part(self) -> bytes:
        return (
            bytes([TYPE_RELAY_BIND])
            + self.path_id
            + bytes([self.side])
            + self.counter.to_bytes(COUNTER_LEN, "big")
            + self.cookie
        )

    @classmethod
    def make(cls, path_id: bytes, side: int, counter: int, cookie: bytes, side_key: bytes) -> RelayBind:
        """A bind MAC'd with `side_key` (relay_side_key)."""
        if len(path_id) != PATH_ID_LEN or side not in (0, 1) or len(cookie) != COOKIE_LEN or not 0 <= counter < 1 << 64:
            raise ValueError("relay bind needs an 8-byte path ID, side 0 or 1, a 64-bit counter, a 16-byte cookie")
        unsigned = cls(path_id, side, counter, cookie)
        return cls(path_id, side, counter, cookie, relay_bind_mac(side_key, unsigned.signed_part()))

    def verify(self, side_key: bytes) -> bool:
        return hmac.compare_digest(self.mac, relay_bind_mac(side_key, self.signed_part()))

    def encode(self) -> bytes:
        return self.signed_part() + self.mac

    @classmethod
    def parse(cls, data: bytes) -> RelayBind:
        data = _exact(data, TYPE_RELAY_BIND, RELAY_BIND_LEN, "relay bind")
        at = PREFIX_LEN + 1
        return cls(
            data[1:PREFIX_LEN],
            _side(data, "relay bind"),
            int.from_bytes(data[at : at + COUNTER_LEN], "big"),
            data[at + COUNTER_LEN : at + COUNTER_LEN + COOKIE_LEN],
            data[at + COUNTER_LEN + COOKIE_LEN :],
        )


@dataclass(frozen=True, slots=True)
class RelayBindAck:
    """Relay → node, answering a valid bind: the cookie for the address the bind came from, and
    whether the side is now bound there (unauthenticated: a forged ack only costs a retry)."""

    path_id: bytes
    side: int
    bound: bool
    counter: int  # the bind's, so the node can tell the answer to its latest bind
    cookie: bytes

    def encode(self) -> bytes:
        if len(self.path_id) != PATH_ID_LEN or self.side not in (0, 1) or len(self.cookie) != COOKIE_LEN:
            raise ValueError("relay bind ack needs an 8-byte path ID, side 0 or 1 and a 16-byte cookie")
        return (
            bytes([TYPE_RELAY_BIND_ACK])
            + self.path_id
            + bytes([self.side, int(self.bound)])
            + self.counter.to_bytes(COUNTER_LEN, "big")
            + self.cookie
        )

    @classmethod
    def parse(cls, data: bytes) -> RelayBindAck:
        data = _exact(data, TYPE_RELAY_BIND_ACK, RELAY_BIND_ACK_LEN, "relay bind ack")
        if data[PREFIX_LEN + 1] not in (0, 1):
            raise ParseError("relay bind ack: bound flag must be 0 or 1")
        at = PREFIX_LEN + 2
        return cls(
            data[1:PREFIX_LEN],
            _side(data, "relay bind ack"),
            bool(data[PREFIX_LEN + 1]),
            int.from_bytes(data[at : at + COUNTER_LEN], "big"),
            data[at + COUNTER_LEN :],
        )


Packet = HandshakeRequest | HandshakeResponse | TransportPacket | RelayBind | RelayBindAck

_PARSERS = {
    TYPE_HANDSHAKE_REQUEST: HandshakeRequest.parse,
    TYPE_HANDSHAKE_RESPONSE: HandshakeResponse.parse,
    TYPE_DATA: TransportPacket.parse,
    TYPE_KEEPALIVE: TransportPacket.parse,
    TYPE_PING: TransportPacket.parse,
    TYPE_PONG: TransportPacket.parse,
    TYPE_CLOSE: TransportPacket.parse,
    TYPE_STANDBY: TransportPacket.parse,
    TYPE_PROBE: TransportPacket.parse,
    TYPE_PROBE_ACK: TransportPacket.parse,
    TYPE_RELAY_BIND: RelayBind.parse,
    TYPE_RELAY_BIND_ACK: RelayBindAck.parse,
}


def parse(datagram: bytes) -> Packet:
    """Any tunnel datagram into its message object; ParseError for anything else."""
    kind, _ = peek(datagram)
    return _PARSERS[kind](datagram)
