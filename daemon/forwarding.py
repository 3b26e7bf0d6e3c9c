"""IP forwarding and masquerade on this host, recorded before they are made (docs/PROTOCOL.md
§10.10 "The router's kernel side", §10.13): shared by a node that routes for a LAN or is an exit
(node/subnet.py) and by a relay that is an exit (rs/exit.py).

`Forwarding` turns on IP forwarding and adds iptables/ip6tables rules, writing each rule (and each
sysctl's old value) to $BASE/forwarding.json *before* making it, so a process that crashed is
cleaned up by the next start (`recover`), and removes exactly those rules on stop.

    fw = Forwarding(base); fw.recover(); fw.apply(forwarding_rules("ntm0", v4_net, prefixes), {4}); ...; fw.remove()
"""

from __future__ import annotations

import json
import logging
import subprocess
from dataclasses import dataclass, field
from ipaddress import IPv4Network
from pathlib import Path
from typing import Callable

from daemon import atomic_file
from ntm.errors import NtmError
from ntm.routes import Net
from ntm.vaddr import V6_PREFIX

log = logging.getLogger("ntm.forwarding")

#: Where the rules and old sysctl values are recorded, in the process's state directory.
STATE_FILE = "forwarding.json"
#: The iptables comment on every rule a subnet router adds, so an operator can tell them apart.
COMMENT = "ntm-subnet-router"
#: The sysctls that turn IP forwarding on, per IP version.
SYSCTLS = {4: "/proc/sys/net/ipv4/ip_forward", 6: "/proc/sys/net/ipv6/conf/all/forwarding"}
Runner = Callable[[list[str]], None]


class ForwardingError(NtmError):
    code = "forwarding_failed"


def run(argv: list[str]) -> None:
    """Run a command; ForwardingError with its stderr if it fails."""
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ForwardingError(f"{' '.join(argv)}: {exc}") from None
    if r.returncode != 0:
        raise ForwardingError(f"{' '.join(argv)}: {r.stderr.strip() or r.returncode}")


def forwarding_rules(tun: str, v4_net: IPv4Network, prefixes: list[Net], comment: str = COMMENT) -> list[list[str]]:
    """The iptables/ip6tables rules (arguments after -A/-D) that let peers' packets from TUN into
    `prefixes` and their answers back, masqueraded behind this node's LAN address: the LAN's hosts
    need no route to the overlay. Sources are the overlay's (the IPv4 view, or the IPv6 prefix);
    `comment` tags each rule for the operator."""
    rules = []
    for net in prefixes:
        cmd, src = ("iptables", str(v4_net)) if net.version == 4 else ("ip6tables", str(V6_PREFIX))
        tag = ["-m", "comment", "--comment", comment]
        rules += [
            [cmd, "-t", "filter", "FORWARD", "-i", tun, "-s", src, "-d", str(net), *tag, "-j", "ACCEPT"],
            [
                cmd,
                "-t",
                "filter",
                "FORWARD",
                "-o",
                tun,
                "-s",
                str(net),
                "-d",
                src,
                "-m",
                "conntrack",
                "--ctstate",
                "RELATED,ESTABLISHED",
                *tag,
                "-j",
                "ACCEPT",
            ],
            [cmd, "-t", "nat", "POSTROUTING", "-s", src, "-d", str(net), "!", "-o", tun, *tag, "-j", "MASQUERADE"],
        ]
    return rules


def _argv(rule: list[str], op: str) -> list[str]:
    """iptables argv for `op` (-A, -D, -C) of a rule as forwarding_rules() gives it."""
    cmd, t, table, chain, *spec = rule
    return [cmd, "-w", t, table, op, chain, *spec]


@dataclass
class Forwarding:
    """The kernel state a subnet router adds, recorded on disk before it is added."""

    base: Path
    run: Runner = run
    sysctl_dir: Path | None = None  # tests: a directory standing for /proc/sys
    rules: list[list[str]] = field(default_factory=list)
    sysctls: dict[str, str] = field(default_factory=dict)  # path → the value before we changed it

    @property
    def path(self) -> Path:
        return self.base / STATE_FILE

    def _sysctl(self, path: str) -> Path:
        return Path(path) if self.sysctl_dir is None else self.sysctl_dir / Path(path).name

    def _save(self) -> None:
        atomic_file.replace_file(self.path, json.dumps({"rules": self.rules, "sysctls": self.sysctls}).encode())

    def recover(self) -> int:
        """Remove what a daemon that died without cleaning up had added (its state file); the
        number of rules removed."""
        try:
            st = json.loads(self.path.read_text())
            self.rules, self.sysctls = list(st["rules"]), dict(st["sysctls"])
        except FileNotFoundError:
            return 0
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("%s unreadable (%s): nothing to clean up from it", self.path, exc)
            self.path.unlink()
            return 0
        n = len(self.rules)
        log.warning("removing the forwarding state a previous daemon left (%d rules)", n)
        self.remove()
        return n

    def apply(self, rules: list[list[str]], families: set[int]) -> None:
        """Turn forwarding on for `families` and add `rules`; on a failure, undo what was added."""
        try:
            for family in sorted(families):
                path = self._sysctl(SYSCTLS[family])
                old = path.read_text().strip()
                if old != "1":
                    self.sysctls[str(path)] = old
                    self._save()
                    path.write_text("1\n")
            for rule in rules:
                self.rules.append(rule)
                self._save()  # on disk first: a crash right after still gets it removed
                self.run(_argv(rule, "-A"))
        except (OSError, ForwardingError) as exc:
            self.remove()
            raise ForwardingError(f"cannot set up forwarding: {exc}") from None

    def remove(self) -> None:
        """Delete exactly the rules added (those no longer present are skipped) and restore sysctls."""
        for rule in reversed(self.rules):
            try:
                self.run(_argv(rule, "-C"))
            except ForwardingError:
                continue  # not there (never added, or removed by hand)
            try:
                self.run(_argv(rule, "-D"))
            except ForwardingError as exc:
                log.warning("%s", exc)
        for path, old in self.sysctls.items():
            try:
                Path(path).write_text(old + "\n")
            except OSError as exc:
                log.warning("cannot restore %s to %s: %s", path, old, exc)
        self.rules, self.sysctls = [], {}
        self.path.unlink(missing_ok=True)
