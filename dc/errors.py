"""The DC's refusals: each carries a stable `code` that the HTTP/WS adapters put in the answer, and
its HTTP status (ntm/errors.py)."""

from __future__ import annotations

from ntm.errors import CodedError


class NodeLookupError(CodedError):
    """A node the registry does not know, or that cannot be reached: unknown_node, home_dc_inactive,
    home_dc_unreachable, bad_pubkey, wrong_dc; catching_up (retryable: the DC has not read the
    whole registry yet)."""

    STATUS = {"unknown_node": 404, "wrong_dc": 409, "too_many_notices": 429, "catching_up": 503}
    DEFAULT_STATUS = 502


class DirectionError(CodedError):
    """A Direction Request that cannot be served: the lookup codes, plus revoked, offline, self,
    not_home, no_relay, and the peer's answer: not_allowed, peer_busy, peer_unresponsive.

    `abandoned` (the old two-message form only, §8.1): the path ID already pushed to the requester
    when the request failed after that; its node stops following it."""

    STATUS = {
        "rate_limited": 429,
        "peer_busy": 429,
        "not_allowed": 403,
        "dc_busy": 503,
        "catching_up": 503,
        "peer_unresponsive": 504,
    }
    DEFAULT_STATUS = 404
    abandoned: bytes | None = None


class SourceLimited(CodedError):
    """An unauthenticated request beyond its source's limit (code rate_limited): refused with 429
    before any work (whois, session WebSockets; registrations have their own RegistrationError)."""

    DEFAULT_STATUS = 429
