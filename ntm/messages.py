"""Every JSON message between node, DC and RS: one typed definition and one parser each.

Messages are msgspec Structs: `decode(Type, obj_or_text)` validates types, field names (unknown
fields are refused), hex lengths and endpoint syntax in one call and raises ParseError; `encode`
gives the JSON-ready dict. Both ends use the same class, so a field is named in one place.
msgspec over hand-written checks: one declaration instead of one validator per message, at the same
cost (measured here: a Route Direction with three endpoints decodes in ~44 µs against ~40 µs for
the hand-written code it replaces; both are dominated by `ipaddress` parsing the endpoints).
Wire formats: docs/PROTOCOL.md §5 and §8.

Session messages (the node↔DC WebSocket) carry a `type` tag; envelope bodies are untagged (the
envelope's `kind` names them, see ntm/envelope.py).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, TypeVar, Union

import msgspec
from msgspec import Meta, Struct

from ntm import addr, keys
from ntm.route import RouteKind
from ntm.errors import ParseError

# Limits that keep one message small: at most this many endpoints in any list.
MAX_ENDPOINTS = 8
# JSON from outsiders (HTTP bodies, headers, session frames) is refused before it is parsed when it
# nests deeper than this: our deepest message (a Route Direction in a push) nests 4 levels, and
# Python's parsers fail with RecursionError (a 500 and a traceback) near 1,000.
MAX_JSON_DEPTH = 32
# Integers in outsiders' JSON fit a signed 64-bit integer (SQLite's INTEGER; every timestamp,
# size and counter here): a larger one is refused at parse, before any work.
INT_MIN, INT_MAX = -(2**63), 2**63 - 1

NodeId = Annotated[str, Meta(pattern=r"^(0[xX])?[0-9a-fA-F]{40}$")]
Hex8 = Annotated[str, Meta(pattern=r"^[0-9a-fA-F]{16}$")]  # path IDs
Hex16 = Annotated[str, Meta(pattern=r"^[0-9a-fA-F]{32}$")]  # envelope nonces
Hex32 = Annotated[str, Meta(pattern=r"^[0-9a-fA-F]{64}$")]  # tokens, challenges
Hex33 = Annotated[str, Meta(pattern=r"^[0-9a-fA-F]{66}$")]  # compressed public keys
Hex65 = Annotated[str, Meta(pattern=r"^[0-9a-fA-F]{130}$")]  # signatures r||s||v
PubKeyHex = Annotated[str, Meta(pattern=r"^[0-9a-fA-F]{66}([0-9a-fA-F]{64})?$")]  # 33 or 65 bytes
Endpoint = Annotated[str, Meta(max_length=64)]
Endpoints = Annotated[list[Endpoint], Meta(max_length=MAX_ENDPOINTS)]
Port = Annotated[int, Meta(ge=0, le=65535)]
# A relay's stream listener (§8.4): WebSocket, plain or over TLS.
StreamUrl = Annotated[str, Meta(pattern=r"^wss?://[^\s/]+/\S*$", max_length=256)]
StreamUrls = Annotated[list[StreamUrl], Meta(max_length=MAX_ENDPOINTS)]
Ms = Annotated[int, Meta(ge=0, le=INT_MAX)]


class Message(Struct, forbid_unknown_fields=True, omit_defaults=True):
    """Base: unknown fields are refused; defaults are left out of the encoding."""


def _check_endpoints(endpoints: list[str] | tuple[str, ...]) -> None:
    for e in endpoints:
        addr.parse_endpoint(e)  # ValueError → ParseError in decode()


class ErrorBody(Message):
    """A refusal: a stable code and a readable message (HTTP error bodies, failed directions)."""

    error: str
    message: str = ""


# --- node ↔ DC session (WebSocket), tagged by "type" -----------------------------------------
class Challenge(Message, tag="challenge", tag_field="type"):
    dc: NodeId
    challenge: Hex32


# At most this many prefixes in one route offer (§10.10): a LAN or a few, never a routing table.
MAX_OFFERED_ROUTES = 16
Prefix = Annotated[str, Meta(max_length=43)]  # "a.b.c.d/n" or an IPv6 prefix


class RouteOffer(Message):
    """The routes a node offers to forward (§10.10), signed by the node itself: its DC carries the
    offer (in the session's Auth, then in NodeInfo) but cannot forge or alter it."""

    node: NodeId
    seq: Ms  # the node's wall clock in ms when signed: a newer offer replaces an older one
    sig: Hex65  # over routes.offer_digest (ntm/routes.py)
    routes: Annotated[list[Prefix], Meta(max_length=MAX_OFFERED_ROUTES)] = []
    exit: bool = False  # offers 0.0.0.0/0 and ::/0 as an exit node


class Auth(Message, tag="auth", tag_field="type"):
    node: NodeId
    signature: Hex65
    local_addrs: Endpoints = []
    routes: RouteOffer | None = None  # what this node offers to forward (§10.10), if anything

    def __post_init__(self) -> None:
        _check_endpoints(self.local_addrs)


class Welcome(Message, tag="welcome", tag_field="type"):
    token: Hex32
    keepalive_ports: Annotated[list[Port], Meta(max_length=2)]


class SessionError(Message, tag="error", tag_field="type"):
    error: str
    message: str = ""


class StatusQuery(Message, tag="status", tag_field="type"):
    pass


class StatusReply(Message, tag="status", tag_field="type"):
    observed: str | None = None
    observed_alt: str | None = None
    keepalives: int = 0


class DirectionRequest(Message, tag="direction-request", tag_field="type"):
    id: int
    peer: NodeId
    # "relay": the node asks for the relay on purpose; "direct": only a direct path, no relay
    # booked (a tunnel on the relay trying to move off it, §8.3)
    route: Literal["relay", "direct"] | None = None
    resume: Hex8 | None = None  # the tunnel (first path ID) a re-direction repairs
    # True: the requester's Route Direction comes in the DirectionResult (one reply, §8.1). Absent:
    # the old pair (pushed direction, then the result), for nodes from before this field.
    inline: bool = False


# A node's part in building a path (§8.1): it sends first, listens first, or both at once.
Role = Literal["initiate", "wait", "punch"]


class RouteChoice(Message):
    """What the DC decided for a Direction Request: the new path, its kind, the requester's role."""

    path: Hex8
    kind: RouteKind
    reason: str
    role: Role


class DirectionResult(Message, tag="direction-result", tag_field="type"):
    """The answer to DirectionRequest `id`: the route, or why there is none."""

    id: int
    route: RouteChoice | None = None
    error: ErrorBody | None = None
    # A failed request whose Route Direction had already been pushed to the requester (the peer
    # initiates, so the requester listens first): the requester stops following that path.
    # Old pair only: in the one-reply form nothing reaches the requester before the outcome is known.
    abandoned: Hex8 | None = None
    # The one-reply form (the request was `inline`): the requester's signed Route Direction, with `route`.
    direction: SignedEnvelope | None = None


class SignedEnvelope(Message):
    """A signed envelope (ntm/envelope.py) carried inside another message: its shape is checked
    here, its signature, kind, freshness and body by envelope.open_body; `body` stays the signed
    JSON object, so the signature still verifies over exactly what was signed."""

    kind: str
    from_: str = msgspec.field(name="from")
    ts: int
    nonce: str
    body: dict[str, Any]
    sig: str


class DirectionPush(Message, tag="direction", tag_field="type"):
    direction: SignedEnvelope  # of kind ROUTE_DIRECTION


# Why a node does not serve a direction a peer asked for (§8.1): its allow list, or its rates.
Refusal = Literal["not_allowed", "peer_busy"]


class DirectionAck(Message, tag="direction-ack", tag_field="type"):
    """The node's answer to a pushed Route Direction, decided before any handshake: it follows
    path `path`, or refuses it (a code, never free text: the DC words the refusal, §8.1)."""

    path: Hex8
    refused: Refusal | None = None


class CsNotice(Message, kw_only=True):
    """An item waits for the node at a Cache Server (docs/PROTOCOL.md §12): the body of a
    CS_NOTICE envelope (CS → the node's home DC) and of the push on the node's session."""

    node: NodeId  # the recipient
    item: Hex16
    cs: Annotated[str, Meta(max_length=256)]  # the Cache Server's URL
    sender: NodeId
    size: Annotated[int, Meta(ge=0)]
    created: Ms


class CsNoticePush(Message, tag="cs-notice", tag_field="type"):
    notice: CsNotice


class CsNoticeAck(Message, tag="cs-notice-ack", tag_field="type"):
    """The node has the item (or does not want the notice again): the DC forgets it."""

    item: Hex16


NodeToDc = Union[Auth, StatusQuery, DirectionRequest, DirectionAck, CsNoticeAck]
DcToNode = Union[Challenge, Welcome, SessionError, StatusReply, DirectionResult, DirectionPush, CsNoticePush]


# --- envelope bodies (the envelope's kind names them) -----------------------------------------
ROUTE_DIRECTION = "route-direction"
RELAY_DIRECTION = "relay-direction"
INFO_REQUEST = "ntm-info-request"
INFO_RESPONSE = "ntm-info-response"
DIRECTION_OFFER = "direction-offer"  # requester's DC -> the peer's home DC (§8.5)
DIRECTION_ANSWER = "direction-answer"  # ... and its answer
CS_NOTICE = "cs-notice"  # Cache Server -> a recipient's home DC
CHANNEL_HELLO = "channel-hello"  # a DC proves itself once on its kept channel to a peer DC (§8.6)
CHANNEL_HELLO_PATH = "/v1/federation/channel-hello"  # channel calls only, never HTTP requests
PROVEN_OFFER_PATH = "/v1/federation/proven/direction-offer"  # a bare DirectionOffer on a proven channel
# Node-signed Cache Server requests (envelopes signed by a node key; §12)
CS_PUT, CS_LIST, CS_GET, CS_ACK = "cs.put", "cs.list", "cs.get", "cs.ack"


class CsPut(Message):
    """The body of a CS_PUT envelope: the sealed item's public header (ntm/seal.py checks it,
    refusing with its own error) and its ciphertext size."""

    header: Any
    size: Annotated[int, Meta(gt=0, le=INT_MAX)]


class CsItemRef(Message):
    """The body of a CS_GET or CS_ACK envelope: the item asked for (the one in the URL)."""

    item: Hex16


class RelayGrant(Message):
    """Where and how a node binds at the relay: its side (0/1) and the path token."""

    endpoints: Annotated[list[Endpoint], Meta(min_length=1, max_length=MAX_ENDPOINTS)]
    token: Hex32
    side: Literal[0, 1]
    streams: StreamUrls = []  # the same relay over TCP (§8.4), for a node without UDP

    def __post_init__(self) -> None:
        _check_endpoints(self.endpoints)


class RouteDirection(Message):
    """A DC tells `node` how to build path `path` to `peer` (§8.1)."""

    path: Hex8
    kind: RouteKind
    reason: str
    role: Role
    node: NodeId
    home_dc: NodeId  # the DC that pushes it to `node`: another DC refuses it (no replay elsewhere)
    peer: NodeId
    peer_pubkey: PubKeyHex
    requester: NodeId
    candidates: Endpoints = []  # verified by the DC: tried until the handshake completes
    unverified: Endpoints = []  # announced only: at most one, tried once (reflection bound)
    relay: RelayGrant | None = None
    resume: Hex8 | None = None

    def __post_init__(self) -> None:
        _check_endpoints(self.candidates)
        _check_endpoints(self.unverified)


class RelayDirection(Message):
    """A DC books a relayed path at an RS (§8.2)."""

    path: Hex8
    token: Hex32
    nodes: Annotated[list[NodeId], Meta(min_length=2, max_length=2)]
    expires_ms: Ms
    max_bytes: Annotated[int, Meta(gt=0)]


class RelayBooking(Message):
    """The RS's answer to a Relay Direction: its UDP endpoints, its stream URLs (§8.4) and what
    it granted."""

    path: Hex8
    relay: Endpoints
    created: bool
    expires_ms: Ms
    max_bytes: int
    streams: StreamUrls = []


# --- several Relay Directions in one envelope (§8.2 "Batches") ---------------------------------
RELAY_DIRECTIONS = "relay-directions"
RELAY_BATCH_PATH = "/v1/relay-direction-batches"  # the RS's POST (and channel call) for them
# Relay Directions in one batch: ~250 bytes each, so a batch fits the relay's 16 KiB request body
# (rs/server.py MAX_BODY) and its answer a channel frame; under load ~10 come in one event-loop turn.
RELAY_BATCH_MAX = 32


class RelayDirections(Message):
    """A DC books several relayed paths with one signature: each booked or refused on its own."""

    directions: Annotated[list[RelayDirection], Meta(min_length=1, max_length=RELAY_BATCH_MAX)]


class RelayOutcome(Message):
    """One Relay Direction's answer in a batch: what its own request would get (status, body)."""

    status: int
    body: dict[str, Any]


class RelayOutcomes(Message):
    """The RS's answer to a batch, in the batch's order."""

    outcomes: list[RelayOutcome]


# --- the relay as exit for ordinary servers (§10.13) ---------------------------------------------
EXIT_REQUEST = "exit.request"  # node → its DC: book me an exit at a relay (node-signed)
EXIT_BOOKING = "exit-booking"  # DC → RS: admit this node to the RS exit (DC-signed)


class ExitRequest(Message):
    """A node asks its DC for an exit at a relay; the body is empty (the envelope says who)."""


class ExitBooking(Message):
    """A DC books the RS exit for `node` on path `path` (§10.13): the RS admits only booked nodes."""

    path: Hex8
    node: NodeId
    node_pubkey: PubKeyHex
    expires_ms: Ms
    max_bytes: Annotated[int, Meta(gt=0)]


class ExitGrant(Message):
    """The RS's answer to an Exit Booking, handed on to the node: where the exit's tunnel
    responder listens, its key, its signed exit offer and the caps it applies to this node."""

    path: Hex8
    exit: Annotated[list[Endpoint], Meta(min_length=1, max_length=MAX_ENDPOINTS)]
    exit_node: NodeId
    exit_pubkey: PubKeyHex
    offer: RouteOffer
    expires_ms: Ms
    max_bytes: int
    rate_bps: int
    max_flows: int

    def __post_init__(self) -> None:
        _check_endpoints(self.exit)


class InfoRequest(Message):
    """NTM Information Request: one DC asks `to` (the node's home DC) about `node`."""

    node: NodeId
    to: NodeId


class NodeInfo(Message, kw_only=True):
    """What a home DC knows of its node: the NTM Information Response body, and whois."""

    node: NodeId
    home_dc: NodeId
    timestamp: Ms
    pubkey: PubKeyHex | None = None  # None for a revoked record known only from the chain
    revoked: bool
    local_addrs: Endpoints = []
    online: bool
    observed: Endpoint | None = None  # the NAT mapping seen by the DC's first keepalive port
    observed_alt: Endpoint | None = None  # ... and by its second port (differs: symmetric NAT)
    confirmed: bool | None = None  # whois only: the DC's record is the chain's
    routes: RouteOffer | None = None  # the node's signed route offer from its live session (§10.10)


class DirectionOffer(Message):
    """A requester's DC asks the peer's home DC `to` to direct its node `peer` towards `requester`
    (the requester's DC's own NodeInfo of it) in one call: lookup, route, relay, push (§8.5)."""

    path: Hex8
    to: NodeId
    peer: NodeId
    requester: NodeInfo
    route: Literal["relay", "direct"] | None = None  # as the node's DirectionRequest asked
    resume: Hex8 | None = None


class DirectionAnswer(Message):
    """The peer's home DC's answer to a DirectionOffer: the peer's info, the route it decided, the
    requester's role and relay grant, and the peer's Route Direction when the peer initiates (the
    requester's DC delivers it once its node listens); otherwise the peer has it already."""

    path: Hex8
    peer: NodeInfo
    kind: RouteKind
    reason: str
    role: Role
    relay: RelayGrant | None = None
    deliver: SignedEnvelope | None = None  # a ROUTE_DIRECTION envelope signed by the peer's home DC


class ChannelHello(Message):
    """The body of a CHANNEL_HELLO envelope: its signer opened this channel to DC `to`, so the
    calls that follow on it are that DC's without an envelope each (§8.6 "Proven channels")."""

    to: NodeId


class ChannelCall(Message):
    """A federation call on a kept DC-to-DC WebSocket (§8.6): the HTTP path it stands for and that
    request's body (a DC-signed envelope, checked by the same handler as over HTTP). The reply
    names the call's `id`, so calls on one channel run concurrently."""

    id: Annotated[int, Meta(ge=1, le=INT_MAX)]
    path: Annotated[str, Meta(max_length=64)]
    body: dict[str, Any]


class ChannelReply(Message):
    """The answer to ChannelCall `id`: what its HTTP answer would be (status, JSON body)."""

    id: int
    status: int
    body: dict[str, Any]


# --- HTTP -------------------------------------------------------------------------------------
class TlsBinding(Message):
    """The DC's TLS certificate (SHA-256 of its DER) signed by its chain key (ntm/tls_binding.py)."""

    cert_sha256: Hex32
    sig: Hex65


class DcInfoReply(Message):
    """GET /v1/info."""

    dc: NodeId
    hostname: str
    chain_id: int
    registry: NodeId
    keepalive_ports: list[Port]
    relays: list[str]
    active: bool
    cs: str | None = None  # this DC's Cache Server (URL), if it has one
    relay_streams: StreamUrls = []  # its relays' stream URLs (§8.4): `ntm netcheck` tries them
    tls: TlsBinding | None = None  # served over TLS: its certificate bound to its chain key (§5)


class DcEntry(Message):
    dc: NodeId
    hostname: str
    endpoint: str


class DcList(Message):
    """GET /v1/dcs: the active DCs on chain, where a node may re-register if its DC fails."""

    dcs: list[DcEntry]


class RecordJson(Message):
    node: NodeId
    dc: NodeId
    timestamp: Ms
    revoked: bool = False


class RegisterBody(Message):
    """POST /v1/register: a Registration Request (§5)."""

    record: RecordJson
    signature: Hex65
    pubkey: PubKeyHex
    local_addrs: Endpoints = []
    wait: Literal["confirmed"] | None = None

    def __post_init__(self) -> None:
        _check_endpoints(self.local_addrs)


class RegisterResult(Message):
    node: NodeId
    dc: NodeId
    timestamp: Ms
    status: Literal["durable", "confirmed", "rejected"]
    tx: str | None = None
    block: int | None = None
    reason: str | None = None


# --- groups (§13): GMS requests and answers, control notes between members --------------------
# Members per group (§13.3): every change is O(members) for the admin (a new RN1 to each) and the
# answer lists them; beyond a thousand a tree scheme (MLS) is the better tool.
GROUP_MAX_MEMBERS = 1000
GROUP_MAX_INVITES = 1000  # open invitations per group (§13.3)
GROUP_EPOCHS_PER_ANSWER = 16  # a GMS answer carries at most this many (newest) epochs
Hex81 = Annotated[str, Meta(pattern=r"^[0-9a-fA-F]{162}$")]  # an RN2 wrapped to one member (§13.1)
GroupName = Annotated[str, Meta(max_length=64)]  # checked further by ntm.group.check_name
Epoch32 = Annotated[int, Meta(ge=0, le=2**32 - 1)]  # epochs and RN1 generations: u32 on the wire (§13.2)
GmsUrl = Annotated[str, Meta(max_length=200)]  # checked further by ntm.groupstate.check_gms_url
GroupMembers = Annotated[list[NodeId], Meta(max_length=GROUP_MAX_MEMBERS)]


class GroupCreate(Message):
    """Body of `group.create`."""

    gid: Hex16
    name: GroupName


class GroupRef(Message):
    """Body of `group.accept` and `group.leave`."""

    gid: Hex16


class GroupInvite(Message):
    """Body of `group.invite`."""

    gid: Hex16
    node: NodeId


class GroupRemove(Message):
    """Body of `group.remove`: `rn1_gen` is the generation the admin hands the others."""

    gid: Hex16
    node: NodeId
    rn1_gen: Epoch32


class GroupStateQuery(Message):
    """Body of `group.state`: epochs from `since` on."""

    gid: Hex16
    since: Epoch32 = 0


class GmsEpoch(Message):
    """One epoch in a GMS answer, its RN2 wrapped to the member asking."""

    epoch: Epoch32
    rn1_gen: Epoch32
    members: GroupMembers
    rn2: Hex81


class GmsView(Message):
    """A GMS answer: the group as the signer may see it."""

    gid: Hex16
    name: GroupName
    admin: NodeId
    epoch: Epoch32
    rn1_gen: Epoch32
    members: GroupMembers
    invited: Annotated[list[NodeId], Meta(max_length=GROUP_MAX_INVITES)]
    epochs: Annotated[list[GmsEpoch], Meta(max_length=GROUP_EPOCHS_PER_ANSWER)]


class GmsLeft(Message):
    """The GMS's answer to `group.leave`."""

    gid: Hex16
    left: bool


class InviteNote(Message, tag="invite", tag_field="t"):
    """Admin → invitee: a request the user answers; admits nobody (§12.1)."""

    gid: Hex16
    name: GroupName
    admin: NodeId
    gms: GmsUrl


class Rn1Note(Message, tag="rn1", tag_field="t"):
    """Admin → member: RN1 generation `gen`."""

    gid: Hex16
    gen: Epoch32
    rn1: Hex32


class JoinedNote(Message, tag="joined", tag_field="t"):
    """Member → admin: look at the GMS now."""

    gid: Hex16


class LeftNote(Message, tag="left", tag_field="t"):
    """Member → admin: look at the GMS now."""

    gid: Hex16


ControlNote = Union[InviteNote, Rn1Note, JoinedNote, LeftNote]


class CsListRequest(Message):
    """The body of a CS_LIST envelope: empty (the envelope's signer is the recipient asking)."""


# --- every envelope's body, by kind (ntm/envelope.py seal_body / open_body) ----------------------
BODY_OF: dict[str, type[Message]] = {
    ROUTE_DIRECTION: RouteDirection,
    RELAY_DIRECTION: RelayDirection,
    RELAY_DIRECTIONS: RelayDirections,
    INFO_REQUEST: InfoRequest,
    INFO_RESPONSE: NodeInfo,
    DIRECTION_OFFER: DirectionOffer,
    DIRECTION_ANSWER: DirectionAnswer,
    CHANNEL_HELLO: ChannelHello,
    CS_NOTICE: CsNotice,
    CS_PUT: CsPut,
    CS_LIST: CsListRequest,
    CS_GET: CsItemRef,
    CS_ACK: CsItemRef,
    EXIT_REQUEST: ExitRequest,
    EXIT_BOOKING: ExitBooking,
    "group.create": GroupCreate,  # node → GMS requests (§13.3)
    "group.invite": GroupInvite,
    "group.accept": GroupRef,
    "group.leave": GroupRef,
    "group.remove": GroupRemove,
    "group.state": GroupStateQuery,
}


# --- one parser, one encoder ------------------------------------------------------------------
T = TypeVar("T")


def check_depth(raw: str | bytes | bytearray | memoryview) -> None:
    """ParseError if JSON text nests deeper than MAX_JSON_DEPTH: one pass, before any parsing."""
    data = raw.encode() if isinstance(raw, str) else bytes(raw)
    if data.count(b"[") + data.count(b"{") <= MAX_JSON_DEPTH:
        return  # cannot nest deeper: the common case costs two C scans
    depth, in_string, escaped = 0, False, False
    for b in data:
        if in_string:
            if escaped:
                escaped = False
            elif b == 0x5C:  # backslash
                escaped = True
            elif b == 0x22:  # quote
                in_string = False
        elif b == 0x22:
            in_string = True
        elif b in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > MAX_JSON_DEPTH:
                raise ParseError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
        elif b in (0x5D, 0x7D):
            depth -= 1


def _bounded_int(text: str) -> int:
    value = int(text)
    if not INT_MIN <= value <= INT_MAX:
        raise ValueError(f"integer {text[:24]}{'…' if len(text) > 24 else ''} out of the 64-bit range")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def loads(raw: str | bytes | bytearray | memoryview) -> Any:
    """JSON from an outsider: ParseError for anything malformed, nested deeper than MAX_JSON_DEPTH,
    with an integer outside the signed 64-bit range, or NaN/Infinity; never another exception."""
    check_depth(raw)
    try:
        return json.loads(
            bytes(raw) if isinstance(raw, (bytearray, memoryview)) else raw,
            parse_int=_bounded_int,
            parse_constant=_no_constant,
        )
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ParseError(f"not JSON: {exc}") from None


def decode(kind: type[T] | Any, obj: Any) -> T:
    """Validate `obj` (decoded JSON, or JSON text/bytes) as `kind`; ParseError naming the field."""
    try:
        if isinstance(obj, (str, bytes, bytearray, memoryview)):
            check_depth(obj)
            return msgspec.json.decode(obj, type=kind)
        return msgspec.convert(obj, kind)
    except (msgspec.ValidationError, msgspec.DecodeError, ValueError, TypeError, RecursionError) as exc:
        name = getattr(kind, "__name__", "message")
        raise ParseError(f"malformed {name}: {exc}") from None


def encode(msg: Message) -> dict:
    """The JSON-ready dict of a message (tag included for session messages)."""
    return msgspec.to_builtins(msg)


def dumps(obj: Any) -> str:
    """JSON text of a message or of decoded JSON, for a WebSocket frame: msgspec's encoder, ~7x
    json.dumps (aiohttp's send_json default), which every hop of a direction paid (issue 30)."""
    return msgspec.json.encode(obj).decode()


def node_id(text: str) -> bytes:
    """Bytes of a NodeId field (already checked by its pattern)."""
    return keys.parse_node_id(text)
