"""The whole system inside a NAT lab: anvil, DCs and a relay in the server namespace, and node
driver processes (labkit/lab/nodectl.py) in the node namespaces.

    with Lab() as lab:
        fed = Federation(lab, workdir, n_dcs=3)        # anvil + deploy + DC1..3 + RS in lab.server
        a = fed.node(lab.add_site("a", "eim").host, dc=0)
        b = fed.node(lab.add_site("b", "public").host, dc=1)
        t = a.call("connect", peer=b.id)               # {"tunnel", "kind", "via", "peer_addr", ...}
        a.call("exchange", tunnel=t["tunnel"], count=3)

Server side (all in ``lab.server``, 198.18.0.10 + 2001:db8:0:1::10):
  * anvil on 127.0.0.1:8545 (only the server namespace talks to the chain);
  * DC i: HTTP on port 8331+i on every address (IPv4 and IPv6: the IPv6-only site reaches it),
    keepalive UDP on '::' dual-stack; admitted on chain with endpoint http://198.18.0.10:PORT
    (the URL peer DCs and failing-over nodes use: IPv4, so failover needs an IPv4 node);
  * RS: UDP on '::' port 4340, advertised as 198.18.0.10:4340 and [2001:db8:0:1::10]:4340.
Nodes register from inside their own namespace, so the DC sees their real local addresses.
"""

from __future__ import annotations

import itertools
import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

from ntm import keys
from scripts.anvil import DEV_KEYS, anvil_binary
from scripts.procs import Child, dc_child

from .topology import Host, Lab

ROOT = Path(__file__).resolve().parents[2]
NODECTL = Path(__file__).with_name("nodectl.py")
ANVIL_PORT = 8545
DC_BASE_PORT = 8331
RS_UDP_PORT = 4340
RS_HTTP_PORT = 8340
RS_STREAM_PORT = 443  # the relay's TCP transport (§8.4), as in production


KINDS = ("public", "eim", "symmetric", "ipv6only")
# The route decision (ntm/route.py) for requester kind × peer kind. Public hosts are dual-stack,
# NAT sites IPv4-only: public–ipv6only share IPv6 and go direct; a NAT site and an IPv6-only host
# share no family and meet at the dual-stack relay.
EXPECTED = {
    ("public", "public"): "direct",
    ("public", "eim"): "nat_initiates",
    ("eim", "public"): "nat_initiates",
    ("public", "symmetric"): "nat_initiates",
    ("symmetric", "public"): "nat_initiates",
    ("public", "ipv6only"): "direct",
    ("ipv6only", "public"): "direct",
    ("eim", "eim"): "punch",
    ("eim", "symmetric"): "relay",
    ("symmetric", "eim"): "relay",
    ("symmetric", "symmetric"): "relay",
    ("eim", "ipv6only"): "relay",
    ("ipv6only", "eim"): "relay",
    ("symmetric", "ipv6only"): "relay",
    ("ipv6only", "symmetric"): "relay",
    ("ipv6only", "ipv6only"): "direct",
}


def ip_of(endpoint: str) -> str:
    return endpoint.rsplit(":", 1)[0].strip("[]")


def open_tunnel(a, b, **kw) -> tuple[dict, dict]:
    """A connects to B; returns (A's answer, B's accepted event)."""
    ta = a.call("connect", peer=b.id, **kw)
    tb = b.next_event("accepted", tunnel=ta["tunnel"])
    return ta, tb


def grid_rows(fed: "Federation", nodes: dict, rounds: int) -> list[dict]:
    """Every ordered pair of KINDS: A = nodes[kind_a, 1] (at DC1) connects to B = nodes[kind_b, 2]
    (at DC2) `rounds` times with fresh tunnels; data both ways; one row per tunnel with the route
    kind, the way A's handshake completed (`via`), the address that carried A's data (`peer_addr`:
    the relay's or B's own) and whether all of it matches EXPECTED."""
    rows = []
    for ka, kb in itertools.product(KINDS, KINDS):
        a, b = nodes[ka, 1], nodes[kb, 2]
        peer_ips = {b.host.public4, b.host.public6} - {None}
        for _ in range(rounds):
            ta, tb = open_tunnel(a, b)
            ex_a = a.call("exchange", tunnel=ta["tunnel"], count=2)
            b.call("exchange", tunnel=tb["tunnel"], count=1)
            want = EXPECTED[ka, kb]
            ok = ta["kind"] == want == tb["kind"]
            if want == "relay":
                ok = ok and ta["via"] == "relay" and ip_of(ex_a["peer_addr"]) in fed.relay_ips
            else:
                ok = ok and ta["via"] != "relay" and ip_of(ex_a["peer_addr"]) in peer_ips
            rows.append(
                {
                    "a": ka,
                    "b": kb,
                    "kind": ta["kind"],
                    "via": ta["via"],
                    "b_via": tb["via"],
                    "peer_addr": ex_a["peer_addr"],
                    "setup_ms": ta["setup_ms"],
                    "rtt_ms": ex_a["rtt_ms"][-1],
                    "ok": ok,
                    "a_answer": ta,
                }
            )
            a.call("close", tunnel=ta["tunnel"])
            b.call("close", tunnel=tb["tunnel"])
    return rows


def grid_table(rows: list[dict]) -> str:
    lines = [
        f"{'A (requester)':14} {'B (peer)':10} {'route':14} {'via (A)':12} {'path A→B':28} "
        f"{'setup ms med/max':>17} {'ok':>4}"
    ]
    for (ka, kb), group in itertools.groupby(rows, key=lambda r: (r["a"], r["b"])):
        g = list(group)
        setups = sorted(r["setup_ms"] for r in g)
        lines.append(
            f"{ka:14} {kb:10} {g[0]['kind']:14} {g[0]['via']:12} {g[0]['peer_addr']:28} "
            f"{setups[len(setups) // 2]:8.1f}/{setups[-1]:<8.1f} {sum(r['ok'] for r in g)}/{len(g)}"
        )
    return "\n".join(lines)


def url_of(ip: str, port: int, scheme: str = "https") -> str:
    return f"{scheme}://[{ip}]:{port}" if ":" in ip else f"{scheme}://{ip}:{port}"


def dc_address(i: int) -> str:
    """DC i's chain address (fedsetup gives DC i dev key i + 1): what nodes pin its certificate to."""
    return keys.checksum(keys.node_id_of(keys.private_key(DEV_KEYS[1 + i])))


# Every lab NAT's public address is in one /24 (and one /56), which a DC charges as one source
# network for new identities (§5: a rising cost, ~4 at once); a lab module registers dozens of
# nodes, so the lab's networks are the DCs' operator networks, exempt as an operator's are.
LAB_OPERATOR = ("--admin-allow", "198.18.0.0/15", "--admin-allow", "2001:db8::/32")


# Reads a URL of the relay's control API (TLS with its own certificate: nothing to pin here).
_READ_METRICS = (
    "import ssl, sys, urllib.request; "
    "print(urllib.request.urlopen(sys.argv[1], context=ssl._create_unverified_context(), timeout=10).read().decode())"
)


class Federation:
    """anvil + registry + DCs + RS inside ``lab.server``; `node()` starts a node driver."""

    def __init__(
        self,
        lab: Lab,
        workdir: Path,
        n_dcs: int = 2,
        keepalive_s: float = 2.0,
        plain: tuple[int, ...] = (),
        rs_args: tuple[str, ...] = (),
    ) -> None:
        """`plain`: DCs served over plain HTTP (--insecure-plain-http), the others over TLS bound
        to their chain key (§5). `rs_args`: more `ntm-rs` flags (e.g. its exit, §10.13)."""
        self.lab, self.workdir, self.keepalive_s, self.plain = lab, Path(workdir), keepalive_s, plain
        self.srv = lab.server
        self.prefix = ["ip", "netns", "exec", self.srv.ns]
        self.env = {"PYTHONPATH": str(ROOT)}
        self.rpc = f"http://127.0.0.1:{ANVIL_PORT}"
        self.dcs: list[Child | None] = [None] * n_dcs
        self.nodes: list[NodeProc] = []
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.anvil = lab.run(
            self.srv,
            [str(anvil_binary()), "--host", "127.0.0.1", "--port", str(ANVIL_PORT)],
            stdout=open(self.workdir / "anvil.log", "wb"),
            stderr=subprocess.STDOUT,
            text=False,
        )
        r = lab.exec(
            self.srv,
            [
                sys.executable,
                "-m",
                "labkit.lab.fedsetup",
                "--rpc",
                self.rpc,
                "--workdir",
                str(self.workdir),
                "--dcs",
                str(n_dcs),
                "--host",
                self.srv.addr4,
                "--base-port",
                str(DC_BASE_PORT),
                *(f"--plain-dc={i}" for i in plain),
            ],
            cwd=str(ROOT),
            timeout=60,
            env={**os.environ, **self.env},
        )
        if r.returncode != 0:
            raise RuntimeError(f"deploy in the lab failed:\n{r.stdout}\n{r.stderr}")
        self.deployment = self.workdir / "deployment.json"
        self.rs = Child(
            "rs",
            [
                "--rpc-url",
                self.rpc,
                "--deployment",
                str(self.deployment),
                "--udp-host",
                "::",
                "--udp-port",
                str(RS_UDP_PORT),
                "--http-host",
                "127.0.0.1",
                "--http-port",
                str(RS_HTTP_PORT),
                "--stream-port",
                str(RS_STREAM_PORT),
                "--advertise",
                f"{self.srv.addr4}:{RS_UDP_PORT}",
                "--advertise",
                f"[{self.srv.addr6}]:{RS_UDP_PORT}",
                "--data-dir",
                str(self.workdir),
                *rs_args,
            ],
            self.workdir / "rs.log",
            env=self.env,
            prefix=self.prefix,
        ).start()
        for i in range(n_dcs):
            self.start_dc(i)

    @property
    def relay_ips(self) -> set[str]:
        return {self.srv.addr4, self.srv.addr6}

    def relay_counter(self, name: str) -> float:
        """One counter of the relay's /metrics (e.g. "udp_gro_runs"), read from its namespace."""
        r = self.srv.exec([sys.executable, "-c", _READ_METRICS, self.rs.ready["http"] + "/metrics"], check=True)
        for line in r.stdout.splitlines():
            if line.startswith(f"ntm_rs_{name}_total "):
                return float(line.split()[1])
        raise KeyError(f"the relay has no counter {name}")

    def dc_port(self, i: int) -> int:
        return DC_BASE_PORT + i

    def dc_url(self, i: int, family: int = 4) -> str:
        return url_of(self.srv.addr6 if family == 6 else self.srv.addr4, self.dc_port(i), self.scheme(i))

    def scheme(self, i: int) -> str:
        return "http" if i in self.plain else "https"

    def dc_flags(self, i: int) -> list[str]:
        """`ntm register`'s flags that authenticate DC i (or allow it plain)."""
        return ["--insecure-plain-http"] if i in self.plain else ["--dc-address", dc_address(i)]

    def start_dc(self, i: int) -> Child:
        child = dc_child(
            self.workdir,
            f"dc{i + 1}",
            self.workdir / f"dc{i + 1}.key.json",
            self.rpc,
            self.deployment,
            self.dc_port(i),
            relays=[self.rs.ready["control"]],
            prefix=self.prefix,
            http_host="",
            udp_host="::",
            extra=[*LAB_OPERATOR, *(["--insecure-plain-http"] if i in self.plain else [])],
        )
        child.env.update(self.env)
        self.dcs[i] = child.start()
        return child

    def kill_dc(self, i: int) -> None:
        """SIGKILL DC i (a crash: no goodbye to its sessions beyond what the kernel does)."""
        self.dcs[i].kill()

    def node(self, host: Host, dc: int, name: str | None = None, keepalive_s: float | None = None) -> "NodeProc":
        """A node driver in `host`'s namespace, registered at DC `dc` (over IPv6 if the host has
        no IPv4)."""
        family = 4 if host.addr4 else 6
        argv = [
            str(NODECTL),
            "--dc",
            self.dc_url(dc, family),
            *self.dc_flags(dc),
            "--keepalive",
            str(keepalive_s or self.keepalive_s),
            "--name",
            name or host.name,
        ]
        proc = self.lab.python(
            host,
            *argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=open(self.workdir / f"node-{name or host.name}.log", "ab"),
            cwd=str(ROOT),
            env={**os.environ, **self.env},
            text=False,
        )
        node = NodeProc(proc, name or host.name, host)
        self.nodes.append(node)
        return node

    def stop(self) -> None:
        for n in self.nodes:
            n.quit()
        for c in [*self.dcs, self.rs]:
            if c is not None:
                c.stop()
        self.lab.kill(self.anvil)

    def __enter__(self) -> "Federation":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class NodeProc:
    """Test-side handle of one nodectl process: JSON commands in, JSON answers and events out."""

    def __init__(self, proc: subprocess.Popen, name: str, host: Host, ready_timeout: float = 30.0) -> None:
        self.proc, self.name, self.host = proc, name, host
        self._answers: dict[int, dict] = {}
        self._cond = threading.Condition()
        self.events: queue.Queue = queue.Queue()
        self._ids = iter(range(1, 1 << 30))
        self._lines: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()
        self.ready = self.next_event("ready", ready_timeout)
        self.id = self.ready["node"]

    def _pump(self) -> None:
        for line in self.proc.stdout:
            line = line.strip()
            if not line:
                continue
            self._lines.append(line)
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if "id" in msg and "event" not in msg:
                with self._cond:
                    self._answers[msg["id"]] = msg
                    self._cond.notify_all()
            else:
                self.events.put(msg)
        self.events.put({"event": "eof"})
        with self._cond:
            self._cond.notify_all()

    def next_event(self, kind: str, timeout: float = 10.0, **match) -> dict:
        """The next event of `kind` whose fields equal `match` (others are dropped)."""
        end = time.monotonic() + timeout
        while True:
            try:
                ev = self.events.get(timeout=max(0.01, end - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(
                    f"{self.name}: no {kind!r} event in {timeout} s; output {self._lines[-10:]}"
                ) from None
            if ev.get("event") == kind and all(ev.get(k) == v for k, v in match.items()):
                return ev
            if ev.get("event") == "eof":
                raise EOFError(f"{self.name} exited; output {self._lines[-10:]}")

    def call(self, cmd: str, timeout: float = 20.0, **args) -> dict:
        """Send one command; its answer (raises on error answers and timeouts)."""
        rid = next(self._ids)
        self.proc.stdin.write((json.dumps({"id": rid, "cmd": cmd, **args}) + "\n").encode())
        self.proc.stdin.flush()
        end = time.monotonic() + timeout
        with self._cond:
            while rid not in self._answers:
                left = end - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise TimeoutError(f"{self.name}: {cmd} not answered in {timeout} s; output {self._lines[-10:]}")
                self._cond.wait(min(left, 0.2))
            ans = self._answers.pop(rid)
        if not ans.get("ok"):
            raise RuntimeError(f"{self.name}: {cmd} {args} failed: {ans.get('error')}")
        return ans

    def quit(self) -> None:
        if self.proc.poll() is None:
            try:
                self.call("quit", timeout=3)
            except (TimeoutError, RuntimeError, BrokenPipeError, OSError):
                pass
            try:
                self.proc.wait(3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
