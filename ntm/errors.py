"""The project's own exception types: every bad input ends in one of these, never a stray KeyError.

Each also says how it refuses a request: `refusal()` gives the HTTP status and the stable code of
the JSON error body (and of the WebSocket error form, which carries the same code). The status is
the class's (`STATUS`, `DEFAULT_STATUS`): the one place it is decided, for the DC, the CS and the RS
(daemon/httpapp.py puts it on the wire)."""

from __future__ import annotations

from typing import ClassVar, Mapping


class NtmError(Exception):
    """Base of every error this project raises on purpose. One that reaches a server's edge
    without a more specific class is 503 `unavailable` (e.g. the chain is unreachable)."""

    CODE: ClassVar[str] = "unavailable"
    STATUS: ClassVar[Mapping[str, int]] = {}  # code -> HTTP status, for classes with several codes
    DEFAULT_STATUS: ClassVar[int] = 503

    def refusal(self) -> tuple[int, str]:
        """(HTTP status, error code) of the answer refusing a request for this error."""
        return self.DEFAULT_STATUS, self.CODE


class ParseError(NtmError):
    """Bytes or JSON that do not form a valid message."""

    CODE = "malformed"
    DEFAULT_STATUS = 400


class SignatureError(NtmError):
    """A signature that is malformed, malleable (high s) or made by another key (or an envelope
    that is stale or replayed)."""

    CODE = "forbidden"
    DEFAULT_STATUS = 403


class KeystoreError(NtmError):
    """A keystore that cannot be read or a passphrase that does not open it."""


class CodedError(NtmError):
    """A refusal with a stable machine-readable `code` (what goes into a JSON error body); its
    status is `STATUS[code]`, else the class's DEFAULT_STATUS."""

    DEFAULT_STATUS = 400

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code

    def refusal(self) -> tuple[int, str]:
        return self.STATUS.get(self.code, self.DEFAULT_STATUS), self.code
