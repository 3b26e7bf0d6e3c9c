"""Wire format of tunnel datagrams (docs/PROTOCOL.md §6 and §7): encode and parse, nothing else.

Every tunnel datagram starts with `type (1) || path ID (8)` in clear, so a demultiplexer (the
node's endpoint) and a relay can find the path without any key. Parsers raise
`ntm.errors.ParseError` and nothing else on bad bytes.

    0x01 HANDSHAKE_REQUEST   type | path | ephemeral (33) | sealed timestamp (8 + 16)   66 bytes
    0x02 HANDSHAKE_RESPONSE  type | path | ephemeral (33) | sealed empty (16)           58 bytes
    0x03 DATA                type | path | counter (8) | AEAD(payload) (len + 16)       >= 33 bytes
    0x04 KEEPALIVE           type | path | counter (8) | AEAD(empty) (16)               33 bytes
    0x05 PING / 0x06 PONG    type | path | counter (8) | AEAD(ping id (8)) (24)         41 bytes
    0x07 CLOSE               type | path | counter (8) | AEAD(empty) (16)               33 bytes
    0x10 RELAY_BIND          type | path | token (32) | side (1)                        42 bytes
    0x11 RELAY_BIND_ACK      type | path | side (1)                                     10 bytes
    0x12..0x1f               reserved for relay control
"""

from __future__ import annotations

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
TYPE_RELAY_BIND = 0x10
TYPE_RELAY_BIND_ACK = 0x11
RELAY_RESERVED = range(0x12, 0x20)

#: Types carried by a relay unchanged between the two bound endpoints of a path.
FORWARDED_TYPES = frozenset(
    {TYPE_HANDSHAKE_REQUEST, TYPE_HANDSHAKE_RESPONSE, TYPE_DATA, TYPE_KEEPALIVE, TYPE_PING, TYPE_PONG, TYPE_CLOSE}
)
#: Types whose body is `counter (8) || AEAD ciphertext` (transport packets).
TRANSPORT_TYPES = frozenset({TYPE_DATA, TYPE_KEEPALIVE, TYPE_PING, TYPE_PONG, TYPE_CLOSE})
KNOWN_TYPES = FORWARDED_TYPES | {TYPE_RELAY_BIND, TYPE_RELAY_BIND_ACK}

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

REQUEST_LEN = PREFIX_LEN + EPHEMERAL_LEN + TIMESTAMP_LEN + TAG_LEN  # 66
RESPONSE_LEN = PREFIX_LEN + EPHEMERAL_LEN + TAG_LEN  # 58
MIN_TRANSPORT_LEN = HEADER_LEN + TAG_LEN  # 33
KEEPALIVE_LEN = MIN_TRANSPORT_LEN
RELAY_BIND_LEN = PREFIX_LEN + TOKEN_LEN + 1  # 42
RELAY_BIND_ACK_LEN = PREFIX_LEN + 1  # 10
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
    """The relay side (0 or 1) in the last byte of a relay message."""
    side = data[-1]
    if side not in (0, 1):
        raise ParseError(f"{name} side is {side}, expected 0 or 1")
    return side


def _parse_handshake(data: bytes, kind: int, length: int, name: str) -> tuple[bytes, bytes, bytes]:
    """(path ID, ephemeral key, sealed part) of a Tunnel Request or Response of exact `length`."""
    data = _exact(data, kind, length, name)
    eph = data[PREFIX_LEN : PREFIX_LEN + EPHEMERAL_LEN]
    _check_point(eph)
    return data[1:PREFIX_LEN], eph, data[PREFIX_LEN + EPHEMERAL_LEN :]


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
    """type | path ID | sender's ephemeral key (33-byte compressed point) | AEAD-sealed part."""

    TYPE: ClassVar[int]
    LEN: ClassVar[int]
    NAME: ClassVar[str]
    path_id: bytes
    ephemeral: bytes
    sealed: bytes

    def encode(self) -> bytes:
        return bytes([self.TYPE]) + self.path_id + self.ephemeral + self.sealed

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
    """DATA / KEEPALIVE / PING / PONG: clear header (the AEAD associated data) and ciphertext."""

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
        return cls(kind, path_id, counter, data[HEADER_LEN:])


@dataclass(frozen=True, slots=True)
class RelayBind:
    """Node → relay: "I am side `side` of path `path_id`, here is the token the DC gave me"."""

    path_id: bytes
    token: bytes  # 32 bytes, from the DC's Relay Direction
    side: int  # 0 or 1

    def encode(self) -> bytes:
        if len(self.path_id) != PATH_ID_LEN or len(self.token) != TOKEN_LEN or self.side not in (0, 1):
            raise ValueError("relay bind needs an 8-byte path ID, a 32-byte token and side 0 or 1")
        return bytes([TYPE_RELAY_BIND]) + self.path_id + self.token + bytes([self.side])

    @classmethod
    def parse(cls, data: bytes) -> RelayBind:
        data = _exact(data, TYPE_RELAY_BIND, RELAY_BIND_LEN, "relay bind")
        return cls(data[1:PREFIX_LEN], data[PREFIX_LEN : PREFIX_LEN + TOKEN_LEN], _side(data, "relay bind"))


@dataclass(frozen=True, slots=True)
class RelayBindAck:
    """Relay → node: the bind for (path, side) was accepted (unauthenticated, advisory)."""

    path_id: bytes
    side: int

    def encode(self) -> bytes:
        if len(self.path_id) != PATH_ID_LEN or self.side not in (0, 1):
            raise ValueError("relay bind ack needs an 8-byte path ID and side 0 or 1")
        return bytes([TYPE_RELAY_BIND_ACK]) + self.path_id + bytes([self.side])

    @classmethod
    def parse(cls, data: bytes) -> RelayBindAck:
        data = _exact(data, TYPE_RELAY_BIND_ACK, RELAY_BIND_ACK_LEN, "relay bind ack")
        return cls(data[1:PREFIX_LEN], _side(data, "relay bind ack"))


Packet = HandshakeRequest | HandshakeResponse | TransportPacket | RelayBind | RelayBindAck

_PARSERS = {
    TYPE_HANDSHAKE_REQUEST: HandshakeRequest.parse,
    TYPE_HANDSHAKE_RESPONSE: HandshakeResponse.parse,
    TYPE_DATA: TransportPacket.parse,
    TYPE_KEEPALIVE: TransportPacket.parse,
    TYPE_PING: TransportPacket.parse,
    TYPE_PONG: TransportPacket.parse,
    TYPE_CLOSE: TransportPacket.parse,
    TYPE_RELAY_BIND: RelayBind.parse,
    TYPE_RELAY_BIND_ACK: RelayBindAck.parse,
}


def parse(datagram: bytes) -> Packet:
    """Any tunnel datagram into its message object; ParseError for anything else."""
    kind, _ = peek(datagram)
    return _PARSERS[kind](datagram)
