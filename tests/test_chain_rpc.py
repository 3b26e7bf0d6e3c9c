"""chain/rpc.py's provider over real TCP sockets: connections are kept across calls, and a kept
connection the chain node closed is not mistaken for a dead node."""

from __future__ import annotations

import asyncio
import json

from chain.rpc import FailoverHTTPProvider

CALLS = 12


class StubChainNode:
    """A JSON-RPC server on loopback answering eth_blockNumber. It counts connections; with
    `requests_per_connection` it drops a connection when the next request arrives on it, as a
    chain node does that closes an idle keep-alive connection just as the client reuses it."""

    def __init__(self, requests_per_connection: int | None = None) -> None:
        self.limit = requests_per_connection
        self.connections = 0
        self.answered = 0

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc) -> None:
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        served = 0
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length")
                )
                request = json.loads(await reader.readexactly(length))
                if self.limit is not None and served == self.limit:
                    return  # closed without an answer
                body = json.dumps({"jsonrpc": "2.0", "id": request["id"], "result": hex(self.answered)}).encode()
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    + f"Content-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )
                await writer.drain()
                served += 1
                self.answered += 1
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def test_calls_share_one_kept_connection():
    """The registry poll's calls (every 50 ms) reuse one connection instead of a connect each."""
    node = StubChainNode()
    async with node as url:
        provider = FailoverHTTPProvider([url])
        try:
            for _ in range(CALLS):
                await provider.make_request("eth_blockNumber", [])
        finally:
            await provider.disconnect()
    assert node.answered == CALLS
    assert node.connections == 1


async def test_a_kept_connection_closed_by_the_chain_node_is_retried_not_failed_over():
    """Hostile condition: the chain node drops each kept connection as the next request arrives
    on it. Every call still gets its answer from the same (only) URL, on a fresh connection."""
    node = StubChainNode(requests_per_connection=1)
    async with node as url:
        provider = FailoverHTTPProvider([url])
        try:
            answers = [await provider.make_request("eth_blockNumber", []) for _ in range(CALLS)]
        finally:
            await provider.disconnect()
    assert [int(a["result"], 16) for a in answers] == list(range(CALLS))
    assert node.connections == CALLS
