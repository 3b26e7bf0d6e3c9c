"""`ntm devnet` / `python -m scripts.devnet`: a whole local federation in one command.

Starts (or resumes) an anvil chain with its state in the data directory, deploys the NodeRegistry
(scripts/deploy.py, idempotent), creates and funds two DC keys, runs two DCs and one Relay Server
as child processes, writes `network.json` into the node home so `ntm register` needs no --dc, and
stops everything on Ctrl-C / SIGTERM. The next start resumes: same chain, same registry address,
same DC keys and SQLite files, so registered nodes stay registered. `--reset` starts afresh.

Defaults (chain id 31337 = anvil's own; ports on 127.0.0.1):
    chain JSON-RPC 8545 · dc1 HTTP 8330, keepalive UDP 4331 · dc2 HTTP 8331, UDP 4332
    rs relay UDP 4340, control HTTP 8340
`--port-offset N` adds N to all of them; `--free-ports` picks free ones (remembered in the data
directory and reused on restart while they stay free).

`--chain URL --deploy-only` is the docker-compose deploy job: keys, funding, deployment file, exit.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import os
import shutil
import signal
import socket
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path


from node import state
from daemon import keystore, startup
from daemon.service import LockHeld, hold_lock
from ntm import keys
from ntm.errors import NtmError
from scripts import deploy as deploy_mod
from scripts.anvil import DEV_KEYS, Anvil, AnvilError
from scripts.procs import Child, dc_child, dying_with_parent, free_port, has_ipv6_loopback

CHAIN_ID = 31337  # anvil's default: wallets and tools know it as "localhost"
DATA_DIR_ENV = "NTM_DEVNET_DIR"
DEFAULT_DATA_DIR = Path("data") / "devnet"
DEPLOYER_KEY_ENV = "NTM_DEPLOYER_KEY"  # hex private key, for --chain
DC_PASSPHRASE_ENV = "NTM_DC_PASSPHRASE"
FUND_WEI = 10**18  # 1 ETH per DC key, topped up when it falls below a tenth of that
N_DCS = 2

MARKER = "devnet.json"  # what makes a directory ours (for --reset) and remembers ports
LOCK_FILE = "devnet.lock"  # holds the devnet's pid; flock'ed while it runs


class DevnetError(NtmError):
    pass


@dataclass
class Ports:
    chain: int = 8545
    dc1: int = 8330
    dc2: int = 8331
    dc1_udp: int = 4331
    dc2_udp: int = 4332
    rs_udp: int = 4340
    rs_http: int = 8340
    dc1_cs: int = 8350
    dc2_cs: int = 8351

    UDP = ("dc1_udp", "dc2_udp", "rs_udp")
    ROLE = {
        "chain": "chain JSON-RPC",
        "dc1": "dc1 HTTP",
        "dc2": "dc2 HTTP",
        "dc1_udp": "dc1 keepalive UDP",
        "dc2_udp": "dc2 keepalive UDP",
        "rs_udp": "relay UDP",
        "rs_http": "relay control HTTP",
        "dc1_cs": "dc1's Cache Server HTTP",
        "dc2_cs": "dc2's Cache Server HTTP",
    }

    @classmethod
    def offset(cls, n: int) -> "Ports":
        ports = cls(**{k: v + n for k, v in asdict(cls()).items()})
        if not all(0 < p < 65536 for p in asdict(ports).values()):
            raise DevnetError(
                f"--port-offset {n} puts ports outside 1..65535 (the defaults span "
                f"{min(asdict(cls()).values())}..{max(asdict(cls()).values())})"
            )
        return ports

    @classmethod
    def free(cls) -> "Ports":
        return cls(**{k: free_port(socket.SOCK_DGRAM if k in cls.UDP else socket.SOCK_STREAM) for k in asdict(cls())})

    def in_use(self, host: str, skip: tuple[str, ...] = ()) -> list[str]:
        """Ports among ours that something else holds right now, as 'role port' strings."""
        busy = []
        for name, port in asdict(self).items():
            if name in skip:
                continue
            kind = socket.SOCK_DGRAM if name in self.UDP else socket.SOCK_STREAM
            with socket.socket(socket.AF_INET, kind) as s:
                if kind == socket.SOCK_STREAM:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind((host, port))
                except OSError:
                    busy.append(f"{self.ROLE[name]} {port}")
        return busy


class _Anvil(Anvil):
    """anvil in its own session: a terminal Ctrl-C reaches only the devnet, which then stops the
    children in order (DCs first, anvil last so it dumps its state after the last transaction)."""

    def command(self) -> list[str]:
        return ["setsid", *super().command()]


def _setsid() -> list[str]:
    return ["setsid"] if shutil.which("setsid") else []


def _run_async(coro):
    """asyncio.run in a helper thread: works even when called from a running loop (`ntm devnet`)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def default_data_dir() -> Path:
    return Path(os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR)


def reset(data_dir: Path) -> None:
    """Wipe a devnet data directory, refusing anything that does not look like one."""
    if not data_dir.exists():
        return
    if any(data_dir.iterdir()) and not (data_dir / MARKER).exists():
        raise DevnetError(f"refusing to wipe {data_dir}: it has no {MARKER}, so it is not a devnet directory")
    shutil.rmtree(data_dir)


# ---------------------------------------------------------------------------------------------- chain work


def dc_key(data_dir: Path, name: str):
    """The DC's chain key from its keystore in the data dir, created on first use."""
    path = data_dir / f"{name}.key.json"
    passphrase = os.environ.get(DC_PASSPHRASE_ENV, "")
    if not path.exists():
        keystore.save_keystore(keys.generate(), path, passphrase)
    return path, keystore.load_keystore(path, passphrase)


async def deploy_and_fund(rpc: str, deployer_key: bytes, data_dir: Path, dcs: list[tuple[str, bytes, str]]) -> dict:
    """scripts/deploy.py's run() (idempotent: reuses a live registry, admits or updates DCs), then
    funding. A fresh registry makes the DCs' SQLite files stale: they are removed."""
    out = data_dir / "deployment.json"
    before = json.loads(out.read_text())["registry"] if out.exists() else None
    log: list[str] = []
    dep = await deploy_mod.deploy(
        rpc, deployer_key, out, [(addr, name, endpoint) for name, addr, endpoint in dcs], report=log.append
    )
    if before and before != dep["registry"]:
        for name, _, _ in dcs:
            (data_dir / f"{name}.sqlite").unlink(missing_ok=True)
    funded = await deploy_mod.fund(rpc, deployer_key, [addr for _, addr, _ in dcs], FUND_WEI)
    return {**dep, "funded": funded, "deploy_log": "\n".join(log)}


# ---------------------------------------------------------------------------------------------- devnet


class Devnet:
    def __init__(
        self,
        data_dir: Path,
        home: Path,
        ports: Ports,
        chain_url: str | None = None,
        deployer_key: bytes | None = None,
        dc_endpoints: list[str] | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        self.data_dir, self.home, self.ports, self.host = Path(data_dir), Path(home), ports, host
        self.chain_url = chain_url
        self.deployer_key = deployer_key if deployer_key is not None else DEV_KEYS[0]
        self.dc_endpoints = dc_endpoints
        self.anvil: Anvil | None = None
        self.dcs: list[Child] = []
        self.css: list[Child] = []  # each DC's Cache Server
        self.rs: Child | None = None
        self.deployment: dict = {}
        self.resumed = False
        self._lock: int | None = None

    @property
    def rpc_url(self) -> str:
        return self.chain_url or f"http://{self.host}:{self.ports.chain}"

    def dc_urls(self) -> list[str]:
        return [f"https://{self.host}:{p}" for p in (self.ports.dc1, self.ports.dc2)]

    def children(self) -> dict[str, int]:
        pids = {}
        if self.anvil is not None and self.anvil.pid:
            pids["anvil"] = self.anvil.pid
        if self.rs is not None and self.rs.proc is not None:
            pids["rs"] = self.rs.pid
        for i, dc in enumerate(self.dcs):
            if dc.proc is not None:
                pids[f"dc{i + 1}"] = dc.pid
        for i, cs in enumerate(self.css):
            if cs.proc is not None:
                pids[f"dc{i + 1}-cs"] = cs.pid
        return pids

    def _claim(self) -> None:
        """One devnet per data dir: a lock the kernel releases when this process dies, however."""
        try:
            self._lock = hold_lock(self.data_dir / LOCK_FILE)
        except LockHeld as exc:
            raise DevnetError(
                f"a devnet (pid {exc.pid or '?'}) already runs with data dir {self.data_dir}; "
                f"stop it first or use another --data-dir"
            ) from None

    def start(self, deploy_only: bool = False) -> "Devnet":
        self._claim()
        try:
            self._start(deploy_only)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, deploy_only: bool) -> None:
        marker = self.data_dir / MARKER
        self.resumed = (self.data_dir / "deployment.json").exists()
        if not deploy_only:
            busy = self.ports.in_use(self.host, skip=("chain",) if self.chain_url else ())
            if busy:
                raise DevnetError(
                    f"port(s) in use: {', '.join(busy)} — is another devnet running? "
                    f"stop it, or use --port-offset N / --free-ports"
                )
        if self.chain_url is None:
            self.anvil = _Anvil(
                state_path=self.data_dir / "chain.json", chain_id=CHAIN_ID, host=self.host, port=self.ports.chain
            )
            self.anvil.preexec = dying_with_parent()  # SIGTERM: anvil dumps its state, then exits
            try:
                self.anvil.start()
            except AnvilError as exc:
                raise DevnetError(str(exc)) from None
        names = [f"dc{i + 1}" for i in range(N_DCS)]
        endpoints = self.dc_endpoints or self.dc_urls()
        dc_keys = [dc_key(self.data_dir, name) for name in names]
        specs = [(name, keys.node_id_of(k), endpoints[i]) for i, (name, (_, k)) in enumerate(zip(names, dc_keys))]
        self.deployment = _run_async(deploy_and_fund(self.rpc_url, self.deployer_key, self.data_dir, specs))
        marker.write_text(
            json.dumps(
                {
                    "ports": asdict(self.ports),
                    "chain": self.chain_url or "anvil",
                    "chain_id": self.deployment["chain_id"],
                    "registry": self.deployment["registry"],
                },
                indent=2,
            )
            + "\n"
        )
        if deploy_only:
            return
        dep_path = self.data_dir / "deployment.json"
        v6 = has_ipv6_loopback()
        advertise = [f"127.0.0.1:{self.ports.rs_udp}"] + ([f"[::1]:{self.ports.rs_udp}"] if v6 else [])
        rs_args = [
            "--rpc-url",
            self.rpc_url,
            "--deployment",
            str(dep_path),
            "--udp-host",
            "::" if v6 else "0.0.0.0",
            "--udp-port",
            str(self.ports.rs_udp),
            "--http-host",
            self.host,
            "--http-port",
            str(self.ports.rs_http),
            "--stream-port",
            "0",
            "--data-dir",
            str(self.data_dir),
        ]
        for a in advertise:
            rs_args += ["--advertise", a]
        self.rs = Child("rs", rs_args, self.data_dir / "rs.log", prefix=_setsid(), die_with_parent=True)
        self._child_start(self.rs, "rs")
        relays = [self.rs.ready["control"]]  # its URL and its certificate's pin
        for i, (name, (key_path, _)) in enumerate(zip(names, dc_keys)):
            http = getattr(self.ports, name)
            udp = getattr(self.ports, f"{name}_udp")
            cs_url = f"http://{self.host}:{getattr(self.ports, f'{name}_cs')}"
            child = dc_child(
                self.data_dir,
                name,
                key_path,
                self.rpc_url,
                dep_path,
                http,
                relays=relays,
                extra=["--udp-port", str(udp), "--cs", cs_url],
                prefix=_setsid(),
                http_host=self.host,
                udp_host=self.host,
                die_with_parent=True,
            )
            self.dcs.append(child)
            self._child_start(child, name)
            cs = Child(
                "cs",
                [
                    "--dc",
                    child.ready["http"],
                    "--key-file",
                    str(key_path),
                    "--data-dir",
                    str(self.data_dir / f"{name}-cs"),
                    "--http-host",
                    self.host,
                    "--http-port",
                    str(getattr(self.ports, f"{name}_cs")),
                ],
                self.data_dir / f"{name}-cs.log",
                prefix=_setsid(),
                die_with_parent=True,
            )
            self.css.append(cs)
            self._child_start(cs, f"{name}'s Cache Server")
        self.write_network()

    @staticmethod
    def _child_start(child: Child, name: str) -> None:
        try:
            child.start()
        except RuntimeError as exc:
            raise DevnetError(f"{name} did not start: {exc}") from None

    def write_network(self) -> Path:
        path = self.home / state.NETWORK_FILE
        state.write_json(
            path,
            {
                "dcs": self.dc_urls(),
                "chain_id": self.deployment["chain_id"],
                # each DC's chain address: `ntm register` pins its TLS certificate to it (§5)
                "dc_addresses": {url: dc.ready["dc"] for url, dc in zip(self.dc_urls(), self.dcs)},
                "registry": self.deployment["registry"],
                "rpc_url": self.rpc_url,
                "relays": [self.rs.ready["http"]] if self.rs else [],
                "devnet": str(self.data_dir.resolve()),
            },
        )
        return path

    def dead(self) -> list[str]:
        """Children that exited on their own."""
        out = []
        if self.anvil is not None and self.anvil.proc is not None and self.anvil.proc.poll() is not None:
            out.append("anvil")
        for name, child in [
            ("rs", self.rs),
            *((f"dc{i + 1}", c) for i, c in enumerate(self.dcs)),
            *((f"dc{i + 1}-cs", c) for i, c in enumerate(self.css)),
        ]:
            if child is not None and child.proc is not None and child.proc.poll() is not None:
                out.append(name)
        return out

    def stop(self) -> None:
        """DCs first (they may still be submitting), then the relay, then anvil (dumps its state)."""
        for child in [*reversed(self.dcs), *self.css, self.rs]:
            if child is not None:
                child.stop()
        if self.anvil is not None:
            self.anvil.stop()
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def info(self) -> dict:
        return {
            "event": "ready",
            "data_dir": str(self.data_dir),
            "resumed": self.resumed,
            "rpc_url": self.rpc_url,
            "chain_id": self.deployment.get("chain_id"),
            "registry": self.deployment.get("registry"),
            "registry_action": self.deployment.get("action"),
            "dcs": [
                {
                    "name": f"dc{i + 1}",
                    "url": url,
                    "address": dc.ready.get("dc"),
                    "udp_ports": dc.ready.get("udp_ports"),
                    "cs": cs.ready.get("url"),
                }
                for i, (url, dc, cs) in enumerate(zip(self.dc_urls(), self.dcs, self.css))
            ],
            "rs": {
                "udp_port": self.rs.ready["udp_port"],
                "http": self.rs.ready["http"],
                "relay": self.rs.ready["relay"],
            }
            if self.rs
            else None,
            "network_file": str(self.home / "network.json"),
            "pids": self.children(),
            "pid": os.getpid(),
        }

    def table(self) -> str:
        i = self.info()
        chain = (
            f"anvil pid {self.anvil.pid}, chain id {i['chain_id']}, state {self.data_dir / 'chain.json'}"
            if self.anvil
            else f"external chain, id {i['chain_id']}"
        )
        rows = [
            ("chain", i["rpc_url"], chain),
            ("registry", i["registry"], f"{i['registry_action']} (block {self.deployment.get('block')})"),
        ]
        for d, dc in zip(i["dcs"], self.dcs):
            rows.append((d["name"], d["url"], f"{d['address']}  keepalive udp {d['udp_ports'][0]}  pid {dc.pid}"))
            rows.append((f"{d['name']} CS", d["cs"], "Cache Server (store-and-forward for offline nodes)"))
        rows.append(("rs", f"udp {', '.join(i['rs']['relay'])}", f"control {i['rs']['http']}  pid {self.rs.pid}"))
        w0, w1 = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
        head = f"NTMobile devnet {'resumed' if self.resumed else 'started'} (data {self.data_dir})"
        lines = (
            [head, ""]
            + [f"  {a:<{w0}}  {b:<{w1}}  {c}" for a, b, c in rows]
            + [
                "",
                f"  network config for `ntm`: {i['network_file']} (default DC: dc1)",
                f"  logs: {self.data_dir}/{{dc1,dc2,rs,dc1-cs,dc2-cs}}.log",
                "",
                "Try:  ntm keygen && ntm register && ntm status",
                "Ctrl-C stops everything; the next start resumes (--reset starts afresh).",
            ]
        )
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The devnet's flags (shared by `ntm devnet` and `python -m scripts.devnet`)."""
    p.add_argument(
        "--data-dir",
        type=Path,
        help=f"chain state, DC keys and databases, logs (default ${DATA_DIR_ENV} or ./{DEFAULT_DATA_DIR})",
    )
    p.add_argument("--reset", action="store_true", help="wipe the data dir first (new chain, registry and DC keys)")
    p.add_argument(
        "--port-offset",
        type=int,
        default=0,
        metavar="N",
        help="add N to every default port (8545, 8330-8331, 4331-4332, 4340, 8340)",
    )
    p.add_argument(
        "--free-ports",
        action="store_true",
        help="use any free ports (remembered in the data dir, reused on restart while free)",
    )
    p.add_argument(
        "--chain", metavar="URL", type=startup.ws_or_http_url, help="use this JSON-RPC chain instead of starting anvil"
    )
    p.add_argument(
        "--deployer-key-file",
        type=Path,
        help="deployer keystore for --chain (passphrase from $NTM_KEY_PASSPHRASE; "
        f"or a hex key in ${DEPLOYER_KEY_ENV})",
    )
    p.add_argument(
        "--dc-endpoint",
        action="append",
        metavar="URL",
        type=startup.http_url,
        help="endpoint to admit for dc1, dc2 on chain (repeat twice; default https://127.0.0.1:PORT)",
    )
    p.add_argument(
        "--deploy-only",
        action="store_true",
        help="keys, funding and deployment file only, then exit (the docker-compose deploy job)",
    )


def _ports(args, data_dir: Path) -> Ports:
    if args.free_ports:
        try:
            saved = Ports(**json.loads((data_dir / MARKER).read_text())["ports"])
            if not saved.in_use("127.0.0.1"):
                return saved
        except (OSError, ValueError, KeyError, TypeError):
            pass
        return Ports.free()
    return Ports.offset(args.port_offset)


def _deployer_key(args) -> bytes | None:
    if args.deployer_key_file:
        return deploy_mod.load_key(key_file=args.deployer_key_file)
    if os.environ.get(DEPLOYER_KEY_ENV):
        return deploy_mod.load_key(hex_key=os.environ[DEPLOYER_KEY_ENV])
    if args.chain:
        raise DevnetError(f"--chain needs a funded deployer key: --deployer-key-file FILE or ${DEPLOYER_KEY_ENV}=HEX")
    return None


def run(args: argparse.Namespace, home: Path) -> None:
    """Start, print the table (or a JSON ready line), wait for SIGINT/SIGTERM, stop. DevnetError on failure."""
    data_dir = args.data_dir or default_data_dir()
    if args.deploy_only and not args.chain:
        raise DevnetError("--deploy-only needs --chain URL")
    if args.dc_endpoint and len(args.dc_endpoint) != N_DCS:
        raise DevnetError(f"--dc-endpoint: give it {N_DCS} times (dc1, dc2) or not at all")
    if args.reset:
        reset(data_dir)
    net = Devnet(
        data_dir,
        home,
        _ports(args, data_dir),
        chain_url=args.chain,
        deployer_key=_deployer_key(args),
        dc_endpoints=args.dc_endpoint,
    )
    stop = {"sig": None}

    def on_signal(signum, _frame):
        stop["sig"] = signum

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            net.start(deploy_only=args.deploy_only)
        except NtmError as exc:  # RegistryError, DeployError, KeystoreError: one line is enough
            raise DevnetError(str(exc)) from None
        if args.deploy_only:
            d = net.deployment
            print(
                json.dumps(
                    {
                        "event": "deployed",
                        **{k: d[k] for k in ("chain_id", "registry", "block", "dcs")},
                        "action": d["action"],
                    }
                )
                if args.json
                else f"registry {d['registry']} on chain {d['chain_id']}: {d['action']}\n"
                + "".join(f"DC {x['hostname']} {x['address']} at {x['endpoint']}\n" for x in d["dcs"])
                + f"wrote {data_dir / 'deployment.json'}",
                flush=True,
            )
            return
        print(json.dumps(net.info()) if args.json else net.table(), flush=True)
        while stop["sig"] is None:
            dead = net.dead()
            if dead:
                raise DevnetError(f"{', '.join(dead)} exited unexpectedly; see the logs in {data_dir}")
            time.sleep(0.2)
        if not args.json:
            print("\nstopping (DCs, relay, then the chain, which saves its state) ...", flush=True)
    finally:
        net.stop()
        for s, h in old.items():
            signal.signal(s, h)
    print(json.dumps({"event": "stopped"}) if args.json else "stopped", flush=True)


def parser(prog: str = "python -m scripts.devnet") -> argparse.ArgumentParser:
    p = startup.OneLineParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("--home", type=Path, help="node home that gets network.json (default $NTM_HOME or ~/.ntm)")
    p.add_argument("--json", action="store_true", help="one JSON line when ready (and one when stopped)")
    add_arguments(p)
    return p


def main(argv: list[str] | None = None, prog: str = "python -m scripts.devnet") -> int:
    p = parser(prog)
    args = p.parse_args(argv)
    try:
        run(args, args.home or state.home())
    except NtmError as exc:
        print(f"devnet: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # the data dir or home is a file, unwritable, the disk full
        print(f"devnet: {exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else ""), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
