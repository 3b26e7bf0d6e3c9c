"""TLS bound to a chain key, the I/O half (the pure half is ntm/tls_binding.py; spec: docs/PROTOCOL.md
§5 "Channel authenticated to the chain").

Server side: `ensure_certificate` makes a DC's self-signed certificate once (no CA: the DC's
chain key vouches for it in /v1/info), `server_context` loads it. Client side: `pin` learns,
once per URL and expected chain address, the certificate a server presents, checks its binding,
and hands back an aiohttp fingerprint that every later request and WebSocket must match.

A relay has no chain key: it makes its certificate the same way and its operator hands the DCs
its pin (`pin_of`, `ntm-rs --print-pin`) in the relay's URL, `https://host:port#sha256=<hex>`
(`relay_target`; §5 "The relay's control channel").
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import datetime
import functools
import hashlib
import logging
import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from daemon.startup import INSECURE_FLAG
from ntm import keys, messages, tls_binding
from ntm.clock import Clock
from ntm.errors import CodedError, ParseError, SignatureError

log = logging.getLogger("ntm.tls")

# The certificate's own validity is not what makes it trusted (the binding is), so it is long:
# rotating means deleting the files; clients re-check the binding when the pin fails.
CERT_VALID_DAYS = 3650
# A relay's pin, after `#` in its URL: the SHA-256 of its certificate (DER), what aiohttp's
# Fingerprint checks. The whole certificate, not its key: rotating it is deleting the files.
PIN_HASH = "sha256"


class ChannelError(CodedError):
    """`unreachable`, or `dc_unauthenticated`: the server is not the chain key we expected."""


def self_signed(name: str, clock: Clock) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A fresh P-256 key and a certificate for it named `name`, signed by itself, valid from a day
    ago (a peer's clock may be behind) for CERT_VALID_DAYS: trust comes from a pin, not from it."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = clock.utc()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=CERT_VALID_DAYS))
        .sign(key, hashes.SHA256())
    )
    return cert, key


def ensure_certificate(cert: Path, key_path: Path, name: str, clock: Clock) -> tuple[Path, Path]:
    """The certificate and key at these paths, made (P-256, self-signed, key file 0600) if absent."""
    if cert.exists() and key_path.exists():
        return cert, key_path
    der, key = self_signed(name, clock)
    cert.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    cert.write_bytes(der.public_bytes(serialization.Encoding.PEM))
    log.info("made a TLS certificate in %s", cert)
    return cert, key_path


def server_context(cert: Path, key: Path) -> tuple[ssl.SSLContext, bytes]:
    """The server TLS context and the DER of the leaf certificate it presents (what the binding signs)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    return ctx, leaf_der(cert)


def leaf_der(cert: Path) -> bytes:
    """The DER of the first (leaf) certificate of a PEM file; ValueError if it holds none."""
    pem = cert.read_text()
    end = "-----END CERTIFICATE-----"
    if end not in pem:
        raise ValueError(f"{cert} holds no PEM certificate")
    return ssl.PEM_cert_to_DER_cert(pem[: pem.index(end) + len(end)])


def pin_of(der: bytes) -> str:
    """A relay certificate's pin as operators write it after `#` in a relay URL: sha256=<hex>."""
    return f"{PIN_HASH}={hashlib.sha256(der).hexdigest()}"


@dataclass(frozen=True)
class RelayTarget:
    """A relay's control API as a DC names it: `base` (scheme://host:port) and what its TLS
    certificate must hash to (`sha256`), or the file holding that certificate (`cert`, e.g. the
    relay's own on a shared volume); neither for plain http:// (development only)."""

    base: str
    sha256: bytes | None = None
    cert: Path | None = None

    @property
    def plain(self) -> bool:
        return self.sha256 is None and self.cert is None

    def ssl(self) -> aiohttp.Fingerprint | bool:
        """aiohttp's `ssl=`: the pinned fingerprint, or True for plain http:// (no TLS at all).
        ValueError if the certificate file named is unreadable or holds no certificate."""
        if self.cert is not None:
            try:
                return fingerprint(hashlib.sha256(leaf_der(self.cert)).digest())
            except OSError as exc:
                raise ValueError(f"cannot read the relay certificate {self.cert}: {exc.strerror or exc}") from None
        return True if self.plain else fingerprint(self.sha256)


# Relay pins a process holds at once (each --relay's, and a rotated one or two): a bound, not a tuning.
FINGERPRINTS_KEPT = 64


@functools.lru_cache(maxsize=FINGERPRINTS_KEPT)
def fingerprint(sha256: bytes) -> aiohttp.Fingerprint:
    """One aiohttp Fingerprint object per pin: aiohttp pools connections by the `ssl=` object
    itself (Fingerprint has no equality), so a fresh one per request opened a new TLS connection
    to the relay for every booking (a handshake on both sides, per direction)."""
    return aiohttp.Fingerprint(sha256)


def relay_target(url: str) -> RelayTarget:
    """Parse a relay URL: `https://host:port#sha256=<64 hex>` (the pin `ntm-rs --print-pin` shows)
    or `https://host:port#cert=<PEM file>`, or `http://host:port` (plain: development only).
    ValueError, saying what is expected, for anything else (reads no file)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"relay {url!r}: expected https://HOST:PORT#{PIN_HASH}=PIN")
    base = f"{parts.scheme}://{parts.netloc}"
    name, _, value = parts.fragment.partition("=")
    if parts.scheme == "http":
        if parts.fragment:
            raise ValueError(f"relay {url!r}: a pin needs https://")
        return RelayTarget(base)
    if name == PIN_HASH and len(value) == 64 and all(c in "0123456789abcdefABCDEF" for c in value):
        return RelayTarget(base, sha256=bytes.fromhex(value))
    if name == "cert" and value:
        return RelayTarget(base, cert=Path(value))
    raise ValueError(
        f"relay {url!r}: expected its pin after '#', {PIN_HASH}=<64 hex digits> (`ntm-rs --print-pin` "
        "on the relay's machine) or cert=<its certificate file>"
    )


# The ciphertext read buffer of each TLS connection a server holds. asyncio's own is 256 KiB per
# connection, allocated up front: 264 KB of a DC's ~280 KB per node session at 1,000 sessions
# (bench/scale.py; 18 KB over plain HTTP). Two full TLS records (16 KiB + overhead each) per read
# keep a large upload to a few reads.
TLS_READ_BUFFER_BYTES = 32 * 1024


class _LeanTls(asyncio.sslproto.SSLProtocol):
    """asyncio's TLS server protocol with a TLS_READ_BUFFER_BYTES read buffer."""

    max_size = TLS_READ_BUFFER_BYTES


class TlsSockSite(web.SockSite):
    """web.SockSite whose TLS handshakes must finish within `handshake_timeout` (asyncio's default,
    60 s, would hold a connection that never starts one past the server's idle timeout), each TLS
    connection with a small read buffer (TLS_READ_BUFFER_BYTES)."""

    def __init__(self, *args, handshake_timeout: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._handshake_timeout = handshake_timeout

    async def start(self) -> None:
        await web.BaseSite.start(self)  # SockSite.start without its create_server
        loop, ctx, app = asyncio.get_running_loop(), self._ssl_context, self._runner.server

        def tls() -> asyncio.BaseProtocol:
            """What loop.create_server(ssl=ctx) builds per connection, with _LeanTls: a failed
            handshake closes the connection before the app sees it, as there."""
            return _LeanTls(loop, app(), ctx, None, server_side=True, ssl_handshake_timeout=self._handshake_timeout)

        self._server = await loop.create_server(app if ctx is None else tls, sock=self._sock, backlog=self._backlog)


def _anyone() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE  # checked by its binding instead
    return ctx


# base URL → (chain address, fingerprint): a certificate checked once is pinned for every client
# of this process that expects the same key at that URL (the session's DcClient, the mailbox's).
_PINNED: dict[str, tuple[bytes, aiohttp.Fingerprint]] = {}
_EXPECTED: dict[str, bytes] = {}  # base URL → chain address, for clients that name none (expect())


async def presented(http: aiohttp.ClientSession, base: str, timeout: float) -> tuple[bytes, messages.DcInfoReply]:
    """The certificate `base` presents and the /v1/info it serves over a connection presenting that
    same certificate (unchecked: the caller checks the binding)."""
    parts = urlsplit(base)
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(parts.hostname, parts.port or 443, ssl=_anyone()), timeout
        )
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        writer.close()
        seen = aiohttp.Fingerprint(hashlib.sha256(der).digest())
        async with http.get(base + "/v1/info", ssl=seen, timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            text = await resp.text()
    except aiohttp.ServerFingerprintMismatch:
        raise ChannelError("dc_unauthenticated", f"{base} presented two certificates") from None
    except TimeoutError:
        raise ChannelError("unreachable", f"{base} did not answer within {timeout:g} s") from None
    except (aiohttp.ClientError, OSError, ssl.SSLError) as exc:
        raise ChannelError("unreachable", f"cannot reach {base}: {str(exc) or type(exc).__name__}") from None
    try:
        return der, messages.decode(messages.DcInfoReply, text)
    except ParseError as exc:
        raise ChannelError("dc_unauthenticated", f"{base} sent no DC info: {exc}") from None


async def pin(http: aiohttp.ClientSession, base: str, address: bytes, timeout: float) -> aiohttp.Fingerprint:
    """The fingerprint to require of `base` (an https:// URL), once its certificate is shown to be
    bound to chain address `address`; ChannelError otherwise."""
    known = _PINNED.get(base)
    if known and known[0] == address:
        return known[1]
    der, info = await presented(http, base, timeout)
    try:
        h = tls_binding.check(info.tls, der, address)
    except SignatureError as exc:
        raise ChannelError("dc_unauthenticated", f"{base} is not DC {keys.checksum(address)}: {exc}") from None
    _PINNED[base] = (address, aiohttp.Fingerprint(h))
    return _PINNED[base][1]


def expect(base: str, address: bytes) -> None:
    """Known hosts: the DC at `base` is `address` for every client in this process that names no
    address of its own (a program that starts its DCs, as `ntm devnet` and the tests do)."""
    _EXPECTED[base.rstrip("/")] = address


def forget(base: str) -> None:
    """Drop a pin that failed (a rotated certificate): the next call checks the binding again."""
    _PINNED.pop(base, None)


async def ssl_for(
    http: aiohttp.ClientSession, base: str, address: bytes | None, timeout: float
) -> aiohttp.Fingerprint | bool:
    """What aiohttp's `ssl=` must be for `base`: its pinned fingerprint (https://, `address`
    known, or None and already pinned in this process), True for plain http:// (no TLS at all:
    development only). An https:// URL with no address to check it against is refused: there is
    no CA to fall back on."""
    if not base.startswith("https://"):
        return True
    address = address or _EXPECTED.get(base)
    if address is None and base in _PINNED:
        return _PINNED[base][1]
    if address is None:
        raise ChannelError("dc_unauthenticated", f"no chain address to check {base}'s certificate against")
    return await pin(http, base, address, timeout)


def warn_plain(what: str) -> None:
    log.warning(
        "%s uses plain HTTP (%s): anyone on the path reads and rewrites it; development only", what, INSECURE_FLAG
    )
