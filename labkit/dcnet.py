"""A federation for integration tests: anvil, a deployed registry, DC keystores and DC processes."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from aiohttp import web

from daemon import keystore, tlspin
from node.dc_client import DcClient
from ntm import keys
from ntm.registration import RegistrationRequest
from chain.registry import Registry
from scripts.anvil import DEV_KEYS, Anvil
from scripts.procs import READY_TIMEOUT_S, Child, dc_child, free_port, has_ipv6_loopback, rs_child


@dataclass
class DcNet:
    """anvil + registry + DCs; `start_dc(i)` (re)starts DC i from its key, port and SQLite file."""

    workdir: Path
    chain: Anvil
    registry_address: bytes = b""
    deployment: Path = Path()
    dc_keys: list = field(default_factory=list)
    ports: list[int] = field(default_factory=list)
    dcs: list[Child | None] = field(default_factory=list)
    relays: list[str] = field(default_factory=list)  # RS control URLs handed to every DC
    rs: Child | None = None
    cs_ports: list[int] = field(default_factory=list)  # each DC's Cache Server (with_cache_servers)
    css: list[Child | None] = field(default_factory=list)

    tls: bool = True  # False: every DC with --insecure-plain-http (development mode)

    @property
    def urls(self) -> list[str]:
        scheme = "https" if self.tls else "http"
        return [f"{scheme}://127.0.0.1:{p}" for p in self.ports]

    async def deploy(self, n_dcs: int, registry: bytes | None = None) -> None:
        """A fresh registry with `n_dcs` DCs admitted; or, with `registry`, those DCs admitted to
        that one, already on the chain (labkit/seed.py's cached chains: its owner is DEV_KEYS[0] too)."""
        if registry is None:
            reg = await Registry.deploy(self.chain.url, DEV_KEYS[0])
        else:
            reg = await Registry.connect(self.chain.url, registry, DEV_KEYS[0])
        self.registry_address = reg.address
        for i in range(n_dcs):
            key = keys.private_key(DEV_KEYS[1 + i])
            self.dc_keys.append(key)
            keystore.save_keystore(key, self.workdir / f"dc{i + 1}.key.json")
            self.ports.append(free_port())
            await reg.admit_dc(keys.node_id_of(key), f"dc{i + 1}", self.urls[-1])
            tlspin.expect(self.urls[-1], keys.node_id_of(key))  # this process's clients pin it to its chain key
        self.deployment = self.workdir / "deployment.json"
        self.deployment.write_text(
            json.dumps({"chain_id": reg.chain_id, "registry": keys.checksum(reg.address), "block": 0})
        )
        await reg.close()
        self.dcs = [None] * n_dcs

    def dc_args(self, i: int) -> list[str]:
        """`ntm register`'s flags for DC i: its URL and the chain address its certificate is bound
        to (or, in development mode, the flag that allows plain HTTP)."""
        return [
            "--dc",
            self.urls[i],
            *(
                ["--dc-address", keys.checksum(keys.node_id_of(self.dc_keys[i]))]
                if self.tls
                else [tlspin.INSECURE_FLAG]
            ),
        ]

    def start_dc(self, i: int, extra: tuple[str, ...] = (), timeout: float = READY_TIMEOUT_S) -> Child:
        """`timeout`: for its ready line (a DC is ready once it has read the whole registry)."""
        cs = ["--cs", self.cs_url(i)] if i < len(self.cs_ports) else []
        plain = [] if self.tls else [tlspin.INSECURE_FLAG]
        child = dc_child(
            self.workdir,
            f"dc{i + 1}",
            self.workdir / f"dc{i + 1}.key.json",
            self.chain.url,
            self.deployment,
            self.ports[i],
            relays=self.relays,
            extra=[*cs, *plain, *extra],
        ).start(timeout)
        self.dcs[i] = child
        return child

    def cs_url(self, i: int) -> str:
        return f"http://127.0.0.1:{self.cs_ports[i]}"

    def with_cache_servers(self) -> None:
        """Give every DC a Cache Server port (before start_dc, which then announces it)."""
        self.cs_ports = [free_port() for _ in self.ports]
        self.css = [None] * len(self.ports)

    def start_cs(self, i: int, extra: tuple[str, ...] = ()) -> Child:
        """DC i's Cache Server (data in workdir/dc<i>-cs), signing notices with DC i's key."""
        child = Child(
            "cs",
            [
                "--dc",
                self.urls[i],
                "--key-file",
                str(self.workdir / f"dc{i + 1}.key.json"),
                "--data-dir",
                str(self.cs_dir(i)),
                "--http-port",
                str(self.cs_ports[i]),
                *extra,
            ],
            self.workdir / f"dc{i + 1}-cs.log",
        ).start()
        self.css[i] = child
        return child

    def cs_dir(self, i: int) -> Path:
        return self.workdir / f"dc{i + 1}-cs"

    def start_rs(self) -> Child:
        """A relay on 127.0.0.1 + ::1 that records what it forwards (to prove it sees only ciphertext)."""
        port = free_port(socket.SOCK_DGRAM)
        v6 = ["--advertise", f"[::1]:{port}"] if has_ipv6_loopback() else []
        self.rs = rs_child(
            self.chain.url,
            self.deployment,
            self.workdir,
            *["--advertise", f"127.0.0.1:{port}", *v6, "--capture", str(self.workdir / "relay-capture.hex")],
            udp_port=port,
        ).start()
        self.relays = [self.rs.ready["control"]]  # its URL and its certificate's pin
        return self.rs

    def stop(self) -> None:
        for child in [*self.dcs, *self.css, self.rs]:
            if child is not None:
                child.stop()

    def restart_chain(self, state_path: Path | None = None) -> Anvil:
        """Stop the chain (if running) and start it on the same port from `state_path` (default:
        its own state file, as dumped when it stopped): a chain outage, or a rollback to an older state."""
        port, state = self.chain.port, state_path or self.chain.state_path
        self.chain.stop()
        self.chain = Anvil(state_path=state, port=port).start()
        return self.chain

    async def registry(self) -> Registry:
        return await Registry.connect(self.chain.url, self.registry_address)


@contextlib.asynccontextmanager
async def cs_federation(workdir: Path, cs_args: tuple[str, ...] = ()):
    """anvil, two DCs, and a Cache Server beside each (started with `cs_args`)."""
    with Anvil() as chain:
        net = DcNet(workdir, chain)
        await net.deploy(2)
        net.with_cache_servers()
        try:
            for i in range(2):
                net.start_dc(i)
                net.start_cs(i, cs_args)
            yield net
        finally:
            net.stop()


@contextlib.asynccontextmanager
async def relay_federation(workdir: Path):
    """anvil, the registry, one RS, DC1 and DC2 on loopback; all stopped on exit (a DC that fails
    to start leaves nothing running)."""
    with Anvil() as chain:
        net = DcNet(workdir, chain)
        await net.deploy(2)
        try:
            net.start_rs()
            net.start_dc(0)
            net.start_dc(1)
            yield net
        finally:
            net.stop()


@contextlib.asynccontextmanager
async def node_federation(node_cls):
    """A relay_federation in a scratch directory and `start(url)`: a freshly registered node of
    `node_cls` (node.agent.Node or node.api.AppNode) homed at that DC; every node closed on exit."""
    started: list = []

    async def start(url: str):
        key = keys.generate()
        await register(url, key)
        node = await node_cls.start(key, url, host="127.0.0.1", port=0)
        started.append(node)
        return node

    with tempfile.TemporaryDirectory() as tmp:
        async with relay_federation(Path(tmp)) as net:
            try:
                yield net, start
            finally:
                for node in started:
                    await node.close()


def raw_http() -> aiohttp.ClientSession:
    """A client that checks no certificate: for tests that poke a DC's handlers with raw requests
    (what its channel authenticates is tested in tests/test_dc_tls.py)."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=False))


class RecordingProxy:
    """A TCP proxy on 127.0.0.1 that keeps every byte it passes, both ways: an on-path observer
    (`start()` gives its port; `seen` what crossed)."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream, self.seen = upstream, bytearray()

    async def pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                self.seen += data
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection(*self.upstream)
        await asyncio.gather(self.pipe(reader, up_w), self.pipe(up_r, writer))

    async def start(self) -> int:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]


@contextlib.asynccontextmanager
async def local_app(app: web.Application):
    """Serve an aiohttp app on 127.0.0.1 and a free port; yields its base URL (a stub DC, a proxy)."""
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def stateful_net(workdir: Path, n_dcs: int = 1):
    """A DcNet on an anvil that keeps its state in workdir/chain.json (so it can be restarted)."""
    workdir.mkdir(parents=True, exist_ok=True)
    net = DcNet(workdir, Anvil(state_path=workdir / "chain.json").start())
    try:
        await net.deploy(n_dcs)
        yield net
    finally:
        net.stop()
        net.chain.stop()


async def register(url: str, key, local_addrs: tuple[str, ...] = (), revoked: bool = False) -> dict:
    """Register (or revoke) `key` at the DC at `url` and wait for the chain."""
    async with DcClient(url) as dc:
        req = RegistrationRequest.signed(key, await dc.info(), int(time.time() * 1000), local_addrs, revoked)
        return await dc.register(req)


async def revoke(url: str, key) -> dict:
    return await register(url, key, revoked=True)


async def until(predicate, timeout: float = 10.0, interval: float = 0.05):
    """Poll an async or sync predicate until truthy; returns its value or raises AssertionError."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(interval)


class CountingRpc:
    """A JSON-RPC pass-through to the chain that counts the methods a DC calls."""

    def __init__(self, upstream: str) -> None:
        self.upstream, self.calls, self.url = upstream, collections.Counter(), ""

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        msg = json.loads(body)
        for m in msg if isinstance(msg, list) else [msg]:
            self.calls[m.get("method")] += 1
        async with (
            aiohttp.ClientSession() as http,
            http.post(self.upstream, data=body, headers={"Content-Type": "application/json"}) as r,
        ):
            return web.Response(body=await r.read(), content_type="application/json")

    async def __aenter__(self) -> "CountingRpc":
        app = web.Application()
        app.router.add_post("/", self.handle)
        self._served = local_app(app)
        self.url = await self._served.__aenter__() + "/"
        return self

    async def __aexit__(self, *exc) -> None:
        await self._served.__aexit__(*exc)


def metric(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in Prometheus text (None if absent), parsed by prometheus_client."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return None
