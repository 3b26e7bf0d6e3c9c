"""Hostile and heavy load against a real federation on loopback (labkit.dcnet), shared by the
tests that assert on it and the benches that measure it: a Direction Request flood and the DC's
memory, registration storms and the chain catching up, one sender's concurrent uploads to a
Cache Server."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from collections import Counter
from pathlib import Path

from node.cs_client import CsClient, CsClientError, bytes_chunks
from node.dc_client import DcClient, DcError
from ntm import keys, messages, seal
from ntm.record import Domain, NodeTransaction
from ntm.registration import RegistrationRequest
from labkit.dcnet import DcNet, raw_http, register, until


# --- a Direction Request flood (tests/test_dc_abuse.py) ----------------------------------------


def rss_mb(pid: int) -> float:
    """The resident memory of process `pid` (MB), from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


async def flood(url: str, attacker, peer: bytes, n: int) -> dict[str, int]:
    """n Direction Requests on one session, all in flight at once; the answers' codes counted."""
    codes: dict[str, int] = {}
    async with DcClient(url) as dc:
        ws, _ = await dc.open_session(attacker, [])
        for i in range(n):
            await ws.send_json(messages.encode(messages.DirectionRequest(i + 1, keys.checksum(peer), inline=True)))
        for _ in range(n):
            res = messages.decode(messages.DcToNode, await ws.receive_str(timeout=30))
            code = res.error.error if res.error else "served"
            codes[code] = codes.get(code, 0) + 1
        await ws.close()
    return codes


# --- registration storms and the chain (tests/test_dc_crash.py, test_chain_robust.py) ------


async def register_many(url: str, n: int) -> list[bytes]:
    """n fresh nodes register concurrently, not waiting for the chain; all must be acknowledged."""
    async with raw_http() as http:
        async with http.get(url + "/v1/info") as r:
            info = await r.json()
        domain = Domain(info["chain_id"], keys.parse_node_id(info["registry"]))
        dc = keys.parse_node_id(info["dc"])
        now = int(time.time() * 1000)
        bodies, nodes = [], []
        for _ in range(n):
            key = keys.generate()
            rec = NodeTransaction(keys.node_id_of(key), dc, now)
            bodies.append(RegistrationRequest(rec, rec.sign(key, domain), keys.public_bytes(key), ()).to_json())
            nodes.append(rec.node)

        async def post(body):
            async with http.post(url + "/v1/register", json=body) as r:
                assert r.status == 200, await r.text()
                return (await r.json())["status"]

        statuses = await asyncio.gather(*(post(b) for b in bodies))
    assert set(statuses) == {"durable"}
    return nodes


async def all_on_chain(net: DcNet, nodes: list[bytes], dc: bytes, timeout: float = 30) -> None:
    reg = await net.registry()
    try:

        async def check():
            records = [await reg.lookup(n) for n in nodes]
            return all(r is not None and r.dc == dc for r in records)

        await until(check, timeout=timeout, interval=0.5)
    finally:
        await reg.close()


async def register_at(url: str, timestamp_ms: int) -> tuple[bytes, str]:
    """A fresh node registers with a chosen timestamp; (node, "confirmed"/"durable"/... or the DC's refusal code)."""
    key = keys.generate()
    async with DcClient(url) as dc:
        req = RegistrationRequest.signed(key, await dc.info(), timestamp_ms)
        try:
            return keys.node_id_of(key), (await dc.register(req)).status
        except DcError as exc:
            return keys.node_id_of(key), f"refused:{exc.code}"


async def read_metric(url: str, name: str) -> float:
    """One sample of a DC's /metrics, read over HTTP."""
    async with raw_http() as http, http.get(url + "/metrics") as r:
        text = await r.text()
    return next(float(line.split()[1]) for line in text.splitlines() if line.split()[:1] == [name])


# --- one sender's uploads to a Cache Server (tests/test_cs.py) ----------------------------


async def registered(net: DcNet, i: int):
    key = keys.generate()
    await register(net.urls[i], key)
    return key


async def upload(net: DcNet, cs: int, sender, recipients: list, content: bytes, notice: str = "hi") -> str:
    pubs = {keys.node_id_of(k): keys.public_bytes(k) for k in recipients}
    sealer = seal.Sealer(sender, pubs, seal.Meta("test", "svc", "1", notice), int(time.time() * 1000))
    async with CsClient(sender, net.cs_url(cs)) as c:
        res = await c.put(sealer, bytes_chunks(content), len(content))
    return res["item"]


IDLE_S = 2.0  # the restarted CS's --http-idle-timeout: the hostile-socket tests wait this, not 15 s


# 127.0.0.1 is the operator (exempt from the per-network limits); other loopback addresses are not
STRICT_CS = (
    "--sender-quota-mb",
    "1",
    "--recipient-quota-mb",
    "100",
    "--http-idle-timeout",
    str(IDLE_S),
    "--admin-allow",
    "127.0.0.1/32",
)


def sender_bytes(net: DcNet, i: int, sender) -> int:
    with sqlite3.connect(net.cs_dir(i) / "cs.sqlite") as db:
        return db.execute(
            "SELECT coalesce(sum(size), 0) FROM items WHERE sender=?", (keys.node_id_of(sender),)
        ).fetchone()[0]


async def concurrent_uploads(fed: DcNet, n: int = 12, size: int = 300_000) -> tuple[int, Counter]:
    """One sender starts `n` uploads of `size` bytes at once at CS 0 (quota 1 MB): the bytes it
    then has stored, and the uploads' outcomes."""
    sender, bob = await registered(fed, 0), await registered(fed, 0)

    async def one() -> str:
        try:
            await upload(fed, 0, sender, [bob], os.urandom(size))
            return "stored"
        except CsClientError as exc:
            return exc.code

    outcomes = Counter(await asyncio.gather(*(one() for _ in range(n))))
    return sender_bytes(fed, 0, sender), outcomes
