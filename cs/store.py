"""The Cache Server's durable store: an SQLite index and one blob file per item.

An upload streams into a temporary file; once all of it is there it is fsynced, renamed into
place, its directory fsynced, and only then is the index row committed (WAL, synchronous=FULL):
an acknowledged item survives kill -9, and a crash before that leaves at most a temporary file,
removed at the next start. The store holds ciphertext only (ntm/seal.py).
"""

from __future__ import annotations

import json
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    item       BLOB PRIMARY KEY,     -- 16-byte item ID
    sender     BLOB NOT NULL,        -- node ID
    header     TEXT NOT NULL,        -- the sealed item's public header (JSON)
    size       INTEGER NOT NULL,     -- ciphertext bytes
    created_ms INTEGER NOT NULL,     -- when the CS stored it
    expires_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS recipients (
    item      BLOB NOT NULL REFERENCES items(item) ON DELETE CASCADE,
    recipient BLOB NOT NULL,
    confirmed INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (item, recipient)
);
CREATE INDEX IF NOT EXISTS by_recipient ON recipients (recipient) WHERE confirmed = 0;
CREATE INDEX IF NOT EXISTS by_sender ON items (sender);
"""


@dataclass(frozen=True)
class StoredItem:
    item: bytes
    sender: bytes
    header: dict
    size: int
    created_ms: int
    expires_ms: int


class Store:
    def __init__(self, data_dir: Path) -> None:
        self.dir = Path(data_dir)
        self.blobs = self.dir / "blobs"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.dir / "cs.sqlite", isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.executescript(SCHEMA)
        for tmp in self.blobs.glob("*.part"):  # uploads a crash interrupted: never acknowledged
            tmp.unlink()

    def close(self) -> None:
        self.db.close()

    def blob(self, item: bytes) -> Path:
        return self.blobs / item.hex()

    def partial(self, item: bytes) -> Path:
        return self.blobs / (item.hex() + ".part")

    def persist(self, item: bytes) -> None:
        """The upload in `partial(item)` is complete: fsync it, rename it into place, fsync the
        directory. Touches no SQLite: safe to run in a worker thread."""
        part = self.partial(item)
        with open(part, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(part, self.blob(item))
        dir_fd = os.open(self.blobs, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def index(
        self,
        item: bytes,
        sender: bytes,
        header: dict,
        recipients: list[bytes],
        size: int,
        created_ms: int,
        expires_ms: int,
    ) -> None:
        """Index a persisted blob: from this commit on the item exists (and is acknowledged)."""
        with self.db:
            self.db.execute("BEGIN")
            self.db.execute(
                "INSERT INTO items VALUES (?,?,?,?,?,?)",
                (item, sender, json.dumps(header), size, created_ms, expires_ms),
            )
            self.db.executemany(
                "INSERT INTO recipients (item, recipient) VALUES (?,?)", [(item, r) for r in recipients]
            )

    def _item(self, row) -> StoredItem:
        return StoredItem(row[0], row[1], json.loads(row[2]), row[3], row[4], row[5])

    def get(self, item: bytes) -> StoredItem | None:
        row = self.db.execute(
            "SELECT item, sender, header, size, created_ms, expires_ms FROM items WHERE item=?", (item,)
        ).fetchone()
        return self._item(row) if row else None

    def exists(self, item: bytes) -> bool:
        return self.get(item) is not None

    def waiting_for(self, recipient: bytes, item: bytes) -> bool:
        """Whether `recipient` is a recipient of `item` that has not confirmed it yet."""
        return (
            self.db.execute(
                "SELECT 1 FROM recipients WHERE item=? AND recipient=? AND confirmed=0", (item, recipient)
            ).fetchone()
            is not None
        )

    def inbox(self, recipient: bytes, now_ms: int) -> list[StoredItem]:
        rows = self.db.execute(
            "SELECT i.item, i.sender, i.header, i.size, i.created_ms, i.expires_ms FROM items i "
            "JOIN recipients r ON r.item = i.item WHERE r.recipient=? AND r.confirmed=0 AND i.expires_ms > ? "
            "ORDER BY i.created_ms",
            (recipient, now_ms),
        ).fetchall()
        return [self._item(r) for r in rows]

    def sender_usage(self, sender: bytes) -> tuple[int, int]:
        """(items, bytes) a sender has stored here."""
        n, size = self.db.execute(
            "SELECT count(*), coalesce(sum(size), 0) FROM items WHERE sender=?", (sender,)
        ).fetchone()
        return n, size

    def recipient_usage(self, recipient: bytes) -> int:
        """Bytes waiting for a recipient."""
        return self.db.execute(
            "SELECT coalesce(sum(i.size), 0) FROM items i JOIN recipients r ON r.item = i.item "
            "WHERE r.recipient=? AND r.confirmed=0",
            (recipient,),
        ).fetchone()[0]

    def confirm(self, item: bytes, recipient: bytes) -> bool:
        """Mark delivered to `recipient`; delete the item once every recipient has it. Returns
        whether the item is gone."""
        with self.db:
            self.db.execute("BEGIN")
            self.db.execute("UPDATE recipients SET confirmed=1 WHERE item=? AND recipient=?", (item, recipient))
            left = self.db.execute("SELECT count(*) FROM recipients WHERE item=? AND confirmed=0", (item,)).fetchone()[
                0
            ]
            if left == 0:
                self.db.execute("DELETE FROM items WHERE item=?", (item,))
        if left == 0:
            self.blob(item).unlink(missing_ok=True)
        return left == 0

    def expire(self, now_ms: int) -> int:
        """Delete items past their TTL; returns how many."""
        gone = [r[0] for r in self.db.execute("SELECT item FROM items WHERE expires_ms <= ?", (now_ms,))]
        with self.db:
            self.db.execute("BEGIN")
            self.db.executemany("DELETE FROM items WHERE item=?", [(i,) for i in gone])
        for item in gone:
            self.blob(item).unlink(missing_ok=True)
        return len(gone)

    def count(self) -> tuple[int, int]:
        return self.db.execute("SELECT count(*), coalesce(sum(size), 0) FROM items").fetchone()
