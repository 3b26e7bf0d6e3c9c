"""DC-to-DC and DC-to-RS requests, each a DC-signed envelope (ntm/envelope.py) over HTTP.

An NTM Information Request asks a node's home DC for its key and addresses; a Direction Offer asks
it to direct its node in one call (a Direction Request's lookup, route and push); a Route Direction
is handed to a node's home DC for delivery; a Relay Direction books a relayed path at an RS. Each
receiver accepts only envelopes from DCs active in its registry, so an unknown or removed DC
learns nothing. Calls to a peer DC travel on one kept WebSocket to it (a Channel, §8.6): an HTTP
request each cost both DCs ~4x the CPU of a frame. Message bodies: ntm/messages.py; spec:
docs/PROTOCOL.md §4, §8.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any, Awaitable, Callable, TypeVar
from urllib.parse import urlsplit

import aiohttp
import coincurve

from daemon import service, tlspin
from daemon.channel import PATH as CHANNEL_PATH
from ntm import envelope, keys, messages
from ntm.clock import SYSTEM, Clock
from ntm.errors import NtmError, ParseError, SignatureError

# A peer DC on loopback or a LAN answers in milliseconds; 3 s marks it as down without stalling a
# node's request for long. A relay answers from memory after at most one chain call.
FEDERATION_TIMEOUT_S = 3.0
# A Direction Offer is answered only after the peer's home DC booked a relay (a dead relay costs it
# FEDERATION_TIMEOUT_S) and its node acknowledged (signaling.DIRECTION_ACK_TIMEOUT_S, 2 s): room
# for both and a loaded host, inside the node's own 8 s wait for its Direction Request.
OFFER_TIMEOUT_S = 6.0
# A kept channel to a peer DC is pinged this often; without a pong within half of it the channel is
# dropped and its calls fail at once (a peer gone without a FIN or RST), well inside OFFER_TIMEOUT_S.
CHANNEL_HEARTBEAT_S = 4.0
# A peer DC without the channel (an older version: 404) gets plain HTTP requests; it is asked
# again after this long (it may have been upgraded meanwhile).
NO_CHANNEL_RETRY_S = 60.0
# Largest reply frame: a Direction Answer with the peer's Route Direction is ~2 KB.
CHANNEL_MAX_MSG = 64 * 1024

T = TypeVar("T")
# Relay Directions waiting to leave together, each with the future its booker awaits.
Batch = list[tuple[messages.RelayDirection, "asyncio.Future[messages.RelayBooking]"]]
# How a request leaves: POST JSON to a URL, get (HTTP status, decoded JSON). aiohttp by default;
# the fast tests route it to in-process handlers (tests/fakes.py FederationRouter).
Transport = Callable[[str, dict], Awaitable[tuple[int, Any]]]


class FederationError(NtmError):
    """A peer DC or relay could not be reached or gave an answer that does not verify. `code` is
    the peer's error code when it answered with one, `status` its HTTP status (0: no answer)."""

    CODE, DEFAULT_STATUS = "federation", 502  # our refusal when a peer fails us

    def __init__(self, message: str, code: str | None = None, status: int = 0) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


def answered(who: str, status: int, data: Any, answer: type[T]) -> T:
    """`data` as `answer` if `who` answered 200; FederationError with its code and status otherwise."""
    try:
        if status != 200:
            err = messages.decode(messages.ErrorBody, data)
            raise FederationError(f"{who} refused: {err.message or err.error}", err.error, status)
        return messages.decode(answer, data)
    except ParseError as exc:
        raise FederationError(f"{who} answered {status}: {exc}", None, status) from None


class Unproven(Exception):
    """A call meant for a proven channel (§8.6) has none to go on: the caller sends it signed instead."""


def accept_hello(
    obj: Any, me: bytes, is_trusted: Callable[[bytes], bool], guard: envelope.ReplayGuard, now_ms: int
) -> bytes:
    """The DC that a channel-hello `obj` proves opened this channel to us (`me`): its signer, if an
    active DC, the envelope fresh and not replayed, and addressed to us (§8.6 "Proven channels")."""
    env, hello = envelope.open_body(obj, messages.CHANNEL_HELLO, messages.ChannelHello, now_ms, is_trusted, guard)
    if keys.parse_node_id(hello.to) != me:
        raise SignatureError(f"channel hello is for DC {hello.to}, not this one")
    return env.sender


class Channel:
    """One kept WebSocket to a peer DC carrying many federation calls at once: each call a frame
    with an id, each reply a frame naming it. When the channel ends (the peer died, restarted, or
    missed a heartbeat), every call waiting on it fails at once rather than at its timeout.
    `proven`: the peer accepted our channel-hello, so calls may go without envelopes (§8.6)."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.proven = False
        self.ids = itertools.count(1)
        self.waiting: dict[int, asyncio.Future[tuple[int, Any]]] = {}
        self.reader = asyncio.create_task(self._read())

    @property
    def open(self) -> bool:
        return not self.ws.closed and not self.reader.done()

    async def _read(self) -> None:
        try:
            async for msg in self.ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                reply = messages.decode(messages.ChannelReply, msg.data)
                call = self.waiting.get(reply.id)
                if call is not None and not call.done():
                    call.set_result((reply.status, reply.body))
        except ParseError:
            pass  # a peer that answers garbage: the channel ends, its calls fail
        finally:
            await self.ws.close()
            for call in self.waiting.values():
                if not call.done():
                    call.set_exception(ConnectionResetError("the channel to the peer DC closed"))

    async def call(self, path: str, body: dict, timeout: float) -> tuple[int, Any]:
        """(HTTP status, JSON body) of the call; ConnectionError if the channel ends first,
        TimeoutError after `timeout` s."""
        call_id = next(self.ids)
        self.waiting[call_id] = reply = asyncio.get_running_loop().create_future()
        try:
            await self.ws.send_str(messages.dumps(messages.ChannelCall(call_id, path, body)))
            return await asyncio.wait_for(reply, timeout)
        finally:
            del self.waiting[call_id]

    async def close(self) -> None:
        await self.ws.close()
        await asyncio.gather(self.reader, return_exceptions=True)


class FederationClient:
    def __init__(
        self,
        key: coincurve.PrivateKey,
        is_trusted: Callable[[bytes], bool],
        guard: envelope.ReplayGuard,
        clock: Clock = SYSTEM,
        http: aiohttp.ClientSession | None = None,
        transport: Transport | None = None,
        count: Callable[[str, str], None] = lambda call, outcome: None,
    ) -> None:
        """`count(call, outcome)`: each request, by URL path and ok/refused/unreachable (metrics)."""
        self.count = count
        self.key = key
        self.is_trusted = is_trusted
        self.guard = guard
        self.clock = clock
        self._http = http
        self._own_http = http is None
        self.transport: Transport | None = transport
        self._channels: dict[str, Channel] = {}  # base URL → the kept channel to that peer DC
        self._opening: dict[str, asyncio.Lock] = {}  # one handshake per peer, however many calls wait
        self._no_channel: dict[str, float] = {}  # base URL → when it answered the channel with 404
        self._batches: dict[str, Batch] = {}  # relay URL → this turn's Relay Directions to it, not yet sent
        self._no_batches: dict[str, float] = {}  # relay URL → when it refused a batch (one from before them)
        self._booking = service.BackgroundTasks()  # batches on their way

    async def close(self) -> None:
        await self._booking.cancel()
        for channel in list(self._channels.values()):
            await channel.close()
        if self._http is not None and self._own_http:
            await self._http.close()

    async def _channel(self, base: str, tls: aiohttp.Fingerprint | bool, peer: bytes | None) -> Channel | None:
        """The open channel to the peer DC at `base` (opened if need be), or None if it has none.
        A new channel to DC `peer` over TLS pinned to its chain key is proven first (§8.6)."""
        channel = self._channels.get(base)
        if channel is not None and channel.open:
            return channel
        if self.clock.now() - self._no_channel.get(base, -NO_CHANNEL_RETRY_S) < NO_CHANNEL_RETRY_S:
            return None
        async with self._opening.setdefault(base, asyncio.Lock()):
            channel = self._channels.get(base)
            if channel is not None and channel.open:
                return channel
            try:
                ws = await self.http.ws_connect(
                    base + CHANNEL_PATH, ssl=tls, heartbeat=CHANNEL_HEARTBEAT_S, max_msg_size=CHANNEL_MAX_MSG
                )
            except aiohttp.WSServerHandshakeError as exc:
                if exc.status != 404:
                    raise
                self._no_channel[base] = self.clock.now()
                return None
            channel = Channel(ws)
            if peer is not None and isinstance(tls, aiohttp.Fingerprint):
                # published once the hello is answered: callers meanwhile wait on the lock for the proof
                hello = self.seal(messages.CHANNEL_HELLO, messages.ChannelHello(keys.checksum(peer)))
                try:
                    status, _ = await channel.call(messages.CHANNEL_HELLO_PATH, hello, FEDERATION_TIMEOUT_S)
                except BaseException:
                    await channel.close()
                    raise
                channel.proven = status == 200  # an older DC: 400 (no such call), so signed calls
            self._channels[base] = channel
            return channel

    @property
    def http(self) -> aiohttp.ClientSession:
        if self._http is None:
            # No pool limit: each kept channel holds a connection for good, and aiohttp's default
            # (100) would let a federation of 100 DCs and relays starve every other call.
            self._http = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=FEDERATION_TIMEOUT_S), connector=aiohttp.TCPConnector(limit=0)
            )
        return self._http

    def seal(self, kind: str, body: messages.Message) -> dict:
        """`body` signed by this DC as an envelope of `kind`."""
        return envelope.seal_body(self.key, kind, body, self.clock.wall_ms())

    async def _http_post(
        self,
        url: str,
        body: dict,
        peer: bytes | None,
        pinned: aiohttp.Fingerprint | None,
        timeout: float = FEDERATION_TIMEOUT_S,
        kept: bool = False,
        proven: bool = False,
    ) -> tuple[int, Any]:
        """POST over TLS pinned to `peer`'s chain key (https://; daemon/tlspin.py) or to the
        fingerprint `pinned` (a relay's), or plain http://. A peer DC's call, or with `kept` a
        relay's, goes on the channel to it; a `proven` call only on a proven channel (else Unproven)."""
        parts = urlsplit(url)
        base = f"{parts.scheme}://{parts.netloc}"
        tls = pinned or await tlspin.ssl_for(self.http, base, peer, FEDERATION_TIMEOUT_S)
        try:
            channel = await self._channel(base, tls, peer) if peer is not None or kept else None
            if proven and (channel is None or not channel.proven):
                raise Unproven(base)
            if channel is not None:
                return await channel.call(parts.path, body, timeout)
            async with self.http.post(url, json=body, ssl=tls, timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                return resp.status, await resp.json(content_type=None)
        except aiohttp.ServerFingerprintMismatch:
            if pinned:  # the operator's pin, not a binding to learn again: an impostor (or a new certificate)
                raise tlspin.ChannelError(
                    "relay_unauthenticated", f"{base} presented a certificate that is not its pin"
                ) from None
            tlspin.forget(base)  # a rotated certificate is checked afresh next time
            raise

    async def post(
        self,
        url: str,
        body: dict,
        who: str,
        answer: type[T] = dict,
        peer: bytes | None = None,
        pinned: aiohttp.Fingerprint | None = None,
        timeout: float = FEDERATION_TIMEOUT_S,
        kept: bool = False,
        proven: bool = False,
    ) -> T:
        """POST JSON to a peer (DC or relay); FederationError unless it answers 200 with `answer`
        within `timeout` s. `peer`: its chain address, which an https:// peer's certificate must be
        bound to; `pinned`: the fingerprint its certificate must have instead (a relay's). `kept`:
        on the kept channel to it (always for a DC). `proven`: only on a proven channel to the DC
        `peer`, else Unproven (nothing sent)."""
        call = urlsplit(url).path
        if proven and self.transport:
            raise Unproven(url)  # an in-process federation has no channels
        try:
            status, data = await (
                self.transport(url, body)
                if self.transport
                else self._http_post(url, body, peer, pinned, timeout, kept, proven)
            )
        except tlspin.ChannelError as exc:
            self.count(call, "unreachable")
            raise FederationError(f"{who}: {exc}", exc.code) from None
        except (aiohttp.ClientError, TimeoutError, ValueError, OSError) as exc:
            self.count(call, "unreachable")
            raise FederationError(f"{who} unreachable: {str(exc) or type(exc).__name__}") from None
        self.count(call, "ok" if status == 200 else "refused")
        return answered(who, status, data, answer)

    async def ntm_info(self, endpoint: str, home_dc: bytes, node: bytes) -> messages.NodeInfo:
        """Ask `home_dc` (at HTTP base URL `endpoint`) about `node`; the verified response body."""
        req = self.seal(messages.INFO_REQUEST, messages.InfoRequest(keys.checksum(node), keys.checksum(home_dc)))
        data = await self.post(
            f"{endpoint.rstrip('/')}/v1/federation/ntm-info",
            req,
            f"home DC {keys.checksum(home_dc)} at {endpoint}",
            peer=home_dc,
        )
        env, info = envelope.open_body(
            data, messages.INFO_RESPONSE, messages.NodeInfo, self.clock.wall_ms(), self.is_trusted, self.guard
        )
        if env.sender != home_dc or keys.parse_node_id(info.node) != node:
            raise FederationError("NTM information response is from the wrong DC or about another node")
        return info

    async def direction_offer(self, endpoint: str, offer: messages.DirectionOffer) -> messages.DirectionAnswer:
        """Send a Direction Offer to the peer's home DC `offer.to` (at `endpoint`): it decides the
        route, books the relay and pushes its node's direction; its verified answer (§8.5)."""
        home_dc, peer = keys.parse_node_id(offer.to), keys.parse_node_id(offer.peer)
        base, who = endpoint.rstrip("/"), f"home DC {keys.checksum(home_dc)} at {endpoint}"
        try:  # bare on a proven channel: TLS pinned to home_dc's key stands for its signature
            answer = await self.post(
                base + messages.PROVEN_OFFER_PATH,
                messages.encode(offer),
                who,
                messages.DirectionAnswer,
                peer=home_dc,
                timeout=OFFER_TIMEOUT_S,
                proven=True,
            )
        except Unproven:
            data = await self.post(
                f"{base}/v1/federation/direction-offer",
                self.seal(messages.DIRECTION_OFFER, offer),
                who,
                peer=home_dc,
                timeout=OFFER_TIMEOUT_S,
            )
            env, answer = envelope.open_body(
                data,
                messages.DIRECTION_ANSWER,
                messages.DirectionAnswer,
                self.clock.wall_ms(),
                self.is_trusted,
                self.guard,
            )
            if env.sender != home_dc:
                raise FederationError("direction answer is from the wrong DC")
        if keys.parse_node_id(answer.peer.node) != peer or answer.path != offer.path:
            raise FederationError("direction answer is about another node or path")
        if answer.peer.pubkey is None or keys.node_id(bytes.fromhex(answer.peer.pubkey)) != peer:
            raise FederationError("the home DC returned a public key that is not the node's", "bad_pubkey")
        return answer

    async def deliver_direction(self, endpoint: str, home_dc: bytes, direction: messages.SignedEnvelope) -> None:
        """Hand a signed Route Direction to the node's home DC, which pushes it on its session."""
        await self.post(
            f"{endpoint.rstrip('/')}/v1/federation/route-direction",
            messages.encode(direction),
            f"home DC {keys.checksum(home_dc)}",
            peer=home_dc,
        )

    async def book_relay(self, url: str, direction: messages.RelayDirection) -> messages.RelayBooking:
        """Book a path at the RS at `url` (its control API and pin, as --relay names it). Idempotent
        for the same path and token; FederationError (with the RS's code and status;
        `relay_unauthenticated`: it presented another certificate) if refused. The bookings for
        one relay made in one event-loop turn (a burst of Direction Offers) leave together at the
        turn's end, as one batch (§8.2 "Batches"); one alone is a plain Relay Direction."""
        batch = self._batches.get(url)
        if batch is None or len(batch) >= messages.RELAY_BATCH_MAX:
            batch = self._batches[url] = []
            asyncio.get_running_loop().call_soon(self._send_batch, url, batch)
        booked = asyncio.get_running_loop().create_future()
        batch.append((direction, booked))
        return await booked

    def _send_batch(self, url: str, batch: Batch) -> None:
        if self._batches.get(url) is batch:
            del self._batches[url]
        self._booking.spawn(self._book_all(url, batch))

    async def _book_all(self, url: str, batch: Batch) -> None:
        """Book `batch` at `url` and answer each of its waiters (a booking cancelled meanwhile is
        booked anyway: the relay releases a path nobody binds)."""
        outcomes: list[messages.RelayBooking | BaseException] = []
        try:
            outcomes = await self._book_many(url, [d for d, _ in batch])
        except FederationError as exc:
            outcomes = [FederationError(str(exc), exc.code, exc.status) for _ in batch]
        finally:
            for i, (_, booked) in enumerate(batch):
                outcome = outcomes[i] if i < len(outcomes) else FederationError(f"relay {url}: booking abandoned")
                if booked.done():
                    continue
                if isinstance(outcome, BaseException):
                    booked.set_exception(outcome)
                else:
                    booked.set_result(outcome)

    async def _book_many(
        self, url: str, directions: list[messages.RelayDirection]
    ) -> list[messages.RelayBooking | BaseException]:
        """Each direction's booking or refusal: one Relay Direction, or one batch of them (each
        alone to a relay that refused a batch within NO_CHANNEL_RETRY_S: one from before them)."""
        if (
            len(directions) == 1
            or self.clock.now() - self._no_batches.get(url, -NO_CHANNEL_RETRY_S) < NO_CHANNEL_RETRY_S
        ):
            return await asyncio.gather(*(self._book_one(url, d) for d in directions), return_exceptions=True)
        body = self.seal(messages.RELAY_DIRECTIONS, messages.RelayDirections(directions))
        try:
            answer = await self._to_relay(url, messages.RELAY_BATCH_PATH, body, messages.RelayOutcomes, True)
        except FederationError as exc:
            if exc.status not in (400, 404, 405):  # not a relay that knows no batches (400 on its channel)
                raise
            self._no_batches[url] = self.clock.now()
            return await self._book_many(url, directions)
        if len(answer.outcomes) != len(directions):
            raise FederationError(f"relay {url} answered {len(directions)} directions with {len(answer.outcomes)}")
        who = f"relay {tlspin.relay_target(url).base}"
        outcomes: list[messages.RelayBooking | BaseException] = []
        for outcome in answer.outcomes:
            try:
                outcomes.append(answered(who, outcome.status, outcome.body, messages.RelayBooking))
            except FederationError as exc:
                outcomes.append(exc)
        return outcomes

    async def _book_one(self, url: str, direction: messages.RelayDirection) -> messages.RelayBooking:
        """One signed Relay Direction to the RS at `url`."""
        return await self._to_relay(
            url, "/v1/relay-directions", self.seal(messages.RELAY_DIRECTION, direction), messages.RelayBooking, True
        )

    async def book_exit(self, url: str, booking: messages.ExitBooking) -> messages.ExitGrant:
        """Send a signed Exit Booking to the RS at `url` (§10.13); FederationError (with the RS's
        code and status) if refused."""
        return await self._to_relay(
            url, "/v1/exit-bookings", self.seal(messages.EXIT_BOOKING, booking), messages.ExitGrant
        )

    async def _to_relay(self, url: str, path: str, body: dict, reply: type[T], kept: bool = False) -> T:
        """POST to the relay's control API at `url`, holding it to the pin --relay names (`kept`:
        on the channel to it: a booking per direction)."""
        try:
            target = tlspin.relay_target(url)
            tls = target.ssl()
        except ValueError as exc:  # its certificate file went missing since the start
            raise FederationError(f"relay {url}: {exc}", "relay_unauthenticated") from None
        return await self.post(
            f"{target.base}{path}",
            body,
            f"relay {target.base}",
            reply,
            pinned=tls if isinstance(tls, aiohttp.Fingerprint) else None,
            kept=kept,
        )
