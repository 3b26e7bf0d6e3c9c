"""Split DNS: `.ntm` names to the daemon, every other name where it went before (PROTOCOL §10.4).

With systemd-resolved, `ntm up` registers the daemon's resolver for the routing-only domain `~ntm`
on its TUN link (`resolvectl dns/domain`) and reverts the link on stop; a daemon killed without a
word takes its link, and so the registration, with it. Without systemd-resolved nothing of the
system is touched: the daemon also answers on LOOPBACK_DNS, and the README's fallback puts that
address first in /etc/resolv.conf. The daemon refuses names outside `.ntm` (REFUSED), and a stub
resolver then asks the next nameserver; while the daemon is down, a query to the loopback address
is refused by the kernel at once (ICMP port unreachable), so lookups never wait for a timeout.

What to run is decided by pure functions (`register_commands`, `revert_commands`); the commands
run through an injected runner.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from pathlib import Path
from typing import Callable

log = logging.getLogger("ntm.node")

#: Present while systemd-resolved runs (its stub resolv.conf lives there).
RESOLVED_DIR = Path("/run/systemd/resolve")
#: The fallback's address: on loopback, where a daemon that is down means "connection refused" at
#: once; a TUN address would instead be routed out by the default route and time out (5 s x tries).
LOOPBACK_DNS = ("127.0.0.153", 53)
#: The routing-only domain: resolved sends only names under .ntm to the link's servers.
ROUTING_DOMAIN = "~ntm"
#: resolvectl answers in milliseconds; a stuck D-Bus must not hold `ntm up` (or its stop) longer.
RESOLVECTL_TIMEOUT_S = 5.0

Runner = Callable[[list[str]], None]


class SplitDnsError(Exception):
    """resolvectl refused or is missing."""


def register_commands(link: str, servers: list[str]) -> list[list[str]]:
    """The resolvectl calls that send `.ntm` names (only those) to `servers` on `link`."""
    return [["resolvectl", "dns", link, *servers], ["resolvectl", "domain", link, ROUTING_DOMAIN]]


def revert_commands(link: str) -> list[list[str]]:
    """The resolvectl call that drops everything registered on `link`."""
    return [["resolvectl", "revert", link]]


def fallback_hint() -> str:
    """What the log says when systemd-resolved is not running."""
    return (
        f"no systemd-resolved: .ntm names answer on {LOOPBACK_DNS[0]}; to use them, put `nameserver "
        f"{LOOPBACK_DNS[0]}` first in /etc/resolv.conf (other names go on to the next nameserver, also "
        'while the daemon is down; README "Names")'
    )


def resolvectl(argv: list[str]) -> None:
    """Run one resolvectl command; SplitDnsError with its message if it fails."""
    try:
        subprocess.run(argv, check=True, capture_output=True, text=True, timeout=RESOLVECTL_TIMEOUT_S)
    except subprocess.CalledProcessError as exc:
        raise SplitDnsError(f"{' '.join(argv)}: {(exc.stderr or '').strip() or f'exit {exc.returncode}'}") from None
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SplitDnsError(f"{' '.join(argv)}: {exc}") from None


def resolved_running(resolved_dir: Path = RESOLVED_DIR) -> bool:
    return resolved_dir.is_dir() and shutil.which("resolvectl") is not None


class SplitDns:
    """The system side of the daemon's DNS, set up by `register` and undone by `revert`."""

    def __init__(
        self, link: str, servers: list[str], runner: Runner = resolvectl, resolved: bool | None = None
    ) -> None:
        self.link, self.servers, self.runner = link, servers, runner
        self.resolved = resolved_running() if resolved is None else resolved
        self.registered = False

    def register(self) -> str:
        """Register with systemd-resolved if it runs; returns how names reach the daemon (for the
        log and `ntm status`). A refusal is logged: the daemon works on, without system DNS."""
        if not self.resolved:
            log.info("%s", fallback_hint())
            return f"{LOOPBACK_DNS[0]} (resolv.conf fallback)"
        try:
            for argv in register_commands(self.link, self.servers):
                self.runner(argv)
        except SplitDnsError as exc:
            log.warning("could not register .ntm with systemd-resolved: %s; %s", exc, fallback_hint())
            self.revert_quietly()
            return f"{LOOPBACK_DNS[0]} (resolv.conf fallback)"
        self.registered = True
        log.info("systemd-resolved sends %s names on %s to %s", ROUTING_DOMAIN, self.link, ", ".join(self.servers))
        return f"systemd-resolved ({ROUTING_DOMAIN} on {self.link})"

    def revert(self) -> None:
        """Undo `register` (on stop)."""
        if self.registered:
            self.registered = False
            self.revert_quietly()

    def revert_quietly(self) -> None:
        try:
            for argv in revert_commands(self.link):
                self.runner(argv)
        except SplitDnsError as exc:  # the link may be gone already, taking its settings with it
            log.info("resolvectl revert: %s", exc)
