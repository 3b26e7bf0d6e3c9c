"""A local snapshot of the registry cache, so a restarted DC reads only the logs since (issue 30).

The file holds every node record and DC the cache knew at one block, with that block's number and
hash and what it is a snapshot of (chain ID, registry address, deployment block). On start the DC
uses it only if all of these match and the chain still has that block with that hash; otherwise
(another chain or registry, a chain that is shorter or took another branch: a reorg, a chain
node restarted from an older state) it is discarded and the registry is read from the deployment
block as on a first start. Written atomically (a temporary file, fsync, rename) every
SNAPSHOT_EVERY_S once caught up, and on a clean stop. docs/PROTOCOL.md §5 "Starting".

Format: MAGIC, one JSON header line, then one fixed-size record per node (RECORD: node, home DC,
timestamp, revoked). The header carries the body's SHA-256: a damaged file is discarded too.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import struct
from dataclasses import dataclass
from pathlib import Path

from daemon import atomic_file
from ntm.registry import DcInfo, OnChainRecord

log = logging.getLogger("ntm.dc.snapshot")

MAGIC = b"NTM-REGISTRY-SNAPSHOT 1\n"
RECORD = struct.Struct(">20s20sQ?")  # node, home DC, timestamp (ms), revoked: 49 bytes
# How often a caught-up DC writes its snapshot when the cache moved: a restart then reads at most
# this much chain history (a few hundred blocks); writing 100k records costs ~0.1 s off the loop.
SNAPSHOT_EVERY_S = 60.0
# A header longer than this is not ours (it holds a few DCs' hostnames and endpoints).
MAX_HEADER = 1 << 20


@dataclass
class Snapshot:
    chain_id: int
    registry: bytes
    from_block: int
    block: int
    block_hash: bytes
    nodes: dict[bytes, OnChainRecord]
    dcs: dict[bytes, DcInfo]


class SnapshotError(ValueError):
    """A snapshot file that is not one, is damaged, or is of another chain or registry."""


def encode(snap: Snapshot) -> bytes:
    body = b"".join(RECORD.pack(node, r.dc, r.timestamp, r.revoked) for node, r in snap.nodes.items())
    header = {
        "chain_id": snap.chain_id,
        "registry": snap.registry.hex(),
        "from_block": snap.from_block,
        "block": snap.block,
        "hash": snap.block_hash.hex(),
        "nodes": len(snap.nodes),
        "dcs": [[d.address.hex(), d.active, d.hostname, d.endpoint] for d in snap.dcs.values()],
        "sha256": hashlib.sha256(body).hexdigest(),
    }
    return MAGIC + json.dumps(header).encode() + b"\n" + body


def decode(data: bytes, chain_id: int, registry: bytes, from_block: int) -> Snapshot:
    """The snapshot in `data` if it is intact and of this chain, registry and deployment; else
    SnapshotError saying why."""
    if not data.startswith(MAGIC):
        raise SnapshotError("not a registry snapshot")
    end = data.find(b"\n", len(MAGIC), len(MAGIC) + MAX_HEADER)
    if end < 0:
        raise SnapshotError("no header")
    try:
        h = json.loads(data[len(MAGIC) : end])
        mine = (h["chain_id"], h["registry"], h["from_block"])
        block, block_hash, count, digest = int(h["block"]), bytes.fromhex(h["hash"]), int(h["nodes"]), h["sha256"]
        dcs = {
            bytes.fromhex(a): DcInfo(bytes.fromhex(a), bool(act), str(host), str(ep)) for a, act, host, ep in h["dcs"]
        }
    except (ValueError, KeyError, TypeError) as exc:
        raise SnapshotError(f"bad header: {exc}") from None
    if mine != (chain_id, registry.hex(), from_block):
        raise SnapshotError(
            f"of another chain or registry (chain {mine[0]}, registry 0x{mine[1]}, deployed at block {mine[2]})"
        )
    body = memoryview(data)[end + 1 :]
    if len(body) != count * RECORD.size or hashlib.sha256(body).hexdigest() != digest:
        raise SnapshotError("damaged (length or checksum)")
    homes: dict[bytes, bytes] = {}  # one bytes object per home DC, not one per record
    nodes = {
        node: OnChainRecord(homes.setdefault(dc, dc), ts, revoked) for node, dc, ts, revoked in RECORD.iter_unpack(body)
    }
    return Snapshot(chain_id, registry, from_block, block, block_hash, nodes, dcs)


def read(path: Path, chain_id: int, registry: bytes, from_block: int) -> Snapshot | None:
    """The snapshot at `path` if there is a usable one (why not is logged)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("registry snapshot %s unreadable, reading the chain from the start: %s", path, exc)
        return None
    try:
        return decode(data, chain_id, registry, from_block)
    except SnapshotError as exc:
        log.warning("registry snapshot %s discarded: %s", path, exc)
        return None


async def save(path: Path, snap: Snapshot) -> bool:
    """Encode and write in a worker thread (the event loop goes on serving); False if it failed."""
    try:
        await asyncio.to_thread(lambda: atomic_file.replace_file(path, encode(snap)))
    except OSError as exc:
        log.warning("cannot write the registry snapshot %s: %s", path, exc)
        return False
    log.info("registry snapshot written at block %d (%d nodes)", snap.block, len(snap.nodes))
    return True
