"""The Cache Server's refusals (pure: imported by its core and its edges alike)."""

from __future__ import annotations

from ntm.errors import CodedError


class CsError(CodedError):
    """A refusal by the Cache Server, with its HTTP status (ntm/errors.py)."""

    STATUS = {
        "unregistered": 403,
        "revoked": 403,
        "not_sender": 403,
        "too_large": 413,
        "over_quota": 429,
        "exists": 409,
        "incomplete": 400,
        "not_found": 404,
        "bad_recipient": 400,
        "dc_unreachable": 503,
        "busy": 409,
        "cs_full": 507,
        "stalled": 408,
    }
