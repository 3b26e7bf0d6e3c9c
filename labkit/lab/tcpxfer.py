"""A TCP transfer across the overlay with a checksum, for the TUN lab tests.

    tcpxfer.py serve --bind ADDR --port P            accept one connection, read to EOF
      -> {"event": "listening"} then {"bytes", "sha256", "max_stall_s", "elapsed_s", "peer"}
    tcpxfer.py send --to ADDR --port P --bytes N [--rate BYTES_PER_S]
      -> {"bytes", "sha256", "elapsed_s"}

The data is seeded pseudo-random; `max_stall_s` is the longest time the receiver saw no bytes
(after the first), i.e. what an application notices of a handover.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import socket
import sys
import time

CHUNK = 64 * 1024


class Tally:
    """Bytes through one end of a transfer: count, SHA-256, and the longest gap between two reads
    after the first (`max_stall_s`: what an application notices of a handover)."""

    def __init__(self) -> None:
        self.h, self.n, self.t0, self.last, self.stall = hashlib.sha256(), 0, time.monotonic(), None, 0.0

    def add(self, data: bytes) -> None:
        now = time.monotonic()
        if self.last is not None:
            self.stall = max(self.stall, now - self.last)
        self.last = now
        self.h.update(data)
        self.n += len(data)

    def ahead_s(self, rate: float) -> float:
        """How long to wait to keep to `rate` bytes/s (0: no cap)."""
        return max(0.0, self.n / rate - (time.monotonic() - self.t0)) if rate else 0.0

    def report(self, received: bool) -> dict:
        out = {"bytes": self.n, "sha256": self.h.hexdigest()}
        if received:
            out["max_stall_s"] = round(self.stall, 3)
        return {**out, "elapsed_s": round(time.monotonic() - self.t0, 3)}


def payload(total: int):
    """`total` seeded pseudo-random bytes in CHUNK pieces (the same for every run)."""
    rng, sent = random.Random(7), 0
    while sent < total:
        chunk = rng.randbytes(min(CHUNK, total - sent))
        sent += len(chunk)
        yield chunk


def serve(a) -> None:
    fam = socket.AF_INET6 if ":" in a.bind else socket.AF_INET
    srv = socket.socket(fam, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((a.bind, a.port))
    srv.listen(1)
    print(json.dumps({"event": "listening"}), flush=True)
    conn, peer = srv.accept()
    t = Tally()
    while data := conn.recv(CHUNK):
        t.add(data)
    conn.close()
    print(json.dumps({**t.report(received=True), "peer": peer[0]}), flush=True)


def send(a) -> None:
    fam = socket.AF_INET6 if ":" in a.to else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(60)
    s.connect((a.to, a.port))
    t = Tally()
    for chunk in payload(a.bytes):
        s.sendall(chunk)
        t.add(chunk)
        time.sleep(t.ahead_s(a.rate))
    s.shutdown(socket.SHUT_WR)
    s.recv(1)  # wait for the receiver to close: everything arrived
    print(json.dumps(t.report(received=False)), flush=True)


def send_parser(sub) -> argparse.ArgumentParser:
    """The `send` subcommand's flags, alike for every transfer script: to whom, which port, how
    many bytes, at what rate (bytes/s; 0: as fast as it goes)."""
    s = sub.add_parser("send")
    s.add_argument("--to", required=True)
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--bytes", type=int, required=True)
    s.add_argument("--rate", type=float, default=0.0)
    return s


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--bind", required=True)
    s.add_argument("--port", type=int, required=True)
    send_parser(sub)
    a = p.parse_args()
    {"serve": serve, "send": send}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
