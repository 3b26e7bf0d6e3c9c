"""An attacker on the path: a transparent TCP proxy run in a NAT router's namespace, where an
iptables REDIRECT sends it the site's connections to the DCs (labkit/lab/onpath.py sets it up).

    python -m labkit.lab.mitm --port P --lure-port U

It connects each redirected connection on to its original destination (SO_ORIGINAL_DST), keeps
every byte it relays, and obeys JSON commands on stdin, one answer line on stdout each:
  {"cmd": "search", "secrets": [hex, ...]}  how many times each secret (raw bytes, or as hex text
                                            in either case) occurs in what it relayed, and how many
                                            datagrams reached its UDP lure (where its injected
                                            directions point)
  {"cmd": "inject", "port": P, "payload": hex}  write these bytes into every open DC→node stream
                                            of connections to port P
  {"cmd": "flip", "port": P}                flip one bit of the next DC→node chunk on port P
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import struct
import sys

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h: where a REDIRECTed connection was going


class Mitm:
    def __init__(self) -> None:
        self.seen = bytearray()  # both directions, as relayed
        self.to_node: list[tuple[int, asyncio.StreamWriter]] = []  # (original port, writer)
        self.connections = 0
        self.flip_port = 0  # flip a bit of the next DC→node chunk of a connection to this port
        self.flipped = 0
        self.lured = 0  # datagrams at the lure

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raw = writer.get_extra_info("socket").getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        port, ip = struct.unpack("!2xH4s8x", raw)
        try:
            up_r, up_w = await asyncio.open_connection(socket.inet_ntoa(ip), port)
        except OSError:
            writer.close()
            return
        self.connections += 1
        self.to_node.append((port, writer))
        await asyncio.gather(self.pump(reader, up_w, 0), self.pump(up_r, writer, port))
        self.to_node.remove((port, writer))

    async def pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, towards_node_from: int) -> None:
        try:
            while data := await src.read(65536):
                self.seen += data
                if towards_node_from and towards_node_from == self.flip_port:
                    self.flip_port, self.flipped = 0, self.flipped + 1
                    data = data[:-1] + bytes([data[-1] ^ 0x01])
                dst.write(data)
                await dst.drain()
        except OSError:
            pass
        finally:
            dst.close()

    def command(self, m: dict) -> dict:
        if m["cmd"] == "search":
            found = {}
            for s in m["secrets"]:
                raw = bytes.fromhex(s)
                found[s] = sum(self.seen.count(form) for form in (raw, s.lower().encode(), s.upper().encode()))
            return {
                "found": found,
                "bytes": len(self.seen),
                "connections": self.connections,
                "lured": self.lured,
                "flipped": self.flipped,
            }
        if m["cmd"] == "inject":
            targets = [w for port, w in self.to_node if port == m["port"]]
            for w in targets:
                w.write(bytes.fromhex(m["payload"]))
            return {"injected_into": len(targets)}
        if m["cmd"] == "flip":
            self.flip_port = m["port"]
            return {}
        raise ValueError(f"unknown command {m['cmd']!r}")


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--lure-port", type=int, required=True)
    a = p.parse_args()
    mitm = Mitm()
    server = await asyncio.start_server(mitm.handle, "0.0.0.0", a.port)
    lure = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    lure.bind(("0.0.0.0", a.lure_port))
    lure.setblocking(False)

    def count() -> None:
        while True:
            try:
                lure.recv(2048)
            except BlockingIOError:
                return
            mitm.lured += 1

    print(json.dumps({"event": "ready"}), flush=True)
    loop = asyncio.get_running_loop()
    loop.add_reader(lure.fileno(), count)
    async with server:
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            try:
                answer = mitm.command(json.loads(line))
            except (ValueError, KeyError) as exc:
                answer = {"error": str(exc)}
            print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
