"""DC configuration: a TOML file, overridden by command-line flags. Every field has a default
except the key, the chain URL and the deployment file."""

from __future__ import annotations

import argparse
import ipaddress
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

from daemon import keystore, startup, tlspin
from daemon.service import HTTP_IDLE_TIMEOUT_S, daemon_parser
from dc.coordinator import NEW_NODES_PER_HOUR

DEFAULT_HTTP_PORT = 8330  # NTM's tunnel port is 4330; 8330 keeps the family resemblance for HTTP
DEFAULT_UDP_PORT = 4331  # keepalives: next to the tunnel port 4330
PASSPHRASE_ENV = "NTM_DC_PASSPHRASE"


@dataclass
class DcConfig:
    key_file: Path
    rpc_url: list[str]  # own chain node first, fallbacks after
    deployment: Path
    hostname: str = "localhost"
    http_host: str = "127.0.0.1"
    http_port: int = DEFAULT_HTTP_PORT
    udp_host: str = "0.0.0.0"
    udp_port: int = DEFAULT_UDP_PORT
    udp_alt_port: int = 0  # the second keepalive port (NAT-type probe); fixed when it must be published
    db: Path = Path("dc.sqlite")
    relays: list[str] = field(default_factory=list)
    cs: str | None = None  # this DC's Cache Server URL, announced to nodes in /v1/info
    admin_allow: list = field(default_factory=list)  # networks that may read /metrics (empty: loopback)
    http_idle_timeout: float = HTTP_IDLE_TIMEOUT_S
    new_nodes_per_hour: float = NEW_NODES_PER_HOUR  # gas budget for never-seen nodes
    passphrase_file: Path | None = None  # else the key's passphrase comes from $NTM_DC_PASSPHRASE
    confirmations: int = 1  # blocks deep before "confirmed": 1 on anvil; a BFT chain (QBFT) is final at 1 too
    max_block_age: float = 0.0  # seconds; 0 = blocks only on demand (anvil), so no age check
    tls_cert: Path | None = None  # serve HTTPS/WSS with this certificate, bound to the chain key (§5)
    tls_key: Path | None = None
    insecure_plain_http: bool = False  # development only: no TLS, anyone on the path reads and rewrites (§5)


def parser() -> argparse.ArgumentParser:
    p = daemon_parser(
        "ntm-dc",
        "Run a Direction Coordinator: registers nodes on the shared chain registry, "
        "answers peer DCs, keeps node sessions.",
        chain_required=False,
    )
    p.add_argument("--config", type=startup.readable_file, help="TOML file with any of the options below (flags win)")
    p.add_argument(
        "--key-file",
        type=startup.readable_file,
        help=f"DC chain key (keystore JSON; passphrase from ${PASSPHRASE_ENV})",
    )
    keystore.passphrase_file_arg(p, PASSPHRASE_ENV)
    p.add_argument("--hostname", help="name this DC is known by (as admitted on chain)")
    p.add_argument(
        "--http-host", help="HTTP listen address (default 127.0.0.1; 0.0.0.0 or :: = every address, IPv4 and IPv6)"
    )
    p.add_argument("--http-port", type=startup.port, help=f"HTTP port (default {DEFAULT_HTTP_PORT}; 0 = any)")
    p.add_argument("--udp-host", help="keepalive UDP listen address (default 0.0.0.0; '::' for dual-stack)")
    p.add_argument("--udp-port", type=startup.port, help=f"keepalive UDP port (default {DEFAULT_UDP_PORT}; 0 = any)")
    p.add_argument(
        "--udp-alt-port",
        type=startup.port,
        help="second keepalive UDP port, for NAT-type detection (default 0 = any; fix it to publish it "
        "from a container)",
    )
    p.add_argument("--db", type=startup.creatable_path, help="SQLite file (default dc.sqlite)")
    p.add_argument(
        "--cs", metavar="URL", type=startup.http_url, help="this DC's Cache Server (ntm-cs), as nodes reach it"
    )
    p.add_argument(
        "--relay",
        dest="relays",
        action="append",
        metavar="URL",
        type=startup.http_url,
        help="a relay's control API and its certificate's pin (`ntm-rs --print-pin`), e.g. "
        "https://127.0.0.1:8340#sha256=<hex>, or #cert=<the relay's certificate file> (repeatable; "
        "http:// only with --insecure-plain-http)",
    )
    p.add_argument(
        "--new-nodes-per-hour",
        type=startup.positive,
        metavar="N",
        help=f"gas budget: new nodes registered per hour, a fifth of it at once (default {NEW_NODES_PER_HOUR:.0f})",
    )
    p.add_argument(
        "--confirmations",
        type=startup.positive_int,
        metavar="N",
        help="blocks deep before a registration is confirmed (default 1: anvil, QBFT; more on a "
        "chain that can reorganise)",
    )
    p.add_argument(
        "--max-block-age",
        type=startup.not_negative,
        metavar="S",
        help="health says the chain is behind when its newest block is older than this (default 0 = "
        "off, for chains that mine on demand; set ~10 block periods for Besu/geth)",
    )
    p.add_argument(
        "--tls-cert",
        type=Path,
        metavar="PEM",
        help="serve HTTPS/WSS with this certificate (any, e.g. self-signed: /v1/info binds it to the DC's "
        "chain key; default: one made at first start beside --db); with --tls-key",
    )
    p.add_argument("--tls-key", type=Path, metavar="PEM", help="the TLS certificate's private key")
    startup.insecure_arg(p, "serve plain HTTP/WebSocket, no TLS", "keepalive tokens and relay keys", default=None)
    return p


# DcConfig's scalar field types (annotations are strings here) → (accepted Python types, in words).
SCALAR_TYPES = {"int": (int, "an integer"), "float": ((int, float), "a number"), "str": (str, "a string")}


def load(args: argparse.Namespace) -> DcConfig:
    """Merge file and flags; ValueError naming what is missing or unknown."""
    values: dict = {}
    if args.config:
        try:
            values = tomllib.loads(args.config.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ValueError(f"config file {args.config}: {exc}") from None
    known = {f.name for f in fields(DcConfig)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"unknown config keys: {', '.join(sorted(unknown))}")
    for name in known:
        flag = getattr(args, name, None)
        if flag is not None:
            values[name] = flag
    missing = [n for n in ("key_file", "rpc_url", "deployment") if n not in values]
    if missing:
        raise ValueError("missing: " + ", ".join("--" + m.replace("_", "-") for m in missing))
    if "admin_allow" in values:
        values["admin_allow"] = [ipaddress.ip_network(str(n), strict=False) for n in values["admin_allow"]]
    if ("tls_cert" in values) != ("tls_key" in values):
        raise ValueError("--tls-cert and --tls-key go together")
    if "tls_cert" in values and values.get("insecure_plain_http"):
        raise ValueError("--tls-cert and --insecure-plain-http contradict each other")
    for name in ("key_file", "deployment", "db", "passphrase_file", "tls_cert", "tls_key"):
        if name in values:
            values[name] = Path(values[name])
    if isinstance(values["rpc_url"], str):
        values["rpc_url"] = [values["rpc_url"]]
    for f in fields(DcConfig):  # a TOML file can say http_port = "abc"
        want, what = SCALAR_TYPES.get(str(f.type), (None, ""))
        if want and f.name in values and (not isinstance(values[f.name], want) or isinstance(values[f.name], bool)):
            raise ValueError(f"{f.name} must be {what}, got {values[f.name]!r}")
    for name in ("http_port", "udp_port", "udp_alt_port"):
        if name in values and not 0 <= values[name] < 65536:
            raise ValueError(f"{name} must be in 0..65535, got {values[name]}")
    try:  # a TOML file's URLs, like the flags' (startup's argparse types)
        for url in [*values.get("relays", []), *([values["cs"]] if values.get("cs") else [])]:
            startup.http_url(str(url))
    except argparse.ArgumentTypeError as exc:
        raise ValueError(f"{exc}") from None
    for url in values.get("relays", []):
        relay_target(str(url), bool(values.get("insecure_plain_http")))
    if int(values.get("confirmations", 1)) < 1:
        raise ValueError("confirmations must be at least 1")
    return DcConfig(**values)


def relay_target(url: str, plain_allowed: bool) -> tlspin.RelayTarget:
    """A --relay URL checked (ValueError): pinned https://, or http:// with --insecure-plain-http,
    as a Relay Direction's path token (both nodes' relay keys) crosses this channel (§5)."""
    target = tlspin.relay_target(url)
    if target.plain and not plain_allowed:
        raise ValueError(
            f"relay {url}: plain http:// would carry relay path tokens in clear; name it as "
            f"https://HOST:PORT#{tlspin.PIN_HASH}=PIN (`ntm-rs --print-pin`), or for development "
            f"only add {tlspin.INSECURE_FLAG}"
        )
    return target
