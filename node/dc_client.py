"""The node's HTTP client for its DC: info, Registration Request, whois, and the session socket."""

from __future__ import annotations

import asyncio
from typing import TypeVar
from urllib.parse import urlsplit

import aiohttp
import coincurve

from daemon import tlspin
from node import state
from ntm import envelope, keys, messages, session_auth
from ntm.errors import CodedError, ParseError
from ntm.registration import RegistrationRequest

DEFAULT_DC_PORT = 8330
REQUEST_TIMEOUT_S = state.DC_TIMEOUT_S
# A registration that waits for the chain: the DC waits up to 15 s for its block; allow more.
REGISTER_WAIT_S = 30.0

T = TypeVar("T")


class DcError(CodedError):
    """The DC refused a request (`code` from its JSON error) or could not be reached."""


def dc_url(spec: str) -> str:
    """`host`, `host:port` or a full URL → base URL of the DC's HTTP API."""
    if "://" not in spec:
        spec = "https://" + spec  # plain http:// only when asked for by name (development, §5)
    parts = urlsplit(spec)
    if not parts.hostname:
        raise ValueError(f"{spec!r} is not a DC address")
    port = parts.port or DEFAULT_DC_PORT
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{parts.scheme}://{host}:{port}"


class DcClient:
    def __init__(self, base_url: str, timeout: float = REQUEST_TIMEOUT_S, pin: bytes | None = None) -> None:
        """`pin`: the DC's on-chain address. With an https:// URL the client first checks that the
        certificate the DC presents is bound to that key (ntm/tls_binding.py), then pins it for
        every request and the session; DcError `dc_unauthenticated` otherwise."""
        self.base = base_url.rstrip("/")
        self.timeout = timeout
        self.pin = pin
        self._tls: aiohttp.Fingerprint | bool = True  # the pinned certificate, once checked
        self._checking = asyncio.Lock()  # concurrent first requests check the binding once
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout))
        self.session_dc: bytes | None = None  # the DC address its session challenge named (signed by us)

    async def __aenter__(self) -> "DcClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.close()

    async def _authenticate(self) -> None:
        """Check the DC's TLS binding once (an https:// DC): its certificate must be the one its
        chain key (`pin`) vouches for; from then on only that certificate is accepted."""
        async with self._checking:
            if self._tls is not True:
                return
            try:
                self._tls = await tlspin.ssl_for(self._http, self.base, self.pin, self.timeout)
            except tlspin.ChannelError as exc:
                raise DcError(exc.code, str(exc)) from None

    def _not_pinned(self) -> DcError:
        tlspin.forget(self.base)  # a rotated certificate is checked afresh next time
        self._tls = True
        return DcError("dc_unauthenticated", f"{self.base} presented another certificate than the pinned one")

    async def _call(
        self, method: str, path: str, answer: type[T], body: dict | None = None, timeout: float | None = None
    ) -> T:
        timeout = timeout or self.timeout
        await self._authenticate()
        try:
            try:
                resp, text = await self._request(method, path, body, timeout)
            except aiohttp.ServerFingerprintMismatch:
                # The DC rotated its certificate since it was pinned (here or by another client of
                # this process): check the new one's binding once, then retry; a second mismatch is
                # an impostor or a DC flapping between certificates.
                self._not_pinned()
                await self._authenticate()
                resp, text = await self._request(method, path, body, timeout)
        except aiohttp.ServerFingerprintMismatch:
            raise self._not_pinned() from None
        except TimeoutError:
            raise DcError("unreachable", f"DC at {self.base} did not answer within {timeout:g} s") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise DcError("unreachable", f"cannot reach DC at {self.base}: {str(exc) or type(exc).__name__}") from None
        try:
            if resp.status != 200:
                err = messages.decode(messages.ErrorBody, text)
                raise DcError(err.error, err.message or text)
            return messages.decode(answer, text)
        except ParseError as exc:
            raise DcError("bad_response", f"DC at {self.base} answered {resp.status}: {exc}") from None

    async def _request(
        self, method: str, path: str, body: dict | None, timeout: float
    ) -> tuple[aiohttp.ClientResponse, str]:
        async with self._http.request(
            method, self.base + path, json=body, ssl=self._tls, timeout=aiohttp.ClientTimeout(total=timeout)
        ) as resp:
            return resp, await resp.text()

    async def info(self) -> messages.DcInfoReply:
        return await self._call("GET", "/v1/info", messages.DcInfoReply)

    async def register(self, req: RegistrationRequest, wait_confirmed: bool = True) -> messages.RegisterResult:
        return await self._call(
            "POST",
            "/v1/register",
            messages.RegisterResult,
            messages.encode(req.body(wait_confirmed)),
            max(self.timeout, REGISTER_WAIT_S) if wait_confirmed else None,
        )

    async def dcs(self) -> list[messages.DcEntry]:
        """The active DCs on chain, for failover."""
        return (await self._call("GET", "/v1/dcs", messages.DcList)).dcs

    async def whois(self, node: bytes) -> messages.NodeInfo:
        return await self._call("GET", f"/v1/nodes/{keys.checksum(node)}", messages.NodeInfo)

    async def book_exit(self, key: coincurve.PrivateKey, now_ms: int) -> messages.ExitGrant:
        """Ask the DC for an exit at a relay (§10.13), signed with the node's key at `now_ms`: the
        relay's grant."""
        body = envelope.seal_body(key, messages.EXIT_REQUEST, messages.ExitRequest(), now_ms)
        return await self._call("POST", "/v1/exit-bookings", messages.ExitGrant, body)

    async def open_session(
        self,
        key: coincurve.PrivateKey,
        local_addrs: list[str] | None = None,
        heartbeat: float | None = None,
        routes: messages.RouteOffer | None = None,
    ) -> tuple[aiohttp.ClientWebSocketResponse, messages.Welcome]:
        """Authenticated session WebSocket and the DC's welcome (keepalive token and ports).
        `local_addrs`: the tunnel socket's addresses, announced with the answer. `heartbeat`: ping
        the DC after this long without a frame from it; no pong within half of it closes the
        WebSocket (its exception is then aiohttp.ServerTimeoutError). `routes`: this node's signed
        route offer, which the DC shows peers in its node info (§10.10)."""
        await self._authenticate()
        try:
            ws = await self._http.ws_connect(self.base + "/v1/session", heartbeat=heartbeat, ssl=self._tls)
        except aiohttp.ServerFingerprintMismatch:
            raise self._not_pinned() from None
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise DcError("unreachable", f"cannot open a session at {self.base}: {exc}") from None
        try:
            hello = messages.decode(messages.Challenge, await ws.receive_str())
            dc, challenge = keys.parse_node_id(hello.dc), bytes.fromhex(hello.challenge)
            auth = messages.Auth(
                keys.checksum(keys.node_id_of(key)),
                session_auth.answer(key, dc, challenge).hex(),
                list(local_addrs or []),
                routes,
            )
            await ws.send_json(messages.encode(auth))
            welcome = messages.decode(messages.DcToNode, await ws.receive_str())
        except (ParseError, TypeError, aiohttp.ClientError) as exc:
            await ws.close()
            raise DcError("bad_response", f"session at {self.base} failed: {exc}") from None
        if not isinstance(welcome, messages.Welcome):
            await ws.close()
            err = welcome if isinstance(welcome, messages.SessionError) else messages.SessionError("refused")
            raise DcError(err.error, err.message or "session refused")
        self.session_dc = dc
        return ws, welcome
