"""DC-to-DC and DC-to-RS requests, each a DC-signed envelope (ntm/envelope.py) over HTTP.

An NTM Information Request asks a node's home DC for its key and addresses; a Direction Offer asks
it to direct its node in one call (a Direction Request's lookup, route and push); a Route Direction
is handed to a node's home DC for delivery; a Relay Direction books a relayed path at an RS. Each
receiver accepts only envelopes from DCs active in its registry, so an unknown or removed DC
learns nothing. Message bodies: ntm/messages.py; spec: docs/PROTOCOL.md §4, §8.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable, TypeVar
from urllib.parse import urlsplit

import aiohttp
import coincurve

from daemon import tlspin
from ntm import envelope, keys, messages
from ntm.clock import SYSTEM, Clock
from ntm.errors import NtmError, ParseError

# A peer DC on loopback or a LAN answers in milliseconds; 3 s marks it as down without stalling a
# node's request for long. A relay answers from memory after at most one chain call.
FEDERATION_TIMEOUT_S = 3.0
# A Direction Offer is answered only after the peer's home DC booked a relay (a dead relay costs it
# FEDERATION_TIMEOUT_S) and its node acknowledged (signaling.DIRECTION_ACK_TIMEOUT_S, 2 s): room
# for both and a loaded host, inside the node's own 8 s wait for its Direction Request.
OFFER_TIMEOUT_S = 6.0

T = TypeVar("T")
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

    async def close(self) -> None:
        if self._http is not None and self._own_http:
            await self._http.close()

    @property
    def http(self) -> aiohttp.ClientSession:
        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=FEDERATION_TIMEOUT_S))
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
    ) -> tuple[int, Any]:
        """POST over TLS pinned to `peer`'s chain key (https://; daemon/tlspin.py) or to the
        fingerprint `pinned` (a relay's), or plain http://."""
        parts = urlsplit(url)
        base = f"{parts.scheme}://{parts.netloc}"
        tls = pinned or await tlspin.ssl_for(self.http, base, peer, FEDERATION_TIMEOUT_S)
        try:
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
    ) -> T:
        """POST JSON to a peer (DC or relay); FederationError unless it answers 200 with `answer`
        within `timeout` s. `peer`: its chain address, which an https:// peer's certificate must be
        bound to; `pinned`: the fingerprint its certificate must have instead (a relay's)."""
        call = urlsplit(url).path
        try:
            status, data = await (
                self.transport(url, body) if self.transport else self._http_post(url, body, peer, pinned, timeout)
            )
        except tlspin.ChannelError as exc:
            self.count(call, "unreachable")
            raise FederationError(f"{who}: {exc}", exc.code) from None
        except (aiohttp.ClientError, TimeoutError, ValueError, OSError) as exc:
            self.count(call, "unreachable")
            raise FederationError(f"{who} unreachable: {str(exc) or type(exc).__name__}") from None
        self.count(call, "ok" if status == 200 else "refused")
        try:
            if status != 200:
                err = messages.decode(messages.ErrorBody, data)
                raise FederationError(f"{who} refused: {err.message or err.error}", err.error, status)
            return messages.decode(answer, data)
        except ParseError as exc:
            raise FederationError(f"{who} answered {status}: {exc}", None, status) from None

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
        data = await self.post(
            f"{endpoint.rstrip('/')}/v1/federation/direction-offer",
            self.seal(messages.DIRECTION_OFFER, offer),
            f"home DC {keys.checksum(home_dc)} at {endpoint}",
            peer=home_dc,
            timeout=OFFER_TIMEOUT_S,
        )
        env, answer = envelope.open_body(
            data, messages.DIRECTION_ANSWER, messages.DirectionAnswer, self.clock.wall_ms(), self.is_trusted, self.guard
        )
        if env.sender != home_dc or keys.parse_node_id(answer.peer.node) != peer or answer.path != offer.path:
            raise FederationError("direction answer is from the wrong DC or about another node or path")
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
        """Send a signed Relay Direction to the RS at `url` (its control API and pin, as --relay
        names it). Idempotent for the same path and token; FederationError (with the RS's code and
        status; `relay_unauthenticated`: it presented another certificate) if refused."""
        return await self._to_relay(
            url, "/v1/relay-directions", self.seal(messages.RELAY_DIRECTION, direction), messages.RelayBooking
        )

    async def book_exit(self, url: str, booking: messages.ExitBooking) -> messages.ExitGrant:
        """Send a signed Exit Booking to the RS at `url` (§10.13); FederationError (with the RS's
        code and status) if refused."""
        return await self._to_relay(
            url, "/v1/exit-bookings", self.seal(messages.EXIT_BOOKING, booking), messages.ExitGrant
        )

    async def _to_relay(self, url: str, path: str, body: dict, reply: type[T]) -> T:
        """POST to the relay's control API at `url`, holding it to the pin --relay names."""
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
        )
