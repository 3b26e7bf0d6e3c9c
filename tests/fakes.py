"""In-memory stand-ins for the edges, for the fast test layer (as wireguard-go's conn/bindtest):

  FakeChain / FakeRegistry   the NodeRegistry's rules and events, no chain (ntm.registry.RegistryView)
  MemoryNetwork              datagram delivery between Binds (node.endpoint.Bind), no sockets
  FakeClock                  monotonic and wall time that tests move by hand (ntm.clock.Clock)
  FederationRouter           DC-to-DC/RS requests delivered to in-process handlers, no HTTP
  fake_dc                    a Coordinator wired by dc/wiring.py on a FakeChain and a real Store

The real-process tests stay the reference; these make the logic around them testable in ms.
"""

from __future__ import annotations

import asyncio
import copy
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

from dc import wiring
from dc.cache import RegistryCache
from dc.coordinator import Coordinator
from dc.federation import Transport
from dc.store import Store
from ntm import keys, record
from ntm.clock import Clock
from ntm.errors import SignatureError
from ntm.registry import BlockRef, DcInfo, OnChainRecord, RegistryError, RegistryEvent, SubmitResult


# --- chain -----------------------------------------------------------------------------------
class FakeChain:
    """One registry's state, applied with the contract's rules (docs/PROTOCOL.md §3)."""

    def __init__(self, chain_id: int = 31337, address: bytes = b"\x5f" * 20, clock: Clock | None = None) -> None:
        self.chain_id, self.address = chain_id, address
        self.domain = record.Domain(chain_id, address)
        self.clock = clock or Clock()
        self.nodes: dict[bytes, OnChainRecord] = {}
        self.dcs: dict[bytes, DcInfo] = {}
        self.log: list[RegistryEvent] = []
        self.block = 0
        self.hashes = [os.urandom(32)]  # per block number; a block made after a rollback gets a new one
        self.lookups = 0  # chain reads, for tests that count them
        self.down = False  # True: every call fails as an unreachable RPC would
        self._changed = asyncio.Event()

    def _emit(self, **kw: Any) -> None:
        self.log.append(RegistryEvent(block=self.block, log_index=len(self.log), tx_hash=b"\x00" * 32, **kw))
        self._changed.set()

    def _mine(self) -> None:
        self.block += 1
        self.hashes.append(os.urandom(32))

    def snapshot(self) -> dict:
        return copy.deepcopy({k: getattr(self, k) for k in ("nodes", "dcs", "log", "block", "hashes")})

    def restore(self, snap: dict) -> None:
        """Back to an older state, as a chain node restarted from an old state file."""
        for k, v in copy.deepcopy(snap).items():
            setattr(self, k, v)

    def admit(self, dc: bytes, hostname: str, endpoint: str) -> None:
        self._mine()
        self.dcs[dc] = DcInfo(dc, True, hostname, endpoint)
        self._emit(kind="DCAdmitted", dc=dc, hostname=hostname, endpoint=endpoint)

    def remove(self, dc: bytes) -> None:
        self._mine()
        old = self.dcs[dc]
        self.dcs[dc] = DcInfo(dc, False, old.hostname, old.endpoint)
        self._emit(kind="DCRemoved", dc=dc)

    def _reason(self, sender: bytes, rec: record.NodeTransaction, sig: bytes) -> str | None:
        try:
            rec.verify(sig, self.domain)
        except SignatureError:
            return "NodeRegistry: bad signature"
        old = self.nodes.get(rec.node)
        if old is not None and old.revoked:
            return "NodeRegistry: node revoked"
        if old is not None and rec.timestamp <= old.timestamp:
            return "NodeRegistry: stale timestamp"
        if rec.timestamp > self.clock.wall_ms() + record.MAX_FUTURE_MS:
            return "NodeRegistry: timestamp too far in future"
        return None

    def register(self, sender: bytes, items: list[tuple[record.NodeTransaction, bytes]]) -> SubmitResult:
        info = self.dcs.get(sender)
        if info is None or not info.active:
            raise RegistryError("registerBatch reverted", "NodeRegistry: not an active DC")
        self._mine()
        rejected, reasons = [], []
        for rec, sig in items:
            why = "NodeRegistry: wrong DC" if rec.dc != sender else self._reason(sender, rec, sig)
            if why is not None:
                rejected.append(rec.node)
                reasons.append(why)
                continue
            self.nodes[rec.node] = OnChainRecord(rec.dc, rec.timestamp, rec.revoked)
            self._emit(
                kind="NodeRevoked" if rec.revoked else "NodeRegistered",
                node=rec.node,
                dc=rec.dc,
                timestamp=rec.timestamp,
            )
        return SubmitResult(
            bytes([self.block % 256]) * 32,
            self.block,
            30_000 * len(items),
            len(items) - len(rejected),
            rejected,
            reasons,
            self.hashes[self.block],
        )


class FakeRegistry:
    """One DC's client of a FakeChain (the RegistryView a Coordinator is given)."""

    def __init__(self, chain: FakeChain, sender: bytes) -> None:
        self.chain, self.sender = chain, sender
        self.chain_id, self.address = chain.chain_id, chain.address

    @property
    def domain(self) -> record.Domain:
        return self.chain.domain

    def _up(self) -> FakeChain:
        if self.chain.down:
            raise RegistryError("cannot reach the chain RPC at fake://chain: connection refused")
        return self.chain

    async def lookup(self, node: bytes) -> OnChainRecord | None:
        self._up().lookups += 1
        return self.chain.nodes.get(node)

    async def block_number(self) -> int:
        return self._up().block

    async def head(self) -> BlockRef:
        return BlockRef(self._up().block, self.chain.hashes[self.chain.block], int(self.chain.clock.wall_ms() // 1000))

    async def block(self, number: int) -> BlockRef | None:
        if number > self._up().block:
            return None
        return BlockRef(number, self.chain.hashes[number], 0)

    async def get_events(self, from_block: int, to_block: int) -> list[RegistryEvent]:
        return [ev for ev in self._up().log if from_block <= ev.block <= to_block]

    async def balance(self) -> tuple[int, int]:
        self._up()
        return 10**18, 10**9

    async def mined(self, tx_hash: bytes) -> int | None:
        return self._up().block

    def forget_nonce(self) -> None:
        pass

    async def dcs(self) -> list[DcInfo]:
        return list(self.chain.dcs.values())

    async def dc(self, address: bytes) -> DcInfo | None:
        return self.chain.dcs.get(address)

    async def submit(self, items: list[tuple[record.NodeTransaction, bytes]]) -> SubmitResult:
        return self._up().register(self.sender, items)

    async def events(self, from_block: int, kinds: tuple[str, ...] | None = None) -> AsyncIterator[RegistryEvent]:
        seen = 0
        while True:
            while seen < len(self.chain.log):
                ev = self.chain.log[seen]
                seen += 1
                if ev.block >= from_block and (kinds is None or ev.kind in kinds):
                    yield ev
            self.chain._changed.clear()
            await self.chain._changed.wait()


# --- datagrams -------------------------------------------------------------------------------
Receive = Callable[[bytes, Any], None]


@dataclass
class MemoryBind:
    """A bound "socket" on a MemoryNetwork (implements node.endpoint.Bind)."""

    net: MemoryNetwork
    local_addr: tuple[str, int]
    receive: Receive
    family: int = socket.AF_INET
    closed: bool = False

    def sendto(self, data: bytes, addr: Any) -> None:
        if self.closed:
            raise OSError("bind is closed")
        self.net.deliver(self.local_addr, (str(addr[0]), int(addr[1])), bytes(data))

    def send_batch(self, items: list[tuple[bytes, Any]]) -> None:
        for data, addr in items:
            self.sendto(data, addr)

    def send_run(self, buf: memoryview, ends: list[int], addr: Any) -> None:
        for start, end in zip([0, *ends], ends):
            self.sendto(buf[start:end], addr)

    def close(self) -> None:
        self.closed = True
        self.net.binds.pop(self.local_addr, None)


@dataclass
class MemoryNetwork:
    """Delivers each datagram on the next loop iteration to the bind at its address; datagrams to
    nowhere vanish (as UDP). `sent` records (source, destination, bytes) for assertions, and
    `drop` (a predicate) loses datagrams on purpose."""

    binds: dict[tuple[str, int], MemoryBind] = field(default_factory=dict)
    sent: list[tuple[tuple[str, int], tuple[str, int], bytes]] = field(default_factory=list)
    drop: Callable[[tuple[str, int], tuple[str, int], bytes], bool] | None = None
    next_port: int = 40000

    def binder(self, ip: str) -> Callable[[str | None, int, Receive, Callable[[], None]], Awaitable[MemoryBind]]:
        """A node.endpoint.Binder that binds on `ip` of this network (port 0: the next free one)."""

        async def bind(host: str | None, port: int, receive: Receive, on_error: Callable[[], None]) -> MemoryBind:
            if port == 0:
                self.next_port += 1
                port = self.next_port
            addr = (ip, port)
            if addr in self.binds:
                raise OSError(f"{ip}:{port} is in use")
            b = MemoryBind(self, addr, receive)
            self.binds[addr] = b
            return b

        return bind

    def deliver(self, src: tuple[str, int], dst: tuple[str, int], data: bytes) -> None:
        self.sent.append((src, dst, data))
        if self.drop is not None and self.drop(src, dst, data):
            return
        target = self.binds.get(dst)
        if target is not None:
            asyncio.get_running_loop().call_soon(target.receive, data, src)


# --- time ------------------------------------------------------------------------------------
class FakeClock(Clock):
    """Monotonic and wall time that only move when told (`advance`)."""

    def __init__(self, now: float = 1000.0, wall: float = 1_800_000_000.0) -> None:
        t = {"now": now, "wall": wall}
        object.__setattr__(self, "_t", t)
        object.__setattr__(self, "now", lambda: t["now"])
        object.__setattr__(self, "wall", lambda: t["wall"])

    def advance(self, seconds: float) -> None:
        self._t["now"] += seconds
        self._t["wall"] += seconds

    def step_wall(self, seconds: float) -> None:
        """An NTP step: wall time jumps, monotonic time does not."""
        self._t["wall"] += seconds


# --- federation ------------------------------------------------------------------------------
Handler = Callable[[dict], Awaitable[dict]]


class FederationRouter:
    """Routes a FederationClient's POSTs to in-process handlers by URL; a handler's exception is
    answered as the HTTP adapter would (status and {"error", "message"})."""

    def __init__(self, error_for: Callable[[Exception], tuple[int, dict]]) -> None:
        self.routes: dict[str, Handler] = {}
        self.error_for = error_for
        self.calls: list[str] = []

    def route(self, url: str, handler: Handler) -> None:
        self.routes[url.rstrip("/")] = handler

    async def post(self, url: str, body: dict) -> tuple[int, Any]:
        self.calls.append(url)
        handler = self.routes.get(url.rstrip("/"))
        if handler is None:
            raise OSError(f"connection refused: {url}")
        try:
            return 200, await handler(body)
        except Exception as exc:  # noqa: BLE001 - mapped like the HTTP middleware maps it
            return self.error_for(exc)


def node_key_and_id() -> tuple[Any, bytes]:
    k = keys.generate()
    return k, keys.node_id_of(k)


def fake_dc(
    chain: FakeChain, key: Any, db_dir: Path, name: str, relays: list[str], transport: Transport | None = None
) -> Coordinator:
    """DC `name` (key `key`, already admitted on `chain`) on the chain's clock, its SQLite store
    in `db_dir`; its registry cache not loaded yet."""
    addr = keys.node_id_of(key)
    reg = FakeRegistry(chain, addr)
    store = Store(db_dir / f"{name}.sqlite", addr)
    return wiring.build(
        key, reg, store, RegistryCache(reg), name, relays, (4331, 4332), clock=chain.clock, transport=transport
    )
