"""The node's HTTP client for its DC: info, Registration Request, whois, and the session socket."""

from __future__ import annotations

import json
from urllib.parse import urlsplit

import aiohttp
import coincurve

from ntm import keys, session_auth
from ntm.errors import NtmError
from ntm.registration import RegistrationRequest

DEFAULT_DC_PORT = 8330
# Registration waits for chain confirmation on the DC side (up to 15 s there); allow a bit more.
REQUEST_TIMEOUT_S = 20.0


class DcError(NtmError):
    """The DC refused a request (`code` from its JSON error) or could not be reached."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def dc_url(spec: str) -> str:
    """`host`, `host:port` or a full URL → base URL of the DC's HTTP API."""
    if "://" not in spec:
        spec = "http://" + spec
    parts = urlsplit(spec)
    if not parts.hostname:
        raise ValueError(f"{spec!r} is not a DC address")
    port = parts.port or DEFAULT_DC_PORT
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{parts.scheme}://{host}:{port}"


class DcClient:
    def __init__(self, base_url: str) -> None:
        self.base = base_url.rstrip("/")
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S))

    async def __aenter__(self) -> "DcClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.close()

    async def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        try:
            async with self._http.request(method, self.base + path, json=body) as resp:
                text = await resp.text()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise DcError("unreachable", f"cannot reach DC at {self.base}: {exc or type(exc).__name__}") from None
        try:
            data = json.loads(text)
        except ValueError:
            raise DcError("bad_response", f"DC at {self.base} answered {resp.status} with non-JSON") from None
        if resp.status != 200:
            raise DcError(data.get("error", str(resp.status)), data.get("message", text))
        return data

    async def info(self) -> dict:
        return await self._call("GET", "/v1/info")

    async def register(self, req: RegistrationRequest, wait_confirmed: bool = True) -> dict:
        body = req.to_json()
        if wait_confirmed:
            body["wait"] = "confirmed"
        return await self._call("POST", "/v1/register", body)

    async def dcs(self) -> list[dict]:
        """The active DCs on chain ({dc, hostname, endpoint}), for failover."""
        return (await self._call("GET", "/v1/dcs"))["dcs"]

    async def whois(self, node: bytes) -> dict:
        return await self._call("GET", f"/v1/nodes/{keys.checksum(node)}")

    async def open_session(self, key: coincurve.PrivateKey, extra: dict | None = None
                           ) -> tuple[aiohttp.ClientWebSocketResponse, dict]:
        """Authenticated session WebSocket and the DC's welcome (keepalive token and ports).
        `extra` goes with the auth message (e.g. the tunnel socket's local addresses)."""
        try:
            ws = await self._http.ws_connect(self.base + "/v1/session")
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise DcError("unreachable", f"cannot open a session at {self.base}: {exc}") from None
        hello = await ws.receive_json()
        dc, challenge = keys.parse_node_id(hello["dc"]), bytes.fromhex(hello["challenge"])
        await ws.send_json({"type": "auth", "node": keys.checksum(keys.node_id_of(key)),
                            "signature": session_auth.answer(key, dc, challenge).hex(), **(extra or {})})
        welcome = await ws.receive_json()
        if welcome.get("type") != "welcome":
            await ws.close()
            raise DcError(welcome.get("error", "refused"), welcome.get("message", "session refused"))
        return ws, welcome
