"""Groups as state machines (docs/PROTOCOL.md §13), without any I/O: what a member does with GMS
answers, control notes and group messages, and what the GMS decides on each request.

`GroupBook` holds one node's groups. What arrives (a payload from an authenticated sender, a GMS
answer) goes in; actions come out (`Save`, `Forget`, `Deliver`, `CatchUp`), which the adapter
(node/groups.py) carries out with its files, its GMS client and its tasks, in the order given. Every
refusal is a GroupError with a code, counted in `GroupBook.refused`, and changes nothing.

The GMS's decisions (`gms_*`) take a snapshot of one group (`GmsGroup`) and return the `Change` the
adapter (dc/groups.py) writes in one SQLite transaction, or refuse with GmsRefused.

Wire forms (control notes, GMS requests and answers) are the structs of ntm/messages.py; the
key schedule and group messages are ntm/group.py.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Union
from urllib.parse import urlsplit

import coincurve
import msgspec

from ntm import consent, group, keys, messages
from ntm.clock import Clock
from ntm.errors import CodedError, ParseError
from ntm.group import GroupError, GroupMessage

MSG, CONTROL = b"M", b"C"  # first byte of a group payload: a group message, or a control note
# A message of an epoch this node has no key for asks the GMS at most this often per group: a peer
# sending bogus epochs cannot make us hammer the GMS.
REFRESH_MIN_S = 2.0
MAX_PARKED = 256  # messages per group waiting for a key (the oldest go first)
# Groups one admin may create at a GMS: each costs the DC a few rows per epoch.
MAX_GROUPS_PER_ADMIN = 100
# Epochs a member can still ask RN2 for: enough to read what arrives late from a Cache Server
# (7 days) unless the group changes more than this often.
EPOCHS_KEPT = 64
STATUSES = ("invited", "member", "left", "removed")


@dataclass
class Epoch:
    rn2: bytes
    rn1_gen: int
    members: set[bytes]


@dataclass
class GroupState:
    """One group as a member (or invitee) knows it; saved as JSON by the adapter."""

    gid: bytes
    name: str
    admin: bytes
    gms: str
    status: str  # one of STATUSES
    epoch: int = 0  # newest epoch known
    joined: int = 0  # first epoch we belong to
    rn1: dict[int, bytes] = field(default_factory=dict)
    epochs: dict[int, Epoch] = field(default_factory=dict)
    counter: int = 0  # next counter of our own messages (saved before use: never reused)
    replay: group.Replay = field(default_factory=group.Replay)
    rn1_sent: dict[bytes, int] = field(default_factory=dict)  # admin: generation each member has
    pending_remove: tuple[bytes, int] | None = None  # admin: a removal the GMS has not confirmed
    parked: list[bytes] = field(default_factory=list)
    read: int = 0  # messages `recv` has handed out
    invited: set[bytes] = field(default_factory=set)  # open invitations, as the GMS last said

    def key(self, epoch: int) -> bytes | None:
        ep = self.epochs.get(epoch)
        rn1 = self.rn1.get(ep.rn1_gen) if ep else None
        return group.group_key(rn1, ep.rn2, self.gid, self.name, epoch) if rn1 else None

    def members(self) -> set[bytes]:
        ep = self.epochs.get(self.epoch)
        return ep.members if ep else set()

    def to_json(self) -> dict:
        return {
            "gid": self.gid.hex(),
            "name": self.name,
            "admin": keys.checksum(self.admin),
            "gms": self.gms,
            "status": self.status,
            "epoch": self.epoch,
            "joined": self.joined,
            "rn1": {str(g): v.hex() for g, v in self.rn1.items()},
            "epochs": {
                str(e): {
                    "rn2": ep.rn2.hex(),
                    "rn1_gen": ep.rn1_gen,
                    "members": sorted(keys.checksum(m) for m in ep.members),
                }
                for e, ep in self.epochs.items()
            },
            "counter": self.counter,
            "replay": self.replay.dump(),
            "rn1_sent": {keys.checksum(m): g for m, g in self.rn1_sent.items()},
            "pending_remove": [keys.checksum(self.pending_remove[0]), self.pending_remove[1]]
            if self.pending_remove
            else None,
            "parked": [p.hex() for p in self.parked],
            "read": self.read,
            "invited": sorted(keys.checksum(m) for m in self.invited),
        }

    @classmethod
    def from_json(cls, d: dict) -> "GroupState":
        pr = d.get("pending_remove")
        return cls(
            bytes.fromhex(d["gid"]),
            d["name"],
            keys.parse_node_id(d["admin"]),
            d["gms"],
            d["status"],
            d["epoch"],
            d["joined"],
            {int(g): bytes.fromhex(v) for g, v in d["rn1"].items()},
            {
                int(e): Epoch(bytes.fromhex(v["rn2"]), v["rn1_gen"], {keys.parse_node_id(m) for m in v["members"]})
                for e, v in d["epochs"].items()
            },
            d["counter"],
            group.Replay.load(d["replay"]),
            {keys.parse_node_id(m): g for m, g in d["rn1_sent"].items()},
            (keys.parse_node_id(pr[0]), pr[1]) if pr else None,
            [bytes.fromhex(p) for p in d["parked"]],
            d["read"],
            {keys.parse_node_id(m) for m in d["invited"]},
        )


# --- actions out ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Save:
    """Write the group's state (atomically): it changed."""

    g: GroupState


@dataclass(frozen=True)
class Forget:
    """Delete the group's state: an invitation declined or evicted."""

    g: GroupState


@dataclass(frozen=True)
class Deliver:
    """Append `entry` to the group's received messages (before the Save that follows it)."""

    g: GroupState
    entry: dict


@dataclass(frozen=True)
class CatchUp:
    """Refresh the group at its GMS after `delay_s` (and retry the parked messages)."""

    g: GroupState
    delay_s: float


Action = Union[Save, Forget, Deliver, CatchUp]


# --- wire forms ----------------------------------------------------------------------------------
def check_gms_url(url: object) -> str:
    parts = urlsplit(url) if isinstance(url, str) and len(url) <= 200 else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise GroupError("malformed", f"not a GMS URL: {url!r}")
    return url.rstrip("/")


def decode_note(data: bytes) -> messages.ControlNote:
    """A control note (after the CONTROL byte); GroupError `malformed` for anything else."""
    try:
        return messages.decode(messages.ControlNote, data)
    except ParseError as exc:
        raise GroupError("malformed", f"control message: {exc}") from None


def encode_note(note: messages.ControlNote) -> bytes:
    """The payload of a control note: CONTROL || compact JSON, the tag `t` first."""
    return CONTROL + msgspec.json.encode(note)


def decode_view(obj: object) -> messages.GmsView:
    """A GMS answer; GroupError `malformed` (a GMS that answers nonsense changes nothing here)."""
    try:
        return messages.decode(messages.GmsView, obj)
    except ParseError as exc:
        raise GroupError("malformed", f"GMS answer: {exc}") from None


def apply_view(g: GroupState, view: messages.GmsView, key: coincurve.PrivateKey) -> None:
    """Take a GMS answer: membership, epochs (RN2 unwrapped with our key; a wrap that does not open
    refuses the whole answer before anything changes). We are a member by its saying so."""
    gid = bytes.fromhex(view.gid)
    if gid != g.gid:
        raise GroupError("malformed", f"a GMS answer about group {view.gid}, not {g.gid.hex()}")
    try:
        name = group.check_name(view.name)
    except ValueError as exc:
        raise GroupError("malformed", f"GMS answer: {exc}") from None
    epochs = {
        e.epoch: Epoch(
            group.unwrap_secret(key, bytes.fromhex(e.rn2), gid, e.epoch),
            e.rn1_gen,
            {keys.parse_node_id(m) for m in e.members},
        )
        for e in view.epochs
    }
    g.name, g.admin, g.status = name, keys.parse_node_id(view.admin), "member"
    g.epochs.update(epochs)
    if epochs:
        g.joined = min(g.joined or min(epochs), min(epochs))
    g.epoch = max(g.epoch, view.epoch)
    g.invited = {keys.parse_node_id(m) for m in view.invited}
    if g.admin == keys.node_id_of(key) and view.rn1_gen not in g.rn1:
        g.rn1[view.rn1_gen] = group.new_rn()  # a departure started this generation at the GMS


def stage_removal(g: GroupState, node: bytes) -> None:
    """Admin: a fresh RN1 for the generation after the current one, saved with the pending removal
    before the GMS hears of it (a GMS that moved on refuses it, and the admin stages again)."""
    gen = (g.epochs[g.epoch].rn1_gen if g.epoch in g.epochs else max(g.rn1)) + 1
    g.rn1[gen] = group.new_rn()  # never handed out yet: the GMS has not started it
    g.pending_remove = (node, gen)


def rn1_lacking(g: GroupState, me: bytes) -> tuple[messages.Rn1Note, list[bytes]] | None:
    """Admin: the current RN1 and the members of the current epoch that have not acknowledged it."""
    ep = g.epochs.get(g.epoch)
    if ep is None or ep.rn1_gen not in g.rn1:
        return None
    lacking = sorted(m for m in ep.members if m != me and g.rn1_sent.get(m, 0) < ep.rn1_gen)
    if not lacking:
        return None
    return messages.Rn1Note(g.gid.hex(), ep.rn1_gen, g.rn1[ep.rn1_gen].hex()), lacking


# --- a member's groups ---------------------------------------------------------------------------
class GroupBook:
    """One node's groups and every decision on what arrives for them."""

    def __init__(
        self, key: coincurve.PrivateKey, clock: Clock, admits: Callable[[bytes], bool] = lambda peer: False
    ) -> None:
        """`admits(peer)`: the node's own policy (allow list), which decides whose invitations are
        held first (ntm/consent.py); an invitation itself admits nobody."""
        self.key, self.me, self.clock, self.admits = key, keys.node_id_of(key), clock, admits
        self.groups: dict[bytes, GroupState] = {}
        self.refused: Counter[str] = Counter()
        self._refreshed: dict[bytes, float] = {}  # gid → clock.now() of its last GMS refresh
        self._catching_up: set[bytes] = set()

    def find(self, ref: str) -> GroupState:
        """A group by ID (hex) or by name (unique among ours)."""
        ref = ref.removeprefix("0x").lower()
        if ref in (gid.hex() for gid in self.groups):
            return self.groups[bytes.fromhex(ref)]
        named = [g for g in self.groups.values() if g.name.lower() == ref]
        if len(named) == 1:
            return named[0]
        raise GroupError(
            "unknown_group",
            f"no group {ref!r} here" if not named else f"{len(named)} groups are named {ref!r}: use the group ID",
        )

    def knows(self, peer: bytes) -> bool:
        """Peers whose tunnels we accept for the groups: members of the groups we belong to, and (an
        admin) the nodes it invited. Not who invited us: an invitation is a request, not an admission."""
        return any(
            peer == g.admin or peer in g.members() or peer in g.invited
            for g in self.groups.values()
            if g.status == "member"
        )

    def describe(self, g: GroupState) -> dict:
        return {
            "gid": g.gid.hex(),
            "name": g.name,
            "admin": keys.checksum(g.admin),
            "gms": g.gms,
            "status": g.status,
            "epoch": g.epoch,
            "rn1_gen": g.epochs[g.epoch].rn1_gen if g.epoch in g.epochs else None,
            "has_key": g.key(g.epoch) is not None,
            "members": sorted(keys.checksum(m) for m in g.members()),
            "you": keys.checksum(self.me),
            "pending_removal": keys.checksum(g.pending_remove[0]) if g.pending_remove else None,
        }

    def invitations(self) -> list[dict]:
        """Invitations waiting for the user's answer, oldest first."""
        return [
            {**self.describe(g), "admitted": self.admits(g.admin)}
            for g in self.groups.values()
            if g.status == "invited"
        ]

    def need_admin(self, g: GroupState) -> None:
        if g.admin != self.me:
            raise GroupError("not_admin", f"only the admin of group {g.name} ({keys.checksum(g.admin)}) may do that")

    def decline(self, ref: str) -> list[Action]:
        """Forget an invitation (the admin is not told: a stranger learns nothing from a refusal)."""
        g = self.find(ref)
        if g.status != "invited":
            raise GroupError("not_invited", f"group {g.name} is not an invitation waiting here ({g.status})")
        return self._forget(g)

    def _forget(self, g: GroupState) -> list[Action]:
        del self.groups[g.gid]
        return [Forget(g)]

    # --- catching up with the GMS ---------------------------------------------------------------
    def refreshed(self, g: GroupState) -> None:
        """The adapter asks the GMS about `g` now."""
        self._refreshed[g.gid] = self.clock.now()

    def want_catch_up(self, g: GroupState) -> list[Action]:
        """One catch-up per group at a time, at most every REFRESH_MIN_S: a peer sending messages of
        unknown epochs costs the GMS one request per REFRESH_MIN_S, whatever it sends."""
        if g.gid in self._catching_up:
            return []
        self._catching_up.add(g.gid)
        last = self._refreshed.get(g.gid)
        since = REFRESH_MIN_S if last is None else self.clock.now() - last
        return [CatchUp(g, max(0.0, REFRESH_MIN_S - since))]

    def catching_up(self, g: GroupState) -> None:
        """The adapter's CatchUp has waited its delay: the next want_catch_up schedules another."""
        self._catching_up.discard(g.gid)

    def gms_refused(self, g: GroupState, code: str) -> list[Action]:
        """A GMS that no longer counts us a member means we were removed."""
        if code == "not_member" and g.status == "member":
            g.status = "removed"
            return [Save(g)]
        return []

    # --- incoming -------------------------------------------------------------------------------
    def receive(self, sender: bytes, payload: bytes, via: str) -> list[Action]:
        """A group payload from `sender` (authenticated: the tunnel's peer, or the item's signer).
        A refusal is counted by its code and changes nothing."""
        try:
            if payload[:1] == MSG:
                return self.open(GroupMessage.decode(payload[1:]), via)
            if payload[:1] == CONTROL:
                return self.on_note(sender, decode_note(payload[1:]))
            raise GroupError("malformed", "not a group payload")
        except GroupError as exc:
            self.refused[exc.code] += 1
            raise

    def open(self, msg: GroupMessage, via: str) -> list[Action]:
        """Deliver a group message, or park it until its epoch's key is here."""
        g = self._group_of(msg)
        if self._decide(g, msg) is not None:
            return self._deliver(g, msg, via)
        g.parked = [*g.parked, msg.encode()][-MAX_PARKED:]
        return [Save(g), *self.want_catch_up(g)]

    def retry_parked(self, g: GroupState) -> list[Action]:
        """After a refresh or a new RN1: deliver what can be, refuse what must be, keep the rest."""
        keep: list[bytes] = []
        out: list[Action] = []
        for wire in g.parked:
            try:
                msg = GroupMessage.decode(wire)
                if self._decide(g, msg) is None:
                    keep.append(wire)
                else:
                    out += self._deliver(g, msg, "parked")
            except GroupError as exc:
                self.refused[exc.code] += 1
        g.parked = keep
        return [*out, Save(g)]

    def _group_of(self, msg: GroupMessage) -> GroupState:
        g = self.groups.get(msg.gid)
        if g is None or g.status not in ("member", "removed", "left"):
            raise GroupError("unknown_group", f"a message for group {msg.gid.hex()}, which this node is not in")
        return g

    def _decide(self, g: GroupState, msg: GroupMessage) -> bytes | None:
        """The epoch's key if the message may be opened now, None if it waits for that key."""
        g.replay.check(msg)
        msg.check_signature()
        if g.joined and msg.epoch < g.joined:
            raise GroupError("before_join", f"epoch {msg.epoch} is before this node joined group {g.name}")
        gk = g.key(msg.epoch)
        if gk is None:
            return None
        if msg.sender not in g.epochs[msg.epoch].members:
            raise GroupError("not_member", f"{keys.checksum(msg.sender)} is not a member of epoch {msg.epoch}")
        group.check_still_member({e: ep.members for e, ep in g.epochs.items()}, msg.epoch, msg.sender)
        return gk

    def _deliver(self, g: GroupState, msg: GroupMessage, via: str) -> list[Action]:
        gk = g.key(msg.epoch)
        assert gk is not None
        text = msg.decrypt(gk)
        g.replay.update(msg)
        entry = {
            "gid": g.gid.hex(),
            "group": g.name,
            "epoch": msg.epoch,
            "sender": keys.checksum(msg.sender),
            "counter": msg.counter,
            "text": text.decode(errors="replace"),
            "via": via,
            "received": self.clock.wall_ms(),
            "wire": msg.encode().hex(),
        }
        return [Deliver(g, entry), Save(g)]

    def on_note(self, sender: bytes, note: messages.ControlNote) -> list[Action]:
        gid = bytes.fromhex(note.gid)
        if isinstance(note, messages.InviteNote):
            return self._on_invite(sender, gid, note)
        g = self.groups.get(gid)
        if g is None:
            raise GroupError("unknown_group", f"control message for group {gid.hex()}, which this node is not in")
        if isinstance(note, messages.Rn1Note):
            if sender != g.admin:
                raise GroupError("not_admin", f"RN1 of group {g.name} from {keys.checksum(sender)}, not its admin")
            rn1 = bytes.fromhex(note.rn1)
            if g.rn1.get(note.gen, rn1) != rn1:
                raise GroupError("malformed", f"RN1 generation {note.gen} of group {g.name} changed")
            g.rn1[note.gen] = rn1
            return [Save(g), *self.retry_parked(g)]
        if g.admin == self.me:  # joined, left: look at the GMS now
            return self.want_catch_up(g)
        return []

    def _on_invite(self, sender: bytes, gid: bytes, note: messages.InviteNote) -> list[Action]:
        try:
            admin, name = keys.parse_node_id(note.admin), group.check_name(note.name)
        except ValueError as exc:
            raise GroupError("malformed", f"invitation: {exc}") from None
        gms = check_gms_url(note.gms)
        if admin != sender:
            raise GroupError("not_admin", f"an invitation to {name} signed by {keys.checksum(sender)}, not its admin")
        if gid in self.groups and self.groups[gid].status in ("member", "invited"):
            return []  # a member already, or invited already: the first invitation stands
        held = [
            consent.HeldInvite(g.gid, g.admin, self.admits(g.admin))
            for g in self.groups.values()
            if g.status == "invited"
        ]
        verdict = consent.invitation_verdict(held, admin, self.admits(admin))
        if not verdict.keep:
            raise GroupError(str(verdict.refusal), f"invitation to {name} from {keys.checksum(admin)} not kept")
        out = self._forget(self.groups[verdict.evict]) if verdict.evict is not None else []
        g = GroupState(gid, name, admin, gms, "invited")
        self.groups[gid] = g
        return [*out, Save(g)]


# --- the GMS's decisions -------------------------------------------------------------------------
class GmsRefused(CodedError):
    """unknown_group, exists, not_admin, not_member, not_invited, unregistered, revoked, too_many,
    bad_request."""

    STATUS = {
        "unknown_group": 404,
        "exists": 409,
        "not_admin": 403,
        "not_member": 403,
        "not_invited": 403,
        "unregistered": 403,
        "revoked": 403,
        "too_many": 429,
        "bad_request": 400,
    }


@dataclass(frozen=True)
class GmsGroup:
    """One group as the GMS holds it: enough to decide any request about it."""

    gid: bytes
    name: str
    admin: bytes
    epoch: int
    rn1_gen: int
    members: tuple[bytes, ...]  # in the order they joined
    invited: frozenset[bytes]


@dataclass(frozen=True)
class Change:
    """What one request changes, written in one transaction. `members` is None: no new epoch."""

    why: str
    members: tuple[bytes, ...] | None = None  # the new epoch's members
    rn1_gen: int = 0  # the new epoch's RN1 generation
    invite: bytes | None = None  # an invitation to add
    uninvite: bytes | None = None  # an invitation to withdraw (accepted or cancelled)


def gms_registered(node: bytes, newest_ts: int, revoked: bool) -> None:
    """Only registered, unrevoked nodes take part (as the DC's registry cache and pending records say)."""
    if revoked:
        raise GmsRefused("revoked", f"{keys.checksum(node)} is revoked")
    if not newest_ts:
        raise GmsRefused("unregistered", f"{keys.checksum(node)} is not a registered node")


def gms_create(admin: bytes, gid: bytes, exists: bool, administered: int) -> None:
    """A new group (epoch 1, RN1 generation 1, the admin its only member) may be made."""
    if exists:
        raise GmsRefused("exists", f"group {gid.hex()} exists")
    if administered >= MAX_GROUPS_PER_ADMIN:
        raise GmsRefused("too_many", f"{keys.checksum(admin)} already administers {administered} groups")


def _need_admin(g: GmsGroup, node: bytes) -> None:
    if node != g.admin:
        raise GmsRefused("not_admin", f"only the admin of group {g.name} may do that")


def need_member(g: GmsGroup, node: bytes) -> None:
    if node not in g.members:
        raise GmsRefused("not_member", f"{keys.checksum(node)} is not a member of group {g.name}")


def gms_invite(g: GmsGroup, admin: bytes, node: bytes) -> Change | None:
    """The admin lets `node` accept; no new epoch (None: a member already, or invited already)."""
    _need_admin(g, admin)
    if node in g.members or node in g.invited:
        return None
    if len(g.invited) >= messages.GROUP_MAX_INVITES:
        raise GmsRefused("too_many", f"group {g.name} has {messages.GROUP_MAX_INVITES} open invitations")
    return Change(f"invited {keys.checksum(node)}", invite=node)


def gms_accept(g: GmsGroup, node: bytes) -> Change | None:
    """An invitee joins: a new epoch, same RN1 generation (None: joined before, the answer was lost)."""
    if node in g.members:
        return None
    if node not in g.invited:
        raise GmsRefused("not_invited", f"{keys.checksum(node)} is not invited to group {g.name}")
    if len(g.members) >= messages.GROUP_MAX_MEMBERS:
        raise GmsRefused("too_many", f"group {g.name} has {messages.GROUP_MAX_MEMBERS} members")
    return Change(f"joined {keys.checksum(node)}", (*g.members, node), g.rn1_gen, uninvite=node)


def gms_leave(g: GmsGroup, node: bytes) -> Change:
    """A member departs: a new epoch and RN1 generation, which the admin makes when it sees it."""
    if node == g.admin:
        raise GmsRefused("bad_request", "the admin cannot leave its group")
    need_member(g, node)
    return Change(f"left {keys.checksum(node)}", tuple(m for m in g.members if m != node), g.rn1_gen + 1)


def gms_remove(g: GmsGroup, admin: bytes, node: bytes, rn1_gen: int) -> Change | None:
    """The admin removes a member (naming the RN1 generation it hands the others), or withdraws an
    invitation. None: removed before, the answer was lost."""
    _need_admin(g, admin)
    if node == admin:
        raise GmsRefused("bad_request", "the admin cannot remove itself")
    if node not in g.members:
        if node in g.invited:
            return Change(f"uninvited {keys.checksum(node)}", uninvite=node)
        if rn1_gen == g.rn1_gen:
            return None
        raise GmsRefused("not_member", f"{keys.checksum(node)} is not a member of group {g.name}")
    if rn1_gen != g.rn1_gen + 1:
        raise GmsRefused("bad_request", f"a removal starts RN1 generation {g.rn1_gen + 1}, not {rn1_gen}")
    return Change(f"removed {keys.checksum(node)}", tuple(m for m in g.members if m != node), rn1_gen)
