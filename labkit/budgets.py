"""Budgets an outsider cannot spend for others (issue 29 item 5): hostile load from outsiders'
addresses against a real DC, shared by tests/test_budgets.py and bench/abuse.py.

127.0.0.1 is the operator (the DC runs with `--admin-allow 127.0.0.1/32`: exempt from the
per-source limits, reads /metrics); every other loopback address is an outsider, and each
`outsider(i)` is its own /24, so limits per source network see them as different networks.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter

import aiohttp

from node.agent import Node
from node.dc_session import NodeError
from node.dc_client import DcClient, DcError
from ntm import keepalive, keys, messages
from ntm.registration import RegistrationRequest
from scripts.anvil import Anvil
from labkit.dcnet import DcNet, metric, raw_http

ADMIN = "127.0.0.1"
DC_ARGS = ("--admin-allow", f"{ADMIN}/32")
SYBIL_SOURCES, SYBIL_EACH = 20, 10  # 200 fresh identities from 20 networks, as in the issue
FLOODERS = 64  # admitted identities flooding one victim with Direction Requests
FLOOD_INTERVAL_S = 1.0  # each asks once a second: 64 of them ask 4× what a node serves in all (16/s)
RETRY_S = 1.0  # a legitimate peer refused under the flood tries again this much later,
RETRIES = 10  # this many times at most


def outsider(i: int) -> str:
    """A loopback address in its own /24 (not the admin's)."""
    return f"127.{100 + i}.0.1"


@contextlib.asynccontextmanager
async def client_from(url: str, ip: str):
    """A DcClient whose connections leave from `ip`."""
    dc = DcClient(url)
    await dc.close()
    dc._http = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(local_addr=(ip, 0)), timeout=aiohttp.ClientTimeout(total=dc.timeout)
    )
    try:
        yield dc
    finally:
        await dc.close()


async def register_from(url: str, ip: str, key) -> str:
    """Register `key` from `ip` (durable is enough); "durable" or the refusal's code."""
    async with client_from(url, ip) as dc:
        req = RegistrationRequest.signed(key, await dc.info(), int(time.time() * 1000), (), False)
        try:
            return (await dc.register(req, wait_confirmed=False)).status
        except DcError as exc:
            return exc.code


async def sybil_burst(url: str, sources: int = SYBIL_SOURCES, each: int = SYBIL_EACH) -> Counter[str]:
    """`each` fresh identities from each of `sources` networks, all at once; outcomes counted."""
    answers = await asyncio.gather(
        *(register_from(url, outsider(s), keys.generate()) for s in range(sources) for _ in range(each))
    )
    return Counter(answers)


async def new_node_budget(url: str) -> float:
    """The DC's gas budget for new identities, as its operator reads it."""
    async with raw_http() as http, http.get(url + "/metrics") as r:
        value = metric(await r.text(), "ntm_dc_new_node_budget")
    assert value is not None
    return value


async def keepalives(key, welcome: messages.Welcome) -> None:
    """Two keepalive rounds to the DC from a fresh UDP socket: the DC observes the node's mapping
    (else it has "no UDP" and every route needs a relay)."""
    loop = asyncio.get_running_loop()
    sock, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol, local_addr=("127.0.0.1", 0))
    for seq in (1, 2):
        for port in welcome.keepalive_ports:
            sock.sendto(
                keepalive.encode_request(keys.node_id_of(key), seq, bytes.fromhex(welcome.token)), ("127.0.0.1", port)
            )
    await asyncio.sleep(0.2)
    sock.close()


@contextlib.asynccontextmanager
async def dc_for_outsiders(tmp, cs_args: tuple[str, ...] | None = None):
    """anvil and one DC that treats every loopback address but ADMIN as an outsider; with
    `cs_args`, a Cache Server beside it started with them."""
    with Anvil() as chain:
        net = DcNet(tmp, chain)
        await net.deploy(1)
        if cs_args is not None:
            net.with_cache_servers()
        await asyncio.to_thread(net.start_dc, 0, DC_ARGS)
        if cs_args is not None:
            await asyncio.to_thread(net.start_cs, 0, cs_args)
        try:
            yield net
        finally:
            await asyncio.to_thread(net.stop)


async def flood(url: str, victim: bytes, stop: asyncio.Event, n: int = FLOODERS) -> tuple[Counter[str], asyncio.Future]:
    """`n` fresh admitted identities, each with a session, ask for directions to `victim` every
    FLOOD_INTERVAL_S until `stop`; they never answer the handshakes. Returns once all sessions
    are open: their answers (counted as they come) and the task to await after `stop`."""
    flooders = [keys.generate() for _ in range(n)]
    await asyncio.gather(*(register_from(url, ADMIN, k) for k in flooders))
    codes: Counter[str] = Counter()
    ready = asyncio.Event()
    opened = [0]

    async def one(key) -> None:
        async with DcClient(url) as dc:
            ws, welcome = await dc.open_session(key, [])
            await keepalives(key, welcome)  # observed with UDP: its directions go to the victim
            opened[0] += 1
            if opened[0] == n:
                ready.set()

            async def read() -> None:
                async for msg in ws:
                    m = messages.decode(messages.DcToNode, msg.data)
                    if isinstance(m, messages.DirectionResult):
                        codes[m.error.error if m.error else "served"] += 1

            reader = asyncio.create_task(read())
            i = 0
            while not stop.is_set():
                i += 1
                await ws.send_json(messages.encode(messages.DirectionRequest(i, keys.checksum(victim), inline=True)))
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), FLOOD_INTERVAL_S)
            reader.cancel()
            await ws.close()

    task = asyncio.gather(*(one(k) for k in flooders))
    try:
        await asyncio.wait_for(ready.wait(), 60)
    except BaseException:
        task.cancel()
        raise
    return codes, task


async def legit_connects_under_flood(
    url: str, legit: int, flooders: int = FLOODERS, warmup_s: float = 2.0
) -> tuple[list[float], Counter[str], Counter[str]]:
    """A victim node flooded by `flooders` identities; `legit` legitimate peers (online before)
    each connect once, one after another, once the flood runs, retrying a refusal after RETRY_S as an application
    would. Returns their connect times (s, retries included), the refusals they got by code, and
    the flooders' answers."""
    victim_key, keys_ = keys.generate(), [keys.generate() for _ in range(legit)]
    await asyncio.gather(*(register_from(url, ADMIN, k) for k in [victim_key, *keys_]))
    victim = await Node.start(victim_key, url, host="127.0.0.1", port=0)
    peers = [await Node.start(k, url, host="127.0.0.1", port=0) for k in keys_]  # online before the flood
    stop = asyncio.Event()
    times: list[float] = []
    refusals: Counter[str] = Counter()
    try:
        codes, task = await flood(url, victim.id, stop, flooders)
        await asyncio.sleep(warmup_s)  # the flood has drained what it can
        for peer in peers:
            t0 = time.monotonic()
            for attempt in range(RETRIES):
                try:
                    await peer.connect(victim.id)
                    break
                except NodeError as exc:
                    refusals[exc.code] += 1
                    if attempt == RETRIES - 1:
                        raise
                    await asyncio.sleep(RETRY_S)
            times.append(time.monotonic() - t0)
        stop.set()
        await task
    finally:
        stop.set()
        for node in (victim, *peers):
            await node.close()
    return times, refusals, codes
