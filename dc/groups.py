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
"""

from __future__ import annotations

import json
import logging
import sqlite3
from dataclasses import dataclass
from typing import Callable

from ntm import envelope, group, keys
from ntm.clock import Clock
from ntm.errors import CodedError, ParseError

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

KINDS = ("group.create", "group.invite", "group.accept", "group.leave", "group.remove", "group.state")
# Members per group: every change is O(members) for the admin (a new RN1 to each) and the answer
# lists them; beyond a thousand a tree scheme (MLS) is the better tool.
MAX_MEMBERS = 1000
MAX_INVITES = 1000  # open invitations per group
MAX_GROUPS_PER_ADMIN = 100
# Epochs a member can still ask RN2 for: enough to read what arrives late from a Cache Server
# (7 days) unless the group changes more than this often.
EPOCHS_KEPT = 64
EPOCHS_PER_ANSWER = 16  # answers carry at most this many (newest) epochs


class GroupRefused(CodedError):
    """unknown_group, exists, not_admin, not_member, not_invited, unregistered, revoked, too_many,
    bad_request."""

    STATUS = {"unknown_group": 404, "exists": 409, "not_admin": 403, "not_member": 403, "not_invited": 403,
              "unregistered": 403, "revoked": 403, "too_many": 429, "bad_request": 400}


@dataclass(frozen=True)
class Group:
    gid: bytes
    name: str
    admin: bytes
    epoch: int
    rn1_gen: int


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
        body = env.body
        if kind == "group.create":
            return self.create(node, _signer_key(env, obj), _gid(body), _name(body))
        g = self._group(_gid(body))
        if kind == "group.invite":
            return self.invite(node, g, _node(body, "node"))
        if kind == "group.accept":
            return self.accept(node, _signer_key(env, obj), g)
        if kind == "group.leave":
            return self.leave(node, g)
        if kind == "group.remove":
            return self.remove(node, g, _node(body, "node"), _int(body, "rn1_gen"))
        return self.view(node, g, _int(body, "since", 0))

    def create(self, admin: bytes, pubkey: bytes, gid: bytes, name: str) -> dict:
        if self.db.execute("SELECT 1 FROM groups WHERE gid=?", (gid,)).fetchone():
            raise GroupRefused("exists", f"group {gid.hex()} exists")
        n = self.db.execute("SELECT count(*) FROM groups WHERE admin=?", (admin,)).fetchone()[0]
        if n >= MAX_GROUPS_PER_ADMIN:
            raise GroupRefused("too_many", f"{keys.checksum(admin)} already administers {n} groups")
        now = self.clock.wall_ms()
        with self.db:
            self.db.execute("BEGIN")
            self.db.execute("INSERT INTO groups VALUES (?, ?, ?, 1, 1, ?)", (gid, name, admin, now))
            self.db.execute("INSERT INTO group_members VALUES (?, ?, ?, 1)", (gid, admin, pubkey))
            self._new_epoch(gid, 1, 1, [admin], "created", now)
        log.info("group %s (%s) created by %s", gid.hex(), name, keys.checksum(admin))
        return self.view(admin, self._group(gid))

    def invite(self, admin: bytes, g: Group, node: bytes) -> dict:
        self._admin(admin, g)
        self._registered(node)
        if not self._is_member(g.gid, node):
            if self.db.execute("SELECT count(*) FROM group_invites WHERE gid=?", (g.gid,)).fetchone()[0] >= MAX_INVITES:
                raise GroupRefused("too_many", f"group {g.name} has {MAX_INVITES} open invitations")
            with self.db:
                self.db.execute("INSERT OR IGNORE INTO group_invites VALUES (?, ?)", (g.gid, node))
        return self.view(admin, g)

    def accept(self, node: bytes, pubkey: bytes, g: Group) -> dict:
        if self._is_member(g.gid, node):
            return self.view(node, g)  # accepted before; the answer was lost
        if not self.db.execute("SELECT 1 FROM group_invites WHERE gid=? AND node=?", (g.gid, node)).fetchone():
            raise GroupRefused("not_invited", f"{keys.checksum(node)} is not invited to group {g.name}")
        members = self._members(g.gid)
        if len(members) >= MAX_MEMBERS:
            raise GroupRefused("too_many", f"group {g.name} has {MAX_MEMBERS} members")
        epoch = g.epoch + 1
        with self.db:
            self.db.execute("BEGIN")
            self.db.execute("DELETE FROM group_invites WHERE gid=? AND node=?", (g.gid, node))
            self.db.execute("INSERT INTO group_members VALUES (?, ?, ?, ?)", (g.gid, node, pubkey, epoch))
            self._new_epoch(g.gid, epoch, g.rn1_gen, [*members, node], f"joined {keys.checksum(node)}")
        log.info("group %s: %s joined, epoch %d", g.gid.hex(), keys.checksum(node), epoch)
        return self.view(node, self._group(g.gid))

    def leave(self, node: bytes, g: Group) -> dict:
        if node == g.admin:
            raise GroupRefused("bad_request", "the admin cannot leave its group")
        if not self._is_member(g.gid, node):
            raise GroupRefused("not_member", f"{keys.checksum(node)} is not a member of group {g.name}")
        self._drop(g, node, g.rn1_gen + 1, f"left {keys.checksum(node)}")
        return {"gid": g.gid.hex(), "left": True}

    def remove(self, admin: bytes, g: Group, node: bytes, rn1_gen: int) -> dict:
        """The admin removes a member (and names the RN1 generation it hands the others), or
        withdraws an invitation."""
        self._admin(admin, g)
        if node == admin:
            raise GroupRefused("bad_request", "the admin cannot remove itself")
        if not self._is_member(g.gid, node):
            with self.db:
                gone = self.db.execute("DELETE FROM group_invites WHERE gid=? AND node=?", (g.gid, node)).rowcount
            if gone or rn1_gen == g.rn1_gen:  # an invitation withdrawn, or removed before (answer lost)
                return self.view(admin, g)
            raise GroupRefused("not_member", f"{keys.checksum(node)} is not a member of group {g.name}")
        if rn1_gen != g.rn1_gen + 1:
            raise GroupRefused("bad_request", f"a removal starts RN1 generation {g.rn1_gen + 1}, not {rn1_gen}")
        self._drop(g, node, rn1_gen, f"removed {keys.checksum(node)}")
        return self.view(admin, self._group(g.gid))

    def view(self, node: bytes, g: Group, since: int = 0) -> dict:
        """What a member may know: members, epochs since `since` it belonged to, RN2 wrapped to it."""
        if not self._is_member(g.gid, node):
            raise GroupRefused("not_member", f"{keys.checksum(node)} is not a member of group {g.name}")
        pub = self.db.execute("SELECT pubkey FROM group_members WHERE gid=? AND node=?", (g.gid, node)).fetchone()[0]
        rows = self.db.execute(
            "SELECT epoch, rn2, rn1_gen, members FROM group_epochs WHERE gid=? AND epoch>=? ORDER BY epoch DESC LIMIT ?",
            (g.gid, max(since, 1), EPOCHS_PER_ANSWER)).fetchall()
        epochs = []
        for epoch, rn2, rn1_gen, members in reversed(rows):
            ids = json.loads(members)
            if node.hex() in set(ids):
                epochs.append({"epoch": epoch, "rn1_gen": rn1_gen, "members": ["0x" + m for m in ids],
                               "rn2": group.wrap_secret(rn2, pub, g.gid, epoch).hex()})
        current = self.db.execute("SELECT members FROM group_epochs WHERE gid=? AND epoch=?", (g.gid, g.epoch)).fetchone()
        invited = ["0x" + r[0].hex() for r in self.db.execute("SELECT node FROM group_invites WHERE gid=?", (g.gid,))]
        # member lists as lower-case hex: a thousand EIP-55 checksums per answer cost more than the rest
        return {"gid": g.gid.hex(), "name": g.name, "admin": keys.checksum(g.admin), "epoch": g.epoch,
                "rn1_gen": g.rn1_gen, "members": ["0x" + m for m in json.loads(current[0])],
                "invited": invited, "epochs": epochs}

    # --- storage -------------------------------------------------------------------------------
    def _drop(self, g: Group, node: bytes, rn1_gen: int, why: str) -> None:
        epoch = g.epoch + 1
        members = [m for m in self._members(g.gid) if m != node]
        with self.db:
            self.db.execute("BEGIN")
            self.db.execute("DELETE FROM group_members WHERE gid=? AND node=?", (g.gid, node))
            self._new_epoch(g.gid, epoch, rn1_gen, members, why)
        log.info("group %s: %s, epoch %d, RN1 generation %d", g.gid.hex(), why, epoch, rn1_gen)

    def _new_epoch(self, gid: bytes, epoch: int, rn1_gen: int, members: list[bytes], why: str,
                   now: int | None = None) -> None:
        """Inside the caller's transaction: a fresh RN2 for `epoch`, the oldest epochs forgotten."""
        now = self.clock.wall_ms() if now is None else now
        self.db.execute("INSERT INTO group_epochs VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (gid, epoch, group.new_rn(), rn1_gen, json.dumps([m.hex() for m in members]), why, now))
        self.db.execute("UPDATE groups SET epoch=?, rn1_gen=? WHERE gid=?", (epoch, rn1_gen, gid))
        self.db.execute("DELETE FROM group_epochs WHERE gid=? AND epoch<=?", (gid, epoch - EPOCHS_KEPT))
        self.counters["group_rekeys"] += 1

    def _group(self, gid: bytes) -> Group:
        row = self.db.execute("SELECT gid, name, admin, epoch, rn1_gen FROM groups WHERE gid=?", (gid,)).fetchone()
        if row is None:
            raise GroupRefused("unknown_group", f"no group {gid.hex()} at this DC")
        return Group(*row)

    def _members(self, gid: bytes) -> list[bytes]:
        return [r[0] for r in self.db.execute("SELECT node FROM group_members WHERE gid=? ORDER BY joined, node", (gid,))]

    def _is_member(self, gid: bytes, node: bytes) -> bool:
        return self.db.execute("SELECT 1 FROM group_members WHERE gid=? AND node=?", (gid, node)).fetchone() is not None

    def _registered(self, node: bytes) -> None:
        """Only registered, unrevoked nodes take part (as the registry cache and pending records say)."""
        ts, revoked = self.latest(node)
        if revoked:
            raise GroupRefused("revoked", f"{keys.checksum(node)} is revoked")
        if not ts:
            raise GroupRefused("unregistered", f"{keys.checksum(node)} is not a registered node")

    def _admin(self, node: bytes, g: Group) -> None:
        if node != g.admin:
            raise GroupRefused("not_admin", f"only the admin of group {g.name} may do that")


def _signer_key(env: envelope.Envelope, obj: dict) -> bytes:
    """The uncompressed public key of an envelope's (already checked) signer: what RN2 is wrapped to."""
    return keys.recover(env.digest(), bytes.fromhex(obj["sig"])).format(compressed=False)


def _gid(body: dict) -> bytes:
    try:
        gid = bytes.fromhex(body["gid"])
    except (KeyError, TypeError, ValueError):
        gid = b""
    if len(gid) != group.GID_LEN:
        raise ParseError("gid must be 32 hex digits")
    return gid


def _name(body: dict) -> str:
    try:
        return group.check_name(body.get("name"))
    except ValueError as exc:
        raise ParseError(str(exc)) from None


def _node(body: dict, field: str) -> bytes:
    try:
        return keys.parse_node_id(body[field])
    except (KeyError, TypeError, ValueError) as exc:
        raise ParseError(f"{field}: {exc}") from None


def _int(body: dict, field: str, default: int | None = None) -> int:
    value = body.get(field, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ParseError(f"{field} must be a non-negative integer")
    return value
