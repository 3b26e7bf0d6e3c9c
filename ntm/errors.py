"""The project's own exception types: every bad input ends in one of these, never a stray KeyError."""


class NtmError(Exception):
    """Base of every error this project raises on purpose."""


class ParseError(NtmError):
    """Bytes or JSON that do not form a valid message."""


class SignatureError(NtmError):
    """A signature that is malformed, malleable (high s) or made by another key."""


class KeystoreError(NtmError):
    """A keystore that cannot be read or a passphrase that does not open it."""


class CodedError(NtmError):
    """A refusal with a stable machine-readable `code` (what goes into a JSON error body)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
