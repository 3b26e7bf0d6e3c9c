"""Hypothesis: random bytes into every tunnel parser and into the receive paths.

Parsers may only raise ntm.errors.ParseError; handshake processing only HandshakeError;
Session.receive never raises and never yields data from bytes it did not authenticate.
"""

from __future__ import annotations


from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ntm import keys, packet
from ntm.errors import ParseError
from ntm.handshake import HandshakeError, Initiator, Responder
from ntm.tunnel import Data, Session

KA, KB = keys.private_key(bytes([1]) * 32), keys.private_key(bytes([2]) * 32)
PA, PB = keys.public_bytes(KA), keys.public_bytes(KB)
IDA, IDB = keys.node_id(PA), keys.node_id(PB)
PATH = bytes(range(8))
T0 = 1700000000.0
SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

PARSERS = [
    packet.parse,
    packet.peek,
    packet.HandshakeRequest.parse,
    packet.HandshakeResponse.parse,
    packet.TransportPacket.parse,
    packet.RelayBind.parse,
    packet.RelayBindAck.parse,
]


def _established():
    a = Session(KA, IDB, PB, PATH, candidates=[("b", 1)])
    b = Session(KB, IDA, PA, PATH, role="wait")
    a.start(T0)
    b.start(T0)
    for _ in range(3):
        for d, _ in a.poll(T0):
            b.receive(d, ("a", 1), T0)
        for d, _ in b.poll(T0):
            a.receive(d, ("b", 1), T0)
    assert a.established and b.established
    return a, b


A_SESSION, B_SESSION = _established()

# bytes that look like tunnel packets: a known type byte and our path ID, then anything
typed = st.builds(
    lambda t, tail, keep_path: bytes([t]) + (PATH if keep_path else b"") + tail,
    st.sampled_from(sorted(packet.KNOWN_TYPES) + [0, 0x12, 0xFF]),
    st.binary(max_size=120),
    st.booleans(),
)
anybytes = st.one_of(st.binary(max_size=200), typed)


@SETTINGS
@given(anybytes)
def test_parsers_raise_only_parse_error(data):
    for parse in PARSERS:
        try:
            parse(data)
        except ParseError:
            pass


@SETTINGS
@given(st.sampled_from([packet.REQUEST_LEN, packet.RESPONSE_LEN, packet.RELAY_BIND_LEN]), st.data())
def test_exact_length_messages(n, data):
    raw = data.draw(st.binary(min_size=n, max_size=n))
    for t in (packet.TYPE_HANDSHAKE_REQUEST, packet.TYPE_HANDSHAKE_RESPONSE, packet.TYPE_RELAY_BIND):
        try:
            packet.parse(bytes([t]) + raw[1:])
        except ParseError:
            pass


@SETTINGS
@given(anybytes)
def test_handshake_processing_raises_only_handshake_error(data):
    r = Responder(KB, IDA, PA, PATH)
    i = Initiator(KA, IDB, PB, PATH)
    i.request(T0)
    for fn in (lambda: r.respond(data, T0), lambda: i.response(data)):
        try:
            fn()
        except HandshakeError:
            pass


@SETTINGS
@given(st.lists(anybytes, max_size=5))
def test_session_receive_never_raises(datagrams):
    before = A_SESSION.peer_addr
    for d in datagrams:
        events = B_SESSION.receive(d, ("x", 9), T0)
        assert not any(isinstance(e, Data) for e in events)
        A_SESSION.receive(d, ("x", 9), T0)
    assert A_SESSION.peer_addr == before and B_SESSION.peer_addr == ("a", 1)
    # still working
    assert B_SESSION.receive(A_SESSION.encrypt(b"ok", T0), ("a", 1), T0) == [Data(b"ok")]


@SETTINGS
@given(st.binary(min_size=1, max_size=300), st.integers(min_value=0), st.integers(min_value=0, max_value=7))
def test_mutated_real_packets_never_authenticate(payload, pos, bit):
    pkt = bytearray(A_SESSION.encrypt(payload, T0))
    pkt[pos % len(pkt)] ^= 1 << bit
    assert not any(isinstance(e, Data) for e in B_SESSION.receive(bytes(pkt), ("a", 1), T0))


def test_relay_bind_vectors_and_roundtrip():
    """PROTOCOL §8.2 vectors: side keys, a RELAY_BIND and a RELAY_BIND_ACK, byte for byte."""
    token, path = bytes(range(32)), bytes.fromhex("0102030405060708")
    assert packet.relay_side_key(token, 0).hex() == "84c0f665269b5ff973420ac58e98e8095019472083bf4594b61eedcbdb8b538d"
    k1 = packet.relay_side_key(token, 1)
    assert k1.hex() == "6f3ecd71ca1d7f1ececf7568dcd817b133ee4d2c45388136449701b7caf3e1ac"
    bind = packet.RelayBind.make(path, 1, 0x0102030405060708, b"\x11" * 16, k1)
    raw = bind.encode()
    assert raw.hex() == ("100102030405060708010102030405060708" + "11" * 16 + "32c5fe8a451ed41e95dd03216b43899a")
    assert packet.RelayBind.parse(raw) == bind and bind.verify(k1) and not bind.verify(packet.relay_side_key(token, 0))
    assert packet.peek(raw) == (packet.TYPE_RELAY_BIND, path)
    ack = packet.RelayBindAck(path, 1, True, 0x0102030405060708, b"\x22" * 16)
    assert ack.encode().hex() == "11010203040506070801010102030405060708" + "22" * 16
    assert packet.RelayBindAck.parse(ack.encode()) == ack
