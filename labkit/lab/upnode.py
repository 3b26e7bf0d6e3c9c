"""A node as a user runs it, inside a lab namespace: keygen and register from there, then
`ntm up` with a TUN interface; the lab's TUN tests and bench/tun.py drive it.

Every node reaches its DC by the name DC_NAME (both families, per-namespace /etc/hosts), and its
system resolver is its own daemon (per-namespace /etc/resolv.conf), as a user would set it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import coincurve

from daemon import keystore
from node import state
from .fed import Federation
from .topology import Host, expect

ROOT = Path(__file__).resolve().parents[2]
TCPXFER = Path(__file__).with_name("tcpxfer.py")
DC_NAME = "dc{}.lab"
XFER_PORT = 5001


class UpNode:
    """A node home registered from inside `host`, running `ntm up` with a TUN interface."""

    def __init__(
        self,
        fed: Federation,
        host: Host,
        dc: int,
        *up_args: str,
        dc_port: int | None = None,
        key: coincurve.PrivateKey | None = None,
    ) -> None:
        """Register at DC `dc` (at `dc_port` if given: a port forwarded to it) and start `ntm up`
        (keepalive: the federation's) with `up_args`. `key`: the node's key (default: `ntm keygen`),
        for a node whose ID must be known before it exists (a relay's --exit-allow)."""
        self.fed, self.lab, self.host = fed, fed.lab, host
        srv = fed.srv
        self.lab.set_hosts(
            host, {DC_NAME.format(i + 1): [srv.addr4, srv.addr6] for i in range(len(fed.dcs))}, nameserver="100.64.0.1"
        )
        self.home = fed.workdir / f"home-{host.name}"
        if key is None:
            self.id = self.cli("keygen")["node"]
        else:
            self.home.mkdir(parents=True, exist_ok=True)
            keystore.save_keystore(key, self.home / state.KEY_FILE)
            self.id = self.cli("id")["node"]
        self.cli(
            "register",
            "--dc",
            f"{fed.scheme(dc)}://{DC_NAME.format(dc + 1)}:{dc_port or fed.dc_port(dc)}",
            *fed.dc_flags(dc),
        )
        self.log = open(fed.workdir / f"up-{host.name}.log", "ab")
        self.up_args = up_args
        self.start()
        self.v6 = self.ready["ipv6"]

    def start(self) -> None:
        """`ntm up` (again, after stop() or a crash), waiting until it is up."""
        self.started = time.monotonic()  # when `ntm up` was started
        self.proc = self.lab.run(
            self.host,
            [
                sys.executable,
                "-m",
                "node.cli",
                "--home",
                str(self.home),
                "--json",
                "up",
                "--tun",
                "ntm0",
                "--keepalive",
                str(self.fed.keepalive_s),
                *self.up_args,
            ],
            stderr=self.log,
            cwd=str(ROOT),
        )
        self.ready = json.loads(expect(self.proc, r'"event": "up"', timeout=30).string)

    def cli(self, *args: str, check: bool = True) -> dict:
        r = self.lab.exec(
            self.host,
            [sys.executable, "-m", "node.cli", "--home", str(self.home), "--json", *args],
            cwd=str(ROOT),
            timeout=60,
        )
        if check:
            assert r.returncode == 0, r.stderr
            return json.loads(r.stdout)
        return {"returncode": r.returncode, "stderr": r.stderr}

    def run(self, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return self.lab.exec(self.host, list(argv), timeout=timeout)

    def resolve(self, name: str, rdtype: str) -> tuple[str, list[str]]:
        """Ask this node's DNS responder directly: (rcode, answers)."""
        code = (
            "import dns.message, dns.query, dns.rcode, sys; "
            "r = dns.query.udp(dns.message.make_query(sys.argv[1], sys.argv[2]), '100.64.0.1', timeout=3); "
            "print(dns.rcode.to_text(r.rcode())); [print(x.to_text()) for a in r.answer for x in a]"
        )
        r = self.run(sys.executable, "-c", code, name, rdtype)
        assert r.returncode == 0, r.stderr
        lines = r.stdout.split()
        return lines[0], lines[1:]

    def status(self) -> dict:
        return self.cli("status")["daemon"]

    def stop(self) -> None:
        self.lab.kill(self.proc, grace=5)


def transfer(
    sender: UpNode, receiver: UpNode | Host, to_addr: str, bind: str, nbytes: int, rate: float = 0.0, during=None
) -> tuple[dict, dict]:
    """`nbytes` over TCP from `sender` to `receiver` (a node, or a plain host; listening on
    `bind`), paced at `rate` bytes/s if given; `during()` runs meanwhile (a move). Returns
    (sender result, receiver result)."""
    lab = sender.lab
    srv = lab.run(
        receiver.host if isinstance(receiver, UpNode) else receiver,
        [sys.executable, str(TCPXFER), "serve", "--bind", bind, "--port", str(XFER_PORT)],
    )
    expect(srv, "listening")
    cli = lab.run(
        sender.host,
        [
            sys.executable,
            str(TCPXFER),
            "send",
            "--to",
            to_addr,
            "--port",
            str(XFER_PORT),
            "--bytes",
            str(nbytes),
            "--rate",
            str(rate),
        ],
    )
    if during is not None:
        during()
    sent = json.loads(expect(cli, r'"sha256"', timeout=120).string)
    got = json.loads(expect(srv, r'"sha256"', timeout=30).string)
    return sent, got
