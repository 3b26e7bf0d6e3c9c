"""The Group Management Server (GMS): a service every DC offers (docs/PROTOCOL.md §13).

It keeps each group's membership and the current epoch's RN2, hands RN2 to each member wrapped
to that member's key, and starts a new epoch (a fresh RN2) at every join and every departure.
It never sees RN1 or a group key: those stay between the members (ntm/group.py).

Why at the DC: nodes already trust their DC for their info, the DC knows from the registry which
nodes are registered and unrevoked (every request is a node-signed envelope, §4), it has a durable
SQLite store, and every member can reach it, wherever it is homed, through the DC list on chain.
A group lives at the DC its admin was homed at when creating it.

Each membership change is one SQLite transaction (WAL, synchronous=FULL, as dc/store.py): a
crash leaves the group at the old epoch or the new one, never between. Requests are idempotent,
so a node whose answer was lost sends the same request again.

This module is the adapter: SQLite, envelopes and the clock. What each request may do is decided by
ntm/groupstate.py (`gms_*`, on a snapshot of the group); requests and answers are the structs of
ntm/messages.py.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from typing import Callable

from ntm import envelope, group, keys, messages
from ntm import groupstate as core
from ntm.clock import Clock
from ntm.errors import ParseError
from ntm.groupstate import EPOCHS_KEPT, GmsRefused as GroupRefused

__all__ = ["EPOCHS_KEPT", "GroupRefused", "GroupService"]

log = logging.getLogger("ntm.dc.groups")

SCHEMA = """
CREATE TABLE IF NOT EXISTS groups (
    gid       BLOB PRIMARY KEY,
    name      TEXT NOT NULL,
    admin     BLOB NOT NULL,
    epoch     INTEGER NOT NULL,
    rn1_gen   INTEGER NOT NULL,   -- the admin's RN1 generation this epoch needs (never RN1 itself)
    created   INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS group_members (
    gid    BLOB NOT NULL,
    node   BLOB NOT NULL,
    pubkey BLOB NOT NULL,          -- recovered from its signed request: what RN2 is wrapped to
    joined INTEGER NOT NULL,       -- first epoch it belongs to
    PRIMARY KEY (gid, node)
);
CREATE TABLE IF NOT EXISTS group_invites (
    gid  BLOB NOT NULL,
    node BLOB NOT NULL,
    PRIMARY KEY (gid, node)
);
CREATE TABLE IF NOT EXISTS group_epochs (
    gid     BLOB NOT NULL,
    epoch   INTEGER NOT NULL,
    rn2     BLOB NOT NULL,
    rn1_gen INTEGER NOT NULL,
    members TEXT NOT NULL,         -- JSON list of member IDs (hex) in this epoch
    why     TEXT NOT NULL,
    created INTEGER NOT NULL,
    PRIMARY KEY (gid, epoch)
);
"""

# Each request's body (§13.3), by envelope kind.
KINDS = {kind: body for kind, body in messages.BODY_OF.items() if kind.startswith("group.")}


class GroupService:
    def __init__(self, db: sqlite3.Connection, latest: Callable[[bytes], tuple[int, bool]], clock: Clock) -> None:
        """`latest(node)` → (newest record timestamp, revoked) as the DC knows it (0: unknown)."""
        self.db, self.latest, self.clock = db, latest, clock
        self.db.executescript(SCHEMA)
        self.guard = envelope.ReplayGuard()
        self.counters = {"group_requests": 0, "group_refused": 0, "group_rekeys": 0}

    # --- requests ------------------------------------------------------------------------------
    def handle(self, obj: object) -> dict:
        """One node-signed envelope of a KINDS kind; the group as the signer may see it."""
        self.counters["group_requests"] += 1
        try:
            return self._handle(obj)
        except Exception:
            self.counters["group_refused"] += 1
            raise

    def _handle(self, obj: object) -> dict:
        kind = obj.get("kind") if isinstance(obj, dict) else None
        if kind not in KINDS:
            raise ParseError(f"expected a group request ({', '.join(KINDS)}), got {kind!r}")
        env = envelope.open_envelope(obj, kind, self.clock.wall_ms(), lambda _: True, self.guard)
        node = env.sender
        self._registered(node)
        body = envelope.body_of(env, KINDS[kind])
        gid = bytes.fromhex(body.gid)
        if isinstance(body, messages.GroupCreate):
            return self.create(node, _signer_key(env, obj), gid, _name(body.name))
        g = self._group(gid)
        if isinstance(body, messages.GroupInvite):
            return self.invite(node, g, messages.node_id(body.node))
        if isinstance(body, messages.GroupRemove):
            return self.remove(node, g, messages.node_id(body.node), body.rn1_gen)
        if isinstance(body, messages.GroupStateQuery):
            return self.view(node, g, body.since)
        if kind == "group.accept":
            return self.accept(node, _signer_key(env, obj), g)
        return self.leave(node, g)

    def create(self, admin: bytes, pubkey: bytes, gid: bytes, name: str) -> dict:
        exists = self.db.execute("SELECT 1 FROM groups WHERE gid=?", (gid,)).fetchone() is not None
        n = self.db.execute("SELECT count(*) FROM groups WHERE admin=?", (admin,)).fetchone()[0]
        core.gms_create(admin, gid, exists, n)
        now = self.clock.wall_ms()
        with self.db:
            self.db.execute("BEGIN")
            self.db.execute("INSERT INTO groups VALUES (?, ?, ?, 1, 1, ?)", (gid, name, admin, now))
            self.db.execute("INSERT INTO group_members VALUES (?, ?, ?, 1)", (gid, admin, pubkey))
            self._new_epoch(gid, 1, 1, [admin], "created", now)
        log.info("group %s (%s) created by %s", gid.hex(), name, keys.checksum(admin))
        return self.view(admin, self._group(gid))

    def invite(self, admin: bytes, g: core.GmsGroup, node: bytes) -> dict:
        change = core.gms_invite(g, admin, node)  # the admin's alone, before anything is looked up
        self._registered(node)
        self._commit(g, change)
        return self.view(admin, self._group(g.gid))

    def accept(self, node: bytes, pubkey: bytes, g: core.GmsGroup) -> dict:
        self._commit(g, core.gms_accept(g, node), pubkey)
        return self.view(node, self._group(g.gid))

    def leave(self, node: bytes, g: core.GmsGroup) -> dict:
        self._commit(g, core.gms_leave(g, node))
        return messages.encode(messages.GmsLeft(g.gid.hex(), True))

    def remove(self, admin: bytes, g: core.GmsGroup, node: bytes, rn1_gen: int) -> dict:
        """The admin removes a member (and names the RN1 generation it hands the others), or
        withdraws an invitation."""
        self._commit(g, core.gms_remove(g, admin, node, rn1_gen))
        return self.view(admin, self._group(g.gid))

    def view(self, node: bytes, g: core.GmsGroup, since: int = 0) -> dict:
        """What a member may know: members, epochs since `since` it belonged to, RN2 wrapped to it."""
        core.need_member(g, node)
        pub = self.db.execute("SELECT pubkey FROM group_members WHERE gid=? AND node=?", (g.gid, node)).fetchone()[0]
        rows = self.db.execute(
            "SELECT epoch, rn2, rn1_gen, members FROM group_epochs WHERE gid=? AND epoch>=? ORDER BY epoch DESC LIMIT ?",
            (g.gid, max(since, 1), messages.GROUP_EPOCHS_PER_ANSWER),
        ).fetchall()
        epochs = []
        for epoch, rn2, rn1_gen, members in reversed(rows):
            ids = json.loads(members)
            if node.hex() in set(ids):
                epochs.append(
                    messages.GmsEpoch(
                        epoch, rn1_gen, ["0x" + m for m in ids], group.wrap_secret(rn2, pub, g.gid, epoch).hex()
                    )
                )
        # member lists as lower-case hex: a thousand EIP-55 checksums per answer cost more than the rest
        return messages.encode(
            messages.GmsView(
                g.gid.hex(),
                g.name,
                keys.checksum(g.admin),
                g.epoch,
                g.rn1_gen,
                ["0x" + m.hex() for m in g.members],
                ["0x" + m.hex() for m in sorted(g.invited)],
                epochs,
            )
        )

    # --- storage -------------------------------------------------------------------------------
    def _commit(self, g: core.GmsGroup, change: core.Change | None, pubkey: bytes = b"") -> None:
        """One request's change in one transaction: invitations, members (a joiner with `pubkey`)
        and the new epoch."""
        if change is None:
            return
        epoch = g.epoch + 1
        with self.db:
            self.db.execute("BEGIN")
            if change.invite is not None:
                self.db.execute("INSERT OR IGNORE INTO group_invites VALUES (?, ?)", (g.gid, change.invite))
            if change.uninvite is not None:
                self.db.execute("DELETE FROM group_invites WHERE gid=? AND node=?", (g.gid, change.uninvite))
            if change.members is not None:
                for node in set(g.members) - set(change.members):
                    self.db.execute("DELETE FROM group_members WHERE gid=? AND node=?", (g.gid, node))
                for node in set(change.members) - set(g.members):
                    self.db.execute("INSERT INTO group_members VALUES (?, ?, ?, ?)", (g.gid, node, pubkey, epoch))
                self._new_epoch(g.gid, epoch, change.rn1_gen, list(change.members), change.why)
        if change.members is not None:
            log.info("group %s: %s, epoch %d, RN1 generation %d", g.gid.hex(), change.why, epoch, change.rn1_gen)

    def _new_epoch(
        self, gid: bytes, epoch: int, rn1_gen: int, members: list[bytes], why: str, now: int | None = None
    ) -> None:
        """Inside the caller's transaction: a fresh RN2 for `epoch`, the oldest epochs forgotten."""
        now = self.clock.wall_ms() if now is None else now
        self.db.execute(
            "INSERT INTO group_epochs VALUES (?, ?, ?, ?, ?, ?, ?)",
            (gid, epoch, group.new_rn(), rn1_gen, json.dumps([m.hex() for m in members]), why, now),
        )
        self.db.execute("UPDATE groups SET epoch=?, rn1_gen=? WHERE gid=?", (epoch, rn1_gen, gid))
        self.db.execute("DELETE FROM group_epochs WHERE gid=? AND epoch<=?", (gid, epoch - EPOCHS_KEPT))
        self.counters["group_rekeys"] += 1

    def _group(self, gid: bytes) -> core.GmsGroup:
        row = self.db.execute("SELECT gid, name, admin, epoch, rn1_gen FROM groups WHERE gid=?", (gid,)).fetchone()
        if row is None:
            raise GroupRefused("unknown_group", f"no group {gid.hex()} at this DC")
        members = tuple(
            r[0] for r in self.db.execute("SELECT node FROM group_members WHERE gid=? ORDER BY joined, node", (gid,))
        )
        invited = frozenset(r[0] for r in self.db.execute("SELECT node FROM group_invites WHERE gid=?", (gid,)))
        return core.GmsGroup(*row, members, invited)

    def _registered(self, node: bytes) -> None:
        """Only registered, unrevoked nodes take part (as the registry cache and pending records say)."""
        core.gms_registered(node, *self.latest(node))


def _signer_key(env: envelope.Envelope, obj: dict) -> bytes:
    """The uncompressed public key of an envelope's (already checked) signer: what RN2 is wrapped to."""
    return keys.recover(env.digest(), bytes.fromhex(obj["sig"])).format(compressed=False)


def _name(name: str) -> str:
    try:
        return group.check_name(name)
    except ValueError as exc:
        raise ParseError(str(exc)) from None
