"""A node's side of the Cache Server (docs/PROTOCOL.md §11–12): seal and upload an item for
peers that are offline, list what waits for us, download, open, confirm.

Every request is an envelope signed by the node's key. Items stream both ways: an upload reads
the source in chunks and seals as it sends; a download opens as it receives, into a temporary
file that becomes the item only once the sender's signature at the end checks out.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator

import aiohttp
import coincurve

from ntm import envelope, keys, messages, seal
from ntm.clock import SYSTEM, Clock
from ntm.errors import CodedError, ParseError

READ_CHUNK = 1 << 20  # bytes read from a file or the network at a time
AUTH_HEADER, ITEM_HEADER = "X-NTM-Auth", "X-NTM-Header"  # as cs/server.py
HTTP_TIMEOUT_S = 600.0  # a 256 MB item over a slow link


class CsClientError(CodedError):
    """The Cache Server refused, or an item did not open (`code` says which)."""


@dataclass(frozen=True)
class Received:
    """An item fetched, opened and confirmed: what the application gets."""

    item: str
    sender: bytes
    meta: seal.Meta
    path: Path
    size: int

    def describe(self) -> dict:
        return {
            "item": self.item,
            "sender": keys.checksum(self.sender),
            "size": self.size,
            "path": str(self.path),
            "app_id": self.meta.app_id,
            "service_id": self.meta.service_id,
            "service_item_id": self.meta.service_item_id,
            "notice": self.meta.notice,
            "name": self.meta.name,
        }


class CsClient:
    def __init__(self, key: coincurve.PrivateKey, url: str, clock: Clock = SYSTEM) -> None:
        self.key, self.url, self.clock = key, url.rstrip("/"), clock
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S))

    async def close(self) -> None:
        await self.http.close()

    async def __aenter__(self) -> "CsClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def _auth(self, kind: str, body: messages.Message) -> dict:
        return envelope.seal_body(self.key, kind, body, self.clock.wall_ms())

    async def _check(self, r: aiohttp.ClientResponse) -> None:
        if r.status // 100 != 2:
            text = await r.text()
            try:
                err = messages.decode(messages.ErrorBody, text)
            except ParseError:  # not our JSON (a proxy?): say what came back
                raise CsClientError(
                    "bad_response", f"Cache Server {self.url} answered {r.status}: {text[:200]}"
                ) from None
            raise CsClientError(err.error, f"Cache Server {self.url}: {err.message}")

    async def _request(self, method: str, path: str, **kw) -> dict:
        try:
            async with self.http.request(method, self.url + path, **kw) as r:
                await self._check(r)
                return await r.json()
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise CsClientError(
                "unreachable", f"cannot reach Cache Server {self.url}: {str(exc) or type(exc).__name__}"
            ) from None

    async def put(self, sealer: seal.Sealer, source: AsyncIterator[bytes], content_len: int) -> dict:
        """Upload: seal `source` (content_len bytes) as it streams out."""
        size = sealer.size_for(content_len)

        async def body() -> AsyncIterator[bytes]:
            async for chunk in source:
                out = sealer.feed(chunk)
                if out:
                    yield out
            yield sealer.finish()

        auth = self._auth(messages.CS_PUT, messages.CsPut(sealer.header.to_json(), size))
        return await self._request(
            "PUT",
            "/v1/items",
            data=body(),
            headers={AUTH_HEADER: json.dumps(auth, separators=(",", ":")), "Content-Type": "application/octet-stream"},
        )

    async def inbox(self) -> list[dict]:
        return (await self._request("POST", "/v1/inbox", json=self._auth(messages.CS_LIST, messages.CsListRequest())))[
            "items"
        ]

    async def fetch(self, item: str, out_dir: Path) -> Received:
        """Download, open and confirm one item; it is written to out_dir/<item> only if it opens."""
        auth = self._auth(messages.CS_GET, messages.CsItemRef(item))
        out_dir.mkdir(parents=True, exist_ok=True)
        part, final = out_dir / f".{item}.part", out_dir / item
        try:
            async with self.http.get(
                f"{self.url}/v1/items/{item}", headers={AUTH_HEADER: json.dumps(auth, separators=(",", ":"))}
            ) as r:
                await self._check(r)
                try:
                    header = seal.Header.from_json(json.loads(r.headers.get(ITEM_HEADER, "null")))
                    opener = seal.Opener(self.key, header)
                    with open(part, "wb") as fh:
                        async for chunk in r.content.iter_chunked(READ_CHUNK):
                            fh.write(opener.feed(chunk))
                        tail, meta = opener.finish()
                        fh.write(tail)
                        size = fh.tell()
                except (seal.SealError, ValueError) as exc:
                    raise CsClientError("bad_item", f"item {item} refused: {exc}") from None
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            part.unlink(missing_ok=True)
            raise CsClientError(
                "unreachable", f"cannot fetch {item} from {self.url}: {str(exc) or type(exc).__name__}"
            ) from None
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        os.replace(part, final)
        got = Received(item, header.sender, meta, final, size)
        (out_dir / f"{item}.json").write_text(json.dumps(got.describe(), indent=2) + "\n")
        await self.ack(item)
        return got

    async def ack(self, item: str) -> dict:
        """We have it: the CS forgets it once every recipient has said so."""
        return await self._request(
            "POST", f"/v1/items/{item}/ack", json=self._auth(messages.CS_ACK, messages.CsItemRef(item))
        )


async def leave_sealed(
    key: coincurve.PrivateKey,
    dc_url: str,
    peers: list[bytes],
    meta: seal.Meta,
    source: AsyncIterator[bytes],
    content_len: int,
    now_ms: int,
    timeout: float,
    dc_pin: bytes | None = None,
) -> dict:
    """Store-and-forward: seal `source` for `peers` (their keys as the DC federation knows them)
    and upload it to the Cache Server of our DC (`dc_url`, whose TLS must be bound to `dc_pin`, or
    to a key this process already checked for it); the CS's answer plus {"cs": url}.
    CsClientError: no CS, a revoked recipient, or the CS refused; ValueError: bad `meta`."""
    from node.dc_client import DcClient  # the DC client is needed only here

    seal.check_meta(meta)
    async with DcClient(dc_url, timeout, pin=dc_pin) as dc:
        info = await dc.info()
        if not info.cs:
            raise CsClientError(
                "no_cs", f"DC {dc_url} has no Cache Server (its operator starts one with ntm-cs and --cs)"
            )
        recipients = {}
        for peer in peers:
            who = await dc.whois(peer)
            if who.revoked or not who.pubkey:
                raise CsClientError("revoked", f"{keys.checksum(peer)} is revoked: it can receive nothing")
            recipients[peer] = bytes.fromhex(who.pubkey)
    sealer = seal.Sealer(key, recipients, meta, now_ms)
    async with CsClient(key, info.cs) as cs:
        return {**await cs.put(sealer, source, content_len), "cs": info.cs}


async def file_chunks(path: Path) -> AsyncIterator[bytes]:
    with open(path, "rb") as fh:
        while chunk := fh.read(READ_CHUNK):
            yield chunk


async def bytes_chunks(data: bytes) -> AsyncIterator[bytes]:
    for i in range(0, len(data), READ_CHUNK):
        yield data[i : i + READ_CHUNK]
