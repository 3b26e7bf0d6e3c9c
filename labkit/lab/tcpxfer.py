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


def serve(a) -> None:
    fam = socket.AF_INET6 if ":" in a.bind else socket.AF_INET
    srv = socket.socket(fam, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((a.bind, a.port))
    srv.listen(1)
    print(json.dumps({"event": "listening"}), flush=True)
    conn, peer = srv.accept()
    h, n, t0, last, stall = hashlib.sha256(), 0, time.monotonic(), None, 0.0
    while True:
        data = conn.recv(CHUNK)
        if not data:
            break
        now = time.monotonic()
        if last is not None:
            stall = max(stall, now - last)
        last = now
        h.update(data)
        n += len(data)
    conn.close()
    print(
        json.dumps(
            {
                "bytes": n,
                "sha256": h.hexdigest(),
                "max_stall_s": round(stall, 3),
                "elapsed_s": round(time.monotonic() - t0, 3),
                "peer": peer[0],
            }
        ),
        flush=True,
    )


def send(a) -> None:
    rng = random.Random(7)
    fam = socket.AF_INET6 if ":" in a.to else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(60)
    s.connect((a.to, a.port))
    h, sent, t0 = hashlib.sha256(), 0, time.monotonic()
    while sent < a.bytes:
        chunk = rng.randbytes(min(CHUNK, a.bytes - sent))
        s.sendall(chunk)
        h.update(chunk)
        sent += len(chunk)
        if a.rate:
            ahead = sent / a.rate - (time.monotonic() - t0)
            if ahead > 0:
                time.sleep(ahead)
    s.shutdown(socket.SHUT_WR)
    s.recv(1)  # wait for the receiver to close: everything arrived
    print(
        json.dumps({"bytes": sent, "sha256": h.hexdigest(), "elapsed_s": round(time.monotonic() - t0, 3)}), flush=True
    )


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--bind", required=True)
    s.add_argument("--port", type=int, required=True)
    s = sub.add_parser("send")
    s.add_argument("--to", required=True)
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--bytes", type=int, required=True)
    s.add_argument("--rate", type=float, default=0.0)
    a = p.parse_args()
    {"serve": serve, "send": send}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
