"""The DC's durable state in SQLite: the nodes it is home to, and the chain-submission outbox.

A registration is acknowledged only after its transaction has committed (WAL, synchronous=FULL),
so a crash between acknowledgement and chain confirmation loses nothing: the outbox rows are
still `pending` on restart and the submitter sends them again. Concurrent registrations share one
commit (group commit), which is what makes 1,000 registrations/s possible with an fsync each.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from ntm.record import NodeTransaction
from ntm.registration import RegistrationRequest

SCHEMA = """
CREATE TABLE IF NOT EXISTS nodes (
    node        BLOB PRIMARY KEY,      -- 20-byte node ID
    pubkey      BLOB NOT NULL,         -- 65-byte uncompressed public key
    timestamp   INTEGER NOT NULL,      -- newest accepted record (ms)
    revoked     INTEGER NOT NULL,
    signature   BLOB NOT NULL,
    local_addrs TEXT NOT NULL          -- JSON list of "ip:port"
);
CREATE TABLE IF NOT EXISTS outbox (
    node      BLOB NOT NULL,
    timestamp INTEGER NOT NULL,
    revoked   INTEGER NOT NULL,
    signature BLOB NOT NULL,
    state     TEXT NOT NULL CHECK (state IN ('pending', 'confirmed', 'rejected')),
    tx        TEXT,
    block     INTEGER,
    reason    TEXT,
    PRIMARY KEY (node, timestamp)
);
CREATE INDEX IF NOT EXISTS outbox_pending ON outbox (state) WHERE state = 'pending';
CREATE TABLE IF NOT EXISTS notices (   -- Cache Server items waiting for our nodes (dc/notices.py)
    node       BLOB NOT NULL,
    item       BLOB NOT NULL,
    body       TEXT NOT NULL,          -- the CsNotice, JSON
    expires_ms INTEGER NOT NULL,
    PRIMARY KEY (node, item)
);
CREATE TABLE IF NOT EXISTS blocks (    -- blocks our transactions were mined in, newest kept
    number INTEGER PRIMARY KEY,
    hash   BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS nodes_newest ON nodes (timestamp);
"""
# Row counts kept by triggers in the same transactions as the rows, so /metrics and the dashboard
# read them in O(1) instead of count(*) walking a table of 100k rows (issue 30). Created (and
# filled from count(*), once) when missing: a database from before them is counted at open.
COUNTS = """
CREATE TABLE counts (what TEXT PRIMARY KEY, n INTEGER NOT NULL);  -- 'nodes', 'outbox:<state>'
INSERT INTO counts SELECT 'nodes', count(*) FROM nodes;
INSERT INTO counts SELECT 'outbox:' || state, count(*) FROM outbox GROUP BY state;
CREATE TRIGGER nodes_added AFTER INSERT ON nodes BEGIN
    INSERT INTO counts VALUES ('nodes', 1) ON CONFLICT(what) DO UPDATE SET n = n + 1; END;
CREATE TRIGGER nodes_removed AFTER DELETE ON nodes BEGIN
    UPDATE counts SET n = n - 1 WHERE what = 'nodes'; END;
CREATE TRIGGER outbox_added AFTER INSERT ON outbox BEGIN
    INSERT INTO counts VALUES ('outbox:' || NEW.state, 1) ON CONFLICT(what) DO UPDATE SET n = n + 1; END;
CREATE TRIGGER outbox_removed AFTER DELETE ON outbox BEGIN
    UPDATE counts SET n = n - 1 WHERE what = 'outbox:' || OLD.state; END;
CREATE TRIGGER outbox_moved AFTER UPDATE OF state ON outbox WHEN OLD.state != NEW.state BEGIN
    UPDATE counts SET n = n - 1 WHERE what = 'outbox:' || OLD.state;
    INSERT INTO counts VALUES ('outbox:' || NEW.state, 1) ON CONFLICT(what) DO UPDATE SET n = n + 1; END;
"""
# Confirmed outbox rows are pruned this often (dc/__main__.py), once deeper than the follower
# re-checks for rollbacks: without it they were half of a busy DC's file (issue 30).
PRUNE_EVERY_S = 60.0
# Blocks remembered in `blocks`: a restarted DC checks them for a rollback that happened while it
# was down (as many as the follower remembers, dc/cache.py REMEMBERED_BLOCKS).
BLOCKS_KEPT = 1024


@dataclass(frozen=True)
class StoredNode:
    node: bytes
    pubkey: bytes
    timestamp: int
    revoked: bool
    local_addrs: tuple[str, ...]


NODE_COLUMNS = "node, pubkey, timestamp, revoked, local_addrs"


def _stored_node(row: tuple) -> StoredNode:
    return StoredNode(row[0], row[1], row[2], bool(row[3]), tuple(json.loads(row[4])))


# Node rows kept in memory for reads: a Direction Request reads its node's row at both DCs (an
# SQLite query was 4-6% of a DC's CPU per direction); the oldest is dropped past this many, so a
# stranger asking about random IDs costs a bounded ~5 MB at most.
NODE_CACHE_MAX = 16_384


@dataclass(frozen=True)
class OutboxItem:
    record: NodeTransaction
    signature: bytes


class Store:
    """SQLite file with group commit. Used from one event loop thread only."""

    def __init__(self, path: Path, dc: bytes) -> None:
        self.dc = dc
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(SCHEMA)
        if self.db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='counts'").fetchone() is None:
            self.db.executescript(f"BEGIN; {COUNTS} COMMIT;")
        self._batch: list[RegistrationRequest] = []
        self._waiters: list[asyncio.Future] = []
        self._nodes: dict[bytes, StoredNode | None] = {}  # read cache; _write drops what it changes

    def close(self) -> None:
        self.db.close()

    async def add(self, req: RegistrationRequest) -> None:
        """Store a validated registration durably; returns once it is committed."""
        fut = asyncio.get_running_loop().create_future()
        if not self._batch:
            asyncio.get_running_loop().call_soon(self._flush)
        self._batch.append(req)
        self._waiters.append(fut)
        await fut

    def _flush(self) -> None:
        batch, waiters = self._batch, self._waiters
        self._batch, self._waiters = [], []
        try:
            with self.db:
                self.db.execute("BEGIN")
                for req in batch:
                    self._write(req)
        except sqlite3.Error as exc:
            for fut in waiters:
                if not fut.done():
                    fut.set_exception(exc)
            return
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    def _write(self, req: RegistrationRequest) -> None:
        rec = req.record
        self._nodes.pop(rec.node, None)
        self.db.execute(
            "INSERT INTO nodes VALUES (?,?,?,?,?,?) ON CONFLICT(node) DO UPDATE SET "
            "pubkey=excluded.pubkey, timestamp=excluded.timestamp, revoked=excluded.revoked, "
            "signature=excluded.signature, local_addrs=excluded.local_addrs "
            "WHERE excluded.timestamp > nodes.timestamp",
            (rec.node, req.pubkey, rec.timestamp, int(rec.revoked), req.signature, json.dumps(req.local_addrs)),
        )
        self.db.execute(
            "INSERT OR IGNORE INTO outbox (node, timestamp, revoked, signature, state) VALUES (?,?,?,?,'pending')",
            (rec.node, rec.timestamp, int(rec.revoked), req.signature),
        )

    def node(self, node: bytes) -> StoredNode | None:
        """The node's row (None: not ours), from the read cache when it holds it."""
        try:
            return self._nodes[node]
        except KeyError:
            pass
        row = self.db.execute(f"SELECT {NODE_COLUMNS} FROM nodes WHERE node=?", (node,)).fetchone()
        stored = None if row is None else _stored_node(row)
        if len(self._nodes) >= NODE_CACHE_MAX:
            del self._nodes[next(iter(self._nodes))]
        self._nodes[node] = stored
        return stored

    def recent_nodes(self, limit: int) -> list[StoredNode]:
        """The nodes with the newest records (the dashboard's list)."""
        rows = self.db.execute(f"SELECT {NODE_COLUMNS} FROM nodes ORDER BY timestamp DESC LIMIT ?", (limit,))
        return [_stored_node(r) for r in rows]

    def node_count(self) -> int:
        return self._count("nodes")

    def _count(self, what: str) -> int:
        row = self.db.execute("SELECT n FROM counts WHERE what=?", (what,)).fetchone()
        return row[0] if row else 0

    def pending(self, limit: int) -> list[OutboxItem]:
        rows = self.db.execute(
            "SELECT node, timestamp, revoked, signature FROM outbox WHERE state='pending' ORDER BY timestamp LIMIT ?",
            (limit,),
        ).fetchall()
        return self._items(rows)

    def _items(self, rows: list) -> list[OutboxItem]:
        return [OutboxItem(NodeTransaction(r[0], self.dc, r[1], bool(r[2])), r[3]) for r in rows]

    def confirmed_since(self, block: int) -> list[OutboxItem]:
        """Outbox rows confirmed in block `block` or later (what a rollback from there may undo)."""
        rows = self.db.execute(
            "SELECT node, timestamp, revoked, signature FROM outbox WHERE state='confirmed' AND block>=? "
            "ORDER BY timestamp",
            (block,),
        ).fetchall()
        return self._items(rows)

    def reopen(self, items: list[OutboxItem]) -> None:
        """Back to pending (the chain lost them): the submitter sends them again."""
        with self.db:
            self.db.execute("BEGIN")
            for item in items:
                self.db.execute(
                    "UPDATE outbox SET state='pending', tx=NULL, block=NULL, reason=NULL WHERE node=? AND timestamp=?",
                    (item.record.node, item.record.timestamp),
                )

    def outbox_state(self, node: bytes, timestamp: int) -> tuple[str, str | None, int | None, str | None] | None:
        row = self.db.execute(
            "SELECT state, tx, block, reason FROM outbox WHERE node=? AND timestamp=?", (node, timestamp)
        ).fetchone()
        return tuple(row) if row else None

    def prune_confirmed(self, below_block: int) -> int:
        """Delete confirmed outbox rows mined before `below_block`; how many went. For rows deeper
        than any rollback the DC re-checks (dc/cache.py REMEMBERED_BLOCKS): the record is on chain,
        and the node's newest record (with its signature) stays in `nodes`."""
        with self.db:
            return self.db.execute("DELETE FROM outbox WHERE state='confirmed' AND block < ?", (below_block,)).rowcount

    def count_outbox(self, state: str) -> int:
        return self._count("outbox:" + state)

    def add_notice(self, node: bytes, item: bytes, body: dict, expires_ms: int) -> None:
        with self.db:
            self.db.execute(
                "INSERT OR REPLACE INTO notices VALUES (?,?,?,?)", (node, item, json.dumps(body), expires_ms)
            )

    def notices(self, node: bytes, now_ms: int) -> list[dict]:
        """Unexpired notices for `node`, oldest first (expired ones are deleted on the way)."""
        with self.db:
            self.db.execute("DELETE FROM notices WHERE expires_ms <= ?", (now_ms,))
        return [
            json.loads(r[0]) for r in self.db.execute("SELECT body FROM notices WHERE node=? ORDER BY rowid", (node,))
        ]

    def notice_count(self, node: bytes) -> int:
        return self.db.execute("SELECT count(*) FROM notices WHERE node=?", (node,)).fetchone()[0]

    def drop_notice(self, node: bytes, item: bytes) -> None:
        with self.db:
            self.db.execute("DELETE FROM notices WHERE node=? AND item=?", (node, item))

    def remember_block(self, number: int, block_hash: bytes) -> None:
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO blocks VALUES (?, ?)", (number, block_hash))
            self.db.execute("DELETE FROM blocks WHERE number <= (SELECT max(number) FROM blocks) - ?", (BLOCKS_KEPT,))

    def forget_blocks(self, fork: int) -> None:
        """After a rollback from block `fork`: those hashes are of blocks the chain no longer has."""
        with self.db:
            self.db.execute("DELETE FROM blocks WHERE number >= ?", (fork,))

    def blocks(self) -> list[tuple[int, bytes]]:
        return self.db.execute("SELECT number, hash FROM blocks ORDER BY number").fetchall()

    def settle(self, results: list[tuple[OutboxItem, str, str | None, int | None, str | None]]) -> None:
        """Record chain outcomes: (item, 'confirmed'|'rejected', tx, block, reason), one commit."""
        with self.db:
            self.db.execute("BEGIN")
            for item, state, tx, block, reason in results:
                self.db.execute(
                    "UPDATE outbox SET state=?, tx=?, block=?, reason=? WHERE node=? AND timestamp=?",
                    (state, tx, block, reason, item.record.node, item.record.timestamp),
                )
