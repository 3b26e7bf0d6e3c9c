"""A long-lived node driver for the NAT lab: one `node.agent.Node`, JSON commands on stdin, JSON
lines on stdout (answers carry the command's "id"; events carry "event").

    nodectl.py --dc URL [--keepalive S] [--name N]
    -> {"event": "ready", "node": "0x…", "observed": "ip:port", "local": [...]}

Commands ({"id": n, "cmd": ..., ...} → {"id": n, "ok": true, ...} or {"ok": false, "error": ...}):
  connect peer [relay]         open a tunnel; answer: tunnel (its ID), kind, via, peer_addr, setup_ms
  exchange tunnel count        echo round trips (both directions carry data); rtt_ms list
  info tunnel                  kind, via, peer_addr, path, redirects, probes
  transfer tunnel chunks size rate   start a reliable transfer (seq + ack + retransmit)
  transfer_result tunnel timeout     wait for it: sha256, retransmits, elapsed, max_ack_gap
  received tunnel              receiver side: chunks, sha256 when complete, max_gap (interruption)
  blast tunnel seconds size    unreliable flood for goodput; the receiver counts in `received`
  echo_once tunnel timeout     one echo on the tunnel as it is now: ok, ms (keepalive test)
  moved                        tell the agent the network changed (like an OS notification)
  status / close tunnel / quit
Events: {"event": "accepted", "tunnel", "peer", "kind", "via", "peer_addr"}.

App messages inside the tunnel (this driver's own framing, first byte): E echo request, R echo
reply, D data chunk (seq u32, total u32, bytes), A ack (seq u32), B blast filler.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from node.agent import Node, Tunnel, local_addrs_towards  # noqa: E402
from ntm.registration import RegistrationRequest  # noqa: E402
from node.dc_client import DcClient  # noqa: E402
from ntm import keys  # noqa: E402
from ntm.errors import NtmError  # noqa: E402

SEQ = struct.Struct(">II")
ACK = struct.Struct(">I")
RTO_S = 0.25  # retransmit an unacknowledged chunk after this long (lab RTT is < 1 ms)
WINDOW = 64  # chunks in flight


def emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def fmt_addr(addr) -> str | None:
    if addr is None:
        return None
    ip = addr[0][7:] if addr[0].startswith("::ffff:") else addr[0]
    return f"[{ip}]:{addr[1]}" if ":" in ip else f"{ip}:{addr[1]}"


class App:
    """Per-tunnel application state: echo, reliable transfer (both roles), blast counting."""

    def __init__(self, t: Tunnel) -> None:
        self.t = t
        self.echo_waiters: dict[bytes, asyncio.Future] = {}
        self.rx: dict[int, bytes] = {}
        self.rx_total = None
        self.rx_times: list[float] = []
        self.acked: set[int] = set()
        self.tx_task: asyncio.Task | None = None
        self.blast_bytes = 0
        self.blast_first = self.blast_last = 0.0
        t.channel.set_receiver(self.on_data)

    def send(self, data: bytes) -> bool:
        try:
            self.t.channel.send_nowait(data)
            return True
        except NtmError:
            return False

    def on_data(self, data: bytes) -> None:
        kind, body = data[:1], data[1:]
        if kind == b"E":
            self.send(b"R" + body)
        elif kind == b"R":
            fut = self.echo_waiters.pop(body, None)
            if fut is not None and not fut.done():
                fut.set_result(time.monotonic())
        elif kind == b"D":
            seq, total = SEQ.unpack_from(body)
            self.rx_total = total
            if seq not in self.rx:
                self.rx[seq] = body[SEQ.size :]
                self.rx_times.append(time.monotonic())
            self.send(b"A" + ACK.pack(seq))
        elif kind == b"A":
            self.acked.add(ACK.unpack(body)[0])
        elif kind == b"B":
            now = time.monotonic()
            self.blast_first = self.blast_first or now
            self.blast_last = now
            self.blast_bytes += len(data)

    async def echo(self, timeout: float) -> float | None:
        nonce = os.urandom(8)
        fut = asyncio.get_running_loop().create_future()
        self.echo_waiters[nonce] = fut
        t0 = time.monotonic()
        self.send(b"E" + nonce)
        try:
            return (await asyncio.wait_for(fut, timeout)) - t0
        except asyncio.TimeoutError:
            return None
        finally:
            self.echo_waiters.pop(nonce, None)

    async def transfer(self, chunks: int, size: int, rate: float) -> dict:
        data = random.Random(chunks * 7919 + size).randbytes(chunks * size)
        sent_at: dict[int, float] = {}
        nxt, retransmits, t0 = 0, 0, time.monotonic()
        ack_times, last_acked = [], 0
        while len(self.acked) < chunks:
            now = time.monotonic()
            if len(self.acked) != last_acked:
                ack_times.append(now)
                last_acked = len(self.acked)
            for seq, ts in list(sent_at.items()):
                if seq in self.acked:
                    del sent_at[seq]
                elif now - ts > RTO_S:
                    retransmits += 1
                    sent_at[seq] = now
                    self.send(b"D" + SEQ.pack(seq, chunks) + data[seq * size : (seq + 1) * size])
            due = int((now - t0) * rate) + 1
            while nxt < chunks and nxt < due and len(sent_at) < WINDOW:
                sent_at[nxt] = now
                self.send(b"D" + SEQ.pack(nxt, chunks) + data[nxt * size : (nxt + 1) * size])
                nxt += 1
            await asyncio.sleep(0.005)
        gaps = [b - a for a, b in zip(ack_times, ack_times[1:])]
        return {
            "sha256": hashlib.sha256(data).hexdigest(),
            "chunks": chunks,
            "retransmits": retransmits,
            "elapsed": time.monotonic() - t0,
            "max_ack_gap": max(gaps, default=0.0),
        }

    def received(self) -> dict:
        done = self.rx_total is not None and len(self.rx) == self.rx_total
        gaps = [(b - a, a) for a, b in zip(self.rx_times, self.rx_times[1:])]
        gap, at = max(gaps, default=(0.0, 0.0))
        out = {
            "chunks": len(self.rx),
            "total": self.rx_total,
            "done": done,
            "max_gap": gap,
            "blast_bytes": self.blast_bytes,
            "blast_s": self.blast_last - self.blast_first,
        }
        if done:
            out["sha256"] = hashlib.sha256(b"".join(self.rx[i] for i in range(self.rx_total))).hexdigest()
        return out

    async def blast(self, seconds: float, size: int) -> dict:
        filler = b"B" + bytes(size - 1)
        sent, t0 = 0, time.monotonic()
        while time.monotonic() - t0 < seconds:
            for _ in range(32):
                self.send(filler)
                sent += 1
            await asyncio.sleep(0)
        return {"sent": sent, "bytes": sent * size, "elapsed": time.monotonic() - t0}


class Driver:
    def __init__(self, node: Node) -> None:
        self.node = node
        self.apps: dict[str, App] = {}

    def describe(self, t: Tunnel) -> dict:
        return {
            "tunnel": t.id.hex(),
            "peer": keys.checksum(t.peer),
            "kind": t.kind,
            "role": t.role,
            "via": t.channel.via,
            "peer_addr": fmt_addr(t.channel.peer_addr),
            "path": t.channel.path_id.hex(),
            "redirects": t.redirects,
            "probes": t.probes,
        }

    def adopt(self, t: Tunnel) -> App:
        app = App(t)
        self.apps[t.id.hex()] = app
        return app

    async def accept_loop(self) -> None:
        while True:
            t = await self.node.accept()
            self.adopt(t)
            emit({"event": "accepted", **self.describe(t)})

    async def handle(self, m: dict) -> dict:
        cmd = m["cmd"]
        app = self.apps.get(m.get("tunnel", ""))
        if cmd == "connect":
            t0 = time.monotonic()
            t = await self.node.connect(
                keys.parse_node_id(m["peer"]), force_relay=m.get("relay", False), fresh=True
            )  # the lab measures new tunnels
            setup = (time.monotonic() - t0) * 1000
            self.adopt(t)
            return {**self.describe(t), "setup_ms": round(setup, 2)}
        if cmd == "exchange":
            rtts = []
            for _ in range(m.get("count", 3)):
                rtt = await app.echo(m.get("timeout", 2.0))
                if rtt is None:
                    raise NtmError("echo timed out")
                rtts.append(round(rtt * 1000, 3))
            return {"rtt_ms": rtts, **self.describe(app.t)}
        if cmd == "echo_once":
            rtt = await app.echo(m.get("timeout", 2.0))
            return {
                "echo": rtt is not None,
                "ms": None if rtt is None else round(rtt * 1000, 2),
                **self.describe(app.t),
            }
        if cmd == "info":
            return self.describe(app.t)
        if cmd == "transfer":
            app.tx_task = asyncio.create_task(app.transfer(m["chunks"], m["size"], m["rate"]))
            return {}
        if cmd == "transfer_result":
            return await asyncio.wait_for(asyncio.shield(app.tx_task), m.get("timeout", 30))
        if cmd == "received":
            return app.received()
        if cmd == "blast":
            return await app.blast(m.get("seconds", 1.0), m.get("size", 1200))
        if cmd == "moved":
            self.node.network_changed("told by the driver")
            return {}
        if cmd == "status":
            return self.node.status()
        if cmd == "secrets":  # what an on-path reader must never see (tests/lab/test_lab_onpath.py)
            return {
                "token": self.node.session.token.hex(),
                "relay_keys": [s.relay.token.hex() for s in self.node.endpoint.sessions.values() if s.relay],
            }
        if cmd == "close":
            await app.t.channel.close()
            self.apps.pop(m["tunnel"], None)
            return {}
        raise ValueError(f"unknown command {cmd!r}")

    async def run_command(self, m: dict) -> None:
        try:
            res = await self.handle(m)
            emit({"id": m.get("id"), "ok": True, **res})
        except Exception as exc:  # noqa: BLE001 - every failure goes back to the test as an answer
            emit({"id": m.get("id"), "ok": False, "error": f"{type(exc).__name__}: {exc}"})


async def register(key, dc_url: str, pin: bytes | None) -> None:
    async with DcClient(dc_url, pin=pin) as dc:
        info = await dc.info()
        host = dc_url.split("//")[1].rsplit(":", 1)[0].strip("[]")
        await dc.register(
            RegistrationRequest.signed(key, info, int(time.time() * 1000), local_addrs_towards(host, 4330, (4, 6)))
        )


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dc", required=True)
    p.add_argument("--dc-address", help="the DC's chain address, its TLS certificate's pin (https://)")
    p.add_argument("--insecure-plain-http", action="store_true", help="the DC is plain http:// (development)")
    p.add_argument("--keepalive", type=float, default=2.0)
    p.add_argument("--name", default="node")
    a = p.parse_args()
    key = keys.generate()
    pin = keys.parse_node_id(a.dc_address) if a.dc_address else None
    await register(key, a.dc, pin)
    node = await Node.start(key, a.dc, host=None, port=0, keepalive_interval=a.keepalive, dc_pin=pin)
    driver = Driver(node)
    emit({"event": "ready", "node": keys.checksum(node.id), "observed": node.observed, "local": node.local_addrs()})
    acceptor = asyncio.create_task(driver.accept_loop())
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    tasks = set()
    while line := await reader.readline():
        m = json.loads(line)
        if m.get("cmd") == "quit":
            emit({"id": m.get("id"), "ok": True})
            break
        task = asyncio.create_task(driver.run_command(m))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    acceptor.cancel()
    await node.close()


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    asyncio.run(main())
