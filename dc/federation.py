"""DC-to-DC requests: an NTM Information Request asks a node's home DC for its key and addresses.

Both directions are envelopes signed by the DCs' chain keys (ntm/envelope.py); each side accepts
only envelopes from DCs active in its registry cache, so an unknown or removed DC learns nothing.
"""

from __future__ import annotations

import time

import aiohttp
import coincurve

from ntm import envelope, keys
from ntm.errors import NtmError

INFO_REQUEST = "ntm-info-request"
INFO_RESPONSE = "ntm-info-response"
# A peer DC on loopback or a LAN answers in milliseconds; 3 s marks it as down without stalling a
# node's request for long.
FEDERATION_TIMEOUT_S = 3.0


class FederationError(NtmError):
    """A peer DC could not be reached or gave an answer that does not verify; `code` is the
    peer's error code when it answered with one."""

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


def now_ms() -> int:
    return int(time.time() * 1000)


class FederationClient:
    def __init__(self, key: coincurve.PrivateKey, is_trusted, guard: envelope.ReplayGuard) -> None:
        self.key = key
        self.is_trusted = is_trusted
        self.guard = guard
        self._http: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()

    @property
    def http(self) -> aiohttp.ClientSession:
        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=FEDERATION_TIMEOUT_S))
        return self._http

    async def post(self, url: str, body: dict, who: str) -> dict:
        """POST JSON to a peer (DC or relay); FederationError unless it answers 200 with JSON."""
        try:
            async with self.http.post(url, json=body) as resp:
                data = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise FederationError(f"{who} unreachable: {exc or type(exc).__name__}") from None
        if resp.status != 200:
            msg = data.get("message", resp.status) if isinstance(data, dict) else resp.status
            raise FederationError(f"{who} refused: {msg}", data.get("error") if isinstance(data, dict) else None)
        return data

    async def ntm_info(self, endpoint: str, home_dc: bytes, node: bytes) -> dict:
        """Ask `home_dc` (at HTTP base URL `endpoint`) about `node`; the verified response body."""
        req = envelope.seal(self.key, INFO_REQUEST, {"node": keys.checksum(node), "to": keys.checksum(home_dc)}, now_ms())
        data = await self.post(f"{endpoint.rstrip('/')}/v1/federation/ntm-info", req,
                               f"home DC {keys.checksum(home_dc)} at {endpoint}")
        env = envelope.open_envelope(data, INFO_RESPONSE, now_ms(), self.is_trusted, self.guard)
        if env.sender != home_dc or env.body.get("node") != keys.checksum(node):
            raise FederationError("NTM information response is from the wrong DC or about another node")
        return env.body
