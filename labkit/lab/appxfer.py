"""A stream transfer between two embedded nodes (node/api.py, no daemon, no TUN), for the lab.

    appxfer.py serve --home H --port P --allow ID      accept one stream, read to EOF
      -> {"event": "listening", "node": ID} then {"bytes", "sha256", "max_stall_s", "elapsed_s"}
    appxfer.py send --home H --to ID --port P --bytes N [--rate BYTES_PER_S]
      -> {"event": "streaming"} once the stream is open, then {"bytes", "sha256", "elapsed_s"}

The data is seeded pseudo-random; `max_stall_s` is the longest time the receiver got no bytes
(after the first): what an application notices of a move.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from labkit.lab.tcpxfer import CHUNK, Tally, payload, send_parser  # noqa: E402
from node.api import AppNode  # noqa: E402
from ntm import keys  # noqa: E402


async def serve(a) -> None:
    done: asyncio.Future[dict] = asyncio.get_running_loop().create_future()

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        t = Tally()
        while data := await reader.read(CHUNK):
            t.add(data)
        writer.write_eof()
        done.set_result(t.report(received=True))

    async with await AppNode.start(home=Path(a.home), allow=[keys.parse_node_id(a.allow)]) as node:
        await node.start_server(sink, a.port)
        print(json.dumps({"event": "listening", "node": keys.checksum(node.id)}), flush=True)
        print(json.dumps(await done), flush=True)


async def send(a) -> None:
    async with await AppNode.start(home=Path(a.home)) as node:
        reader, writer = await node.open_connection(a.to, a.port)
        print(json.dumps({"event": "streaming"}), flush=True)
        t = Tally()
        for chunk in payload(a.bytes):
            writer.write(chunk)
            await writer.drain()
            t.add(chunk)
            await asyncio.sleep(t.ahead_s(a.rate))
        writer.write_eof()
        await asyncio.wait_for(reader.read(), 120)  # the receiver's half-close: it has everything
        print(json.dumps(t.report(received=False)), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--home", required=True)
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--allow", required=True)
    send_parser(sub).add_argument("--home", required=True)
    a = ap.parse_args()
    # The node's own account (tunnel up, path changes) on stderr, which a failed test shows the
    # tail of; so a failure is one line after it, not a traceback that would push it out.
    logging.basicConfig(level=logging.INFO, format="%(relativeCreated)6.0f ms %(name)s: %(message)s")
    try:
        asyncio.run(serve(a) if a.cmd == "serve" else send(a))
    except Exception as exc:
        sys.exit(f"appxfer {a.cmd}: {type(exc).__name__}: {exc}")


if __name__ == "__main__":
    main()
