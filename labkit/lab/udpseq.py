"""A UDP sequence stream across the overlay, both ways at once, for the make-before-break test.

    udpseq.py --bind ADDR --to ADDR --port P --rate PKTS_PER_S --seconds S
      -> {"event": "ready"} once bound; it starts sending when a line arrives on stdin (the
         driver says go once both ends are bound: nothing is lost to a port not yet open); at the end
         {"sent", "received", "lost_runs", "longest_run", "first_lost", "duplicates"}

Each datagram carries an 8-byte sequence number (padded to 64 bytes); the process sends at a
steady rate for S seconds while counting what arrives from the peer's identical process, then
listens a little longer for stragglers. Losses are the peer's `sent` minus our `received`;
`lost_runs`/`longest_run` show whether they came in one outage (a handover) or scattered.
"""

from __future__ import annotations

import argparse
import json
import select
import socket
import struct
import sys
import time

SIZE = 64
LINGER_S = 1.5  # after our last send: the peer's last packets are still on their way


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bind", required=True)
    ap.add_argument("--to", required=True)
    ap.add_argument("--port", type=int, default=5002)
    ap.add_argument("--rate", type=float, default=100.0)
    ap.add_argument("--seconds", type=float, default=6.0)
    a = ap.parse_args()
    fam = socket.AF_INET6 if ":" in a.bind else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_DGRAM)
    s.bind((a.bind, a.port))
    s.setblocking(False)
    print(json.dumps({"event": "ready"}), flush=True)
    sys.stdin.readline()
    got: set[int] = set()
    dups = 0
    interval, n = 1.0 / a.rate, int(a.rate * a.seconds)
    t0 = time.monotonic()
    sent = 0
    end = t0 + n * interval + LINGER_S
    while True:
        now = time.monotonic()
        if now >= end:
            break
        if sent < n and now >= t0 + sent * interval:
            try:
                s.sendto(struct.pack("!Q", sent).ljust(SIZE, b"\0"), (a.to, a.port))
            except OSError:
                pass  # no route for a moment: the packet is lost, as the network would lose it
            sent += 1
            continue
        wake = end if sent >= n else t0 + sent * interval
        r, _, _ = select.select([s], [], [], max(0.0, wake - now))
        while r:
            try:
                data = s.recv(2048)
            except BlockingIOError:
                break
            if len(data) >= 8:
                seq = struct.unpack("!Q", data[:8])[0]
                dups += seq in got
                got.add(seq)
    missing = sorted(set(range(max(got) + 1 if got else 0)) - got)
    runs, longest, prev, cur = 0, 0, None, 0
    for m in missing:
        cur = cur + 1 if prev is not None and m == prev + 1 else 1
        runs += cur == 1
        longest = max(longest, cur)
        prev = m
    print(
        json.dumps(
            {
                "sent": sent,
                "received": len(got),
                "lost_runs": runs,
                "longest_run": longest,
                "first_lost": missing[0] if missing else None,
                "duplicates": dups,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
