"""How group payloads travel (node/groups.py's Transport): over tunnels, acknowledged, and sealed
at our DC's Cache Server for members that are offline; and how those items come back in.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import coincurve

from node.cs_client import CsClient, Received, bytes_chunks
from node.dataplane import DataPlane
from node.dc_client import DcClient
from node.groups import GROUP_APP, Groups
from ntm import keys, seal
from ntm.errors import NtmError

log = logging.getLogger("ntm.node.groups")


class GroupLink:
    def __init__(self, key: coincurve.PrivateKey, plane: DataPlane) -> None:
        self.key, self.plane = key, plane

    async def deliver(self, peer: bytes, payload: bytes) -> bool:
        return await self.plane.send_group(peer, payload)

    async def store(self, peers: list[bytes], payload: bytes) -> list[bytes]:
        """One sealed item per MAX_RECIPIENTS peers at our DC's Cache Server (revoked peers skipped)."""
        async with DcClient(self.plane.node.dc_url) as dc:
            cs = (await dc.info()).cs
            if not cs:
                log.warning("our DC has no Cache Server: %d offline member(s) miss a group payload", len(peers))
                return []
            pubs = {}
            for p in peers:
                who = await dc.whois(p)
                if who.pubkey and not who.revoked:
                    pubs[p] = bytes.fromhex(who.pubkey)
        stored: list[bytes] = []
        batch = list(pubs.items())
        clock = self.plane.node.session.clock
        async with CsClient(self.key, cs, clock) as client:
            for i in range(0, len(batch), seal.MAX_RECIPIENTS):
                part = dict(batch[i : i + seal.MAX_RECIPIENTS])
                sealer = seal.Sealer(self.key, part, seal.Meta(GROUP_APP, notice="group"), clock.wall_ms())
                await client.put(sealer, bytes_chunks(payload), len(payload))
                stored += list(part)
        return stored


def take_item(groups: Groups, item: Received) -> bool:
    """A fetched Cache Server item: group traffic goes to `groups` and leaves the inbox."""
    if item.meta.app_id != GROUP_APP:
        return False
    try:
        groups.on_payload(item.sender, item.path.read_bytes(), "cs")
    except OSError as exc:
        log.warning("group item %s unreadable: %s", item.item, exc)
        return True
    item.path.unlink(missing_ok=True)
    item.path.with_name(item.item + ".json").unlink(missing_ok=True)
    return True


def take_inbox(groups: Groups, inbox: Path) -> int:
    """Group items fetched before the daemon could hand them over (a crash, a restart)."""
    count = 0
    for meta_file in sorted(inbox.glob("*.json")) if inbox.is_dir() else []:
        try:
            d = json.loads(meta_file.read_text())
            item = Received(
                d["item"], keys.parse_node_id(d["sender"]), seal.Meta(d["app_id"]), Path(d["path"]), d["size"]
            )
        except (ValueError, KeyError, TypeError, NtmError):
            continue
        count += take_item(groups, item)
    return count
