"""What a DC calls to open a relayed path at a Relay Server (docs/PROTOCOL.md §8.2)."""

from __future__ import annotations

import time

import aiohttp
import coincurve

from ntm import envelope, keys
from ntm.errors import NtmError

KIND = "relay-direction"
# A relay answers from memory after at most one chain call; 10 s means the relay is unwell.
REQUEST_TIMEOUT_S = 10.0


class RelayDirectionError(NtmError):
    """The relay refused or could not be reached. `status` is the HTTP status (0 if no answer),
    `code` the relay's error code ("untrusted_dc", "replayed", "conflict", "full", "malformed",
    "forbidden", "chain_unavailable", "unreachable", ...)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"relay refused the direction ({status} {code}): {message}")
        self.status, self.code = status, code


def direction_body(path_id: bytes, token: bytes, nodes, expires_ms: int, max_bytes: int) -> dict:
    if len(path_id) != 8 or len(token) != 32 or len(nodes) != 2:
        raise ValueError("relay direction needs an 8-byte path ID, a 32-byte token and two node IDs")
    ids = [keys.checksum(n if isinstance(n, bytes) else keys.parse_node_id(n)) for n in nodes]
    return {"path": path_id.hex(), "token": token.hex(), "nodes": ids,
            "expires_ms": int(expires_ms), "max_bytes": int(max_bytes)}


async def send_relay_direction(http_session: aiohttp.ClientSession, rs_url: str, dc_key: coincurve.PrivateKey,
                               path_id: bytes, token: bytes, nodes, expires_ms: int, max_bytes: int,
                               now_ms: int | None = None) -> dict:
    """Sign a Relay Direction with the DC's chain key and POST it to `rs_url` (e.g.
    "http://relay:8340"). Returns the relay's answer {"path", "relay": ["ip:port", ...],
    "created", "expires_ms", "max_bytes"} (expires_ms/max_bytes as the relay granted them, which
    may be less than asked). Raises RelayDirectionError on any refusal or transport failure.
    Sending the same path and token again is idempotent (and extends the path if asked for more).
    """
    now_ms = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    env = envelope.seal(dc_key, KIND, direction_body(path_id, token, nodes, expires_ms, max_bytes), now_ms)
    url = rs_url.rstrip("/") + "/v1/relay-directions"
    try:
        async with http_session.post(url, json=env, timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)) as resp:
            try:
                answer = await resp.json(content_type=None)
            except ValueError:
                answer = {"error": "bad_answer", "message": (await resp.text())[:200]}
            if not isinstance(answer, dict):
                answer = {"error": "bad_answer", "message": f"answer is not a JSON object: {answer!r:.200}"}
            if resp.status != 200:
                raise RelayDirectionError(resp.status, str(answer.get("error", "error")), str(answer.get("message", "")))
            return answer
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise RelayDirectionError(0, "unreachable", f"{url}: {exc or type(exc).__name__}") from None
