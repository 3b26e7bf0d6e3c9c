"""A member's side of group keys (docs/PROTOCOL.md §13): the groups this node belongs to, their
keys, and group messages in and out.

The node keeps, per group, the RN1 generations its admin handed it (end to end: over a tunnel
or sealed at a Cache Server), the RN2 of each epoch the GMS wrapped to it, and derives every
epoch's key itself (ntm/group.py). The admin makes RN1: one generation at creation and a new one
whenever somebody leaves or is removed, handed to every remaining member by `_sync_members`.

Group messages go to every other member of the current epoch over a tunnel (acknowledged); a
member that does not acknowledge within FANOUT_ACK_S gets it sealed at a Cache Server. A message
of an epoch this node has no key for yet waits (parked, on disk) until a GMS refresh or the
admin's new RN1 supplies it. State lives in $NTM_HOME/groups/<gid>.json (replaced atomically),
received messages in <gid>.messages.jsonl.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol
from urllib.parse import urlsplit

import aiohttp
import coincurve

from daemon import tlspin
from daemon.service import BackgroundTasks
from node import state
from ntm import consent, envelope, group, keys
from ntm.errors import NtmError
from ntm.group import GroupError, GroupMessage

log = logging.getLogger("ntm.node.groups")

GROUP_APP = "ntm-group"  # the app_id of Cache Server items that carry group traffic
MSG, CONTROL = b"M", b"C"  # first byte of a group payload: a group message, or a control message
# A member that has not acknowledged a message over its tunnel by then gets it from a Cache
# Server (tunnel set-up included: a direct path opens in well under a second).
FANOUT_ACK_S = 3.0
# A message of an epoch we have no key for asks the GMS at most this often per group: a peer
# sending bogus epochs cannot make us hammer the GMS.
REFRESH_MIN_S = 2.0
# The admin looks at its groups at the GMS this often (a member's "joined"/"left" note makes it
# look at once; this catches notes that were lost).
ADMIN_SYNC_S = 30.0
MAX_PARKED = 256  # messages per group waiting for a key
GMS_TIMEOUT_S = 10.0


class Transport(Protocol):
    async def deliver(self, peer: bytes, payload: bytes) -> bool:
        """Over a tunnel; True once the peer acknowledged."""

    async def store(self, peers: list[bytes], payload: bytes) -> list[bytes]:
        """Sealed at a Cache Server for `peers`; returns those it was stored for."""


@dataclass
class Epoch:
    rn2: bytes
    rn1_gen: int
    members: set[bytes]


@dataclass
class GroupState:
    gid: bytes
    name: str
    admin: bytes
    gms: str
    status: str  # invited | member | left | removed
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
        return {"gid": self.gid.hex(), "name": self.name, "admin": keys.checksum(self.admin), "gms": self.gms,
                "status": self.status, "epoch": self.epoch, "joined": self.joined,
                "rn1": {str(g): v.hex() for g, v in self.rn1.items()},
                "epochs": {str(e): {"rn2": ep.rn2.hex(), "rn1_gen": ep.rn1_gen,
                                    "members": sorted(keys.checksum(m) for m in ep.members)}
                           for e, ep in self.epochs.items()},
                "counter": self.counter, "replay": self.replay.dump(),
                "rn1_sent": {keys.checksum(m): g for m, g in self.rn1_sent.items()},
                "pending_remove": [keys.checksum(self.pending_remove[0]), self.pending_remove[1]]
                if self.pending_remove else None,
                "parked": [p.hex() for p in self.parked], "read": self.read,
                "invited": sorted(keys.checksum(m) for m in self.invited)}

    @classmethod
    def from_json(cls, d: dict) -> "GroupState":
        pr = d.get("pending_remove")
        return cls(bytes.fromhex(d["gid"]), d["name"], keys.parse_node_id(d["admin"]), d["gms"], d["status"],
                   d["epoch"], d["joined"], {int(g): bytes.fromhex(v) for g, v in d["rn1"].items()},
                   {int(e): Epoch(bytes.fromhex(v["rn2"]), v["rn1_gen"], {keys.parse_node_id(m) for m in v["members"]})
                    for e, v in d["epochs"].items()},
                   d["counter"], group.Replay.load(d["replay"]),
                   {keys.parse_node_id(m): g for m, g in d["rn1_sent"].items()},
                   (keys.parse_node_id(pr[0]), pr[1]) if pr else None,
                   [bytes.fromhex(p) for p in d["parked"]], d["read"], {keys.parse_node_id(m) for m in d["invited"]})


def check_gms_url(url: object) -> str:
    parts = urlsplit(url) if isinstance(url, str) and len(url) <= 200 else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise GroupError("malformed", f"not a GMS URL: {url!r}")
    return url.rstrip("/")


class Groups:
    def __init__(self, base: Path, key: coincurve.PrivateKey, dc_url: Callable[[], str], transport: Transport,
                 admits: Callable[[bytes], bool] = lambda peer: False) -> None:
        """`admits(peer)`: the node's own policy (allow list), which decides whose invitations are
        held first (ntm/consent.py); an invitation itself admits nobody."""
        self.admits = admits
        self.dir = base / "groups"
        self.key, self.me, self.dc_url, self.transport = key, keys.node_id_of(key), dc_url, transport
        self.groups: dict[bytes, GroupState] = {}
        for path in sorted(self.dir.glob("*.json")) if self.dir.is_dir() else []:
            try:
                g = GroupState.from_json(json.loads(path.read_text()))
                self.groups[g.gid] = g
            except (ValueError, KeyError, TypeError) as exc:
                log.error("group state %s unreadable, left aside: %s", path, exc)
        self.refused: Counter[str] = Counter()
        self.tasks = BackgroundTasks()
        self._arrived = asyncio.Event()
        self._locks: dict[bytes, asyncio.Lock] = {}
        self._refreshed: dict[bytes, float] = {}
        self._catching_up: set[bytes] = set()
        self.http: aiohttp.ClientSession | None = None

    def start(self) -> None:
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=GMS_TIMEOUT_S))
        for g in self.groups.values():
            if g.status == "member":
                self.tasks.spawn(self._catch_up(g))
        self.tasks.spawn(self._admin_loop())

    async def close(self) -> None:
        await self.tasks.cancel()
        if self.http is not None:
            await self.http.close()

    # --- files -----------------------------------------------------------------------------------
    def save(self, g: GroupState) -> None:
        state.write_json(self.dir / f"{g.gid.hex()}.json", g.to_json())

    def _log_path(self, g: GroupState) -> Path:
        return self.dir / f"{g.gid.hex()}.messages.jsonl"

    def find(self, ref: str) -> GroupState:
        """A group by ID (hex) or by name (unique among ours)."""
        ref = ref.removeprefix("0x").lower()
        if ref in (gid.hex() for gid in self.groups):
            return self.groups[bytes.fromhex(ref)]
        named = [g for g in self.groups.values() if g.name.lower() == ref]
        if len(named) == 1:
            return named[0]
        raise GroupError("unknown_group", f"no group {ref!r} here" if not named else
                         f"{len(named)} groups are named {ref!r}: use the group ID")

    def knows(self, peer: bytes) -> bool:
        """Peers whose tunnels we accept for the groups: members of the groups we belong to, and (an
        admin) the nodes it invited. Not who invited us: an invitation is a request, not an admission."""
        return any(peer == g.admin or peer in g.members() or peer in g.invited for g in self.groups.values()
                   if g.status == "member")

    def _lock(self, g: GroupState) -> asyncio.Lock:
        return self._locks.setdefault(g.gid, asyncio.Lock())

    # --- the GMS ---------------------------------------------------------------------------------
    async def _gms(self, url: str, kind: str, body: dict) -> dict:
        assert self.http is not None, "Groups.start() first"
        env = envelope.seal(self.key, kind, body, int(time.time() * 1000))
        try:  # the GMS is a DC: over TLS pinned to its chain address (known from the DC list, §5)
            tls = await tlspin.ssl_for(self.http, url.rstrip("/"), None, GMS_TIMEOUT_S)
            async with self.http.post(url + "/v1/groups", json=env, ssl=tls) as r:
                answer = await r.json(content_type=None)
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError, tlspin.ChannelError) as exc:
            raise GroupError("gms_unreachable", f"cannot reach the GMS at {url}: {str(exc) or type(exc).__name__}") from None
        if r.status != 200:
            err = answer if isinstance(answer, dict) else {}
            raise GroupError(str(err.get("error", "gms_refused")), f"GMS {url}: {err.get('message', r.status)}")
        return answer

    def _apply(self, g: GroupState, view: dict) -> None:
        """Take the GMS's answer: membership, epochs (RN2 unwrapped with our key)."""
        g.name, g.admin, g.status = view["name"], keys.parse_node_id(view["admin"]), "member"
        for e in view["epochs"]:
            epoch = int(e["epoch"])
            rn2 = group.unwrap_secret(self.key, bytes.fromhex(e["rn2"]), g.gid, epoch)
            g.epochs[epoch] = Epoch(rn2, int(e["rn1_gen"]), {keys.parse_node_id(m) for m in e["members"]})
            g.joined = min(g.joined or epoch, epoch)
        g.epoch = max(g.epoch, int(view["epoch"]))
        g.invited = {keys.parse_node_id(m) for m in view["invited"]}
        if g.admin == self.me and view["rn1_gen"] not in g.rn1:
            g.rn1[view["rn1_gen"]] = group.new_rn()  # a departure started this generation at the GMS
        self.save(g)

    async def refresh(self, g: GroupState) -> None:
        """Ask the GMS what changed; a GMS that no longer counts us a member means we were removed."""
        self._refreshed[g.gid] = time.monotonic()
        since = max(g.epochs) + 1 if g.epochs else 0
        try:
            view = await self._gms(g.gms, "group.state", {"gid": g.gid.hex(), "since": since})
        except GroupError as exc:
            if exc.code == "not_member" and g.status == "member":
                g.status = "removed"
                self.save(g)
                log.info("group %s: this node is no longer a member", g.name)
            raise
        self._apply(g, view)

    async def _catch_up(self, g: GroupState) -> None:
        """Refresh, retry the parked messages; an admin also finishes removals and hands out RN1."""
        async with self._lock(g):
            try:
                await self.refresh(g)
            except GroupError as exc:
                log.info("group %s: no refresh: %s", g.name, exc)
            self._retry_parked(g)
            if g.admin == self.me:
                await self._sync_members(g)

    def _want_catch_up(self, g: GroupState) -> None:
        """One catch-up per group at a time, at most every REFRESH_MIN_S: a peer sending messages of
        unknown epochs costs the GMS one request per REFRESH_MIN_S, whatever it sends."""
        if g.gid in self._catching_up:
            return
        self._catching_up.add(g.gid)

        async def later() -> None:
            try:
                await asyncio.sleep(max(0.0, REFRESH_MIN_S - (time.monotonic() - self._refreshed.get(g.gid, -REFRESH_MIN_S))))
            finally:
                self._catching_up.discard(g.gid)
            await self._catch_up(g)

        self.tasks.spawn(later())

    # --- operations (the control socket's group.* requests) --------------------------------------
    async def create(self, name: str) -> dict:
        try:
            group.check_name(name)
        except ValueError as exc:
            raise GroupError("bad_name", str(exc)) from None
        gid = group.new_gid()
        g = GroupState(gid, name, self.me, check_gms_url(self.dc_url()), "member", rn1={1: group.new_rn()})
        self.save(g)  # RN1 is ours before the GMS hears of the group
        self.groups[gid] = g
        async with self._lock(g):
            self._apply(g, await self._gms(g.gms, "group.create", {"gid": gid.hex(), "name": name}))
        return self.describe(g)

    async def invite(self, ref: str, node: bytes) -> dict:
        g = self.find(ref)
        self._need_admin(g)
        async with self._lock(g):
            self._apply(g, await self._gms(g.gms, "group.invite", {"gid": g.gid.hex(), "node": keys.checksum(node)}))
        note = {"t": "invite", "gid": g.gid.hex(), "name": g.name, "admin": keys.checksum(self.me), "gms": g.gms}
        how = await self._send_control([node], note)
        return {**self.describe(g), "invited": keys.checksum(node), "via": how.get(node, "failed")}

    async def accept(self, ref: str) -> dict:
        g = self.find(ref)
        if g.status == "member":
            return self.describe(g)
        async with self._lock(g):
            self._apply(g, await self._gms(g.gms, "group.accept", {"gid": g.gid.hex()}))
            self._retry_parked(g)
        await self._send_control([g.admin], {"t": "joined", "gid": g.gid.hex()})
        return self.describe(g)

    def invitations(self) -> list[dict]:
        """Invitations waiting for the user's answer, oldest first."""
        return [{**self.describe(g), "admitted": self.admits(g.admin)} for g in self.groups.values()
                if g.status == "invited"]

    async def decline(self, ref: str) -> dict:
        """Forget an invitation (the admin is not told: a stranger learns nothing from a refusal)."""
        g = self.find(ref)
        if g.status != "invited":
            raise GroupError("not_invited", f"group {g.name} is not an invitation waiting here ({g.status})")
        self._drop(g)
        return {**self.describe(g), "status": "declined"}

    def _drop(self, g: GroupState) -> None:
        self.groups.pop(g.gid, None)
        (self.dir / f"{g.gid.hex()}.json").unlink(missing_ok=True)

    async def leave(self, ref: str) -> dict:
        g = self.find(ref)
        if g.admin == self.me:
            raise GroupError("bad_request", "the admin cannot leave its own group (remove the others instead)")
        async with self._lock(g):
            if g.status == "member":
                await self._gms(g.gms, "group.leave", {"gid": g.gid.hex()})
            g.status = "left"
            self.save(g)
        await self._send_control([g.admin], {"t": "left", "gid": g.gid.hex()})
        return self.describe(g)

    async def remove(self, ref: str, node: bytes) -> dict:
        """Remove `node` at the GMS and hand every remaining member a new RN1 generation. The new
        RN1 is saved first, so a crash (ours or the GMS's) anywhere is finished by `_sync_members`."""
        g = self.find(ref)
        self._need_admin(g)
        async with self._lock(g):
            if g.pending_remove is not None and g.pending_remove[0] != node:
                await self._finish_remove(g)  # an earlier removal first
            if g.pending_remove is None:
                self._stage_removal(g, node)
            await self._finish_remove(g)
            await self._sync_members(g)
        return self.describe(g)

    def _stage_removal(self, g: GroupState, node: bytes) -> None:
        """The generation after the current one as we know it, saved with the pending removal (a
        GMS that moved on refuses it, and _finish_remove stages again from its answer)."""
        gen = (g.epochs[g.epoch].rn1_gen if g.epoch in g.epochs else max(g.rn1)) + 1
        g.rn1[gen] = group.new_rn()  # never handed out yet: the GMS has not started it
        g.pending_remove = (node, gen)
        self.save(g)

    async def _finish_remove(self, g: GroupState, again: bool = True) -> None:
        assert g.pending_remove is not None
        node, gen = g.pending_remove
        try:
            view = await self._gms(g.gms, "group.remove", {"gid": g.gid.hex(), "node": keys.checksum(node), "rn1_gen": gen})
        except GroupError as exc:
            if exc.code not in ("bad_request", "not_member"):
                raise  # unreachable or the like: the removal stays pending and is retried
            # a departure moved the generation on meanwhile, or it is no member: start again from the GMS's view
            g.pending_remove = None
            self.save(g)
            await self.refresh(g)
            if again and node in g.members():
                self._stage_removal(g, node)
                return await self._finish_remove(g, again=False)
            raise
        g.pending_remove = None
        self._apply(g, view)

    async def members(self, ref: str) -> dict:
        """After a catch-up with the GMS (an admin also finishes what a crash left undone)."""
        g = self.find(ref)
        if g.status == "member":
            await self._catch_up(g)
        return self.describe(g)

    async def send(self, ref: str, text: bytes) -> dict:
        g = self.find(ref)
        if g.status != "member":
            raise GroupError("not_member", f"this node is not a member of group {g.name} ({g.status})")
        if len(text) > group.MAX_TEXT:
            raise GroupError("too_large", f"a group message is at most {group.MAX_TEXT} bytes")
        async with self._lock(g):
            stale = ""
            try:
                await self.refresh(g)  # a removal applies to the very next message
            except GroupError as exc:
                if exc.code != "gms_unreachable":
                    raise
                stale = str(exc)
            gk = g.key(g.epoch)
            if gk is None:
                raise GroupError("no_key", f"group {g.name}: waiting for the admin's RN1 of epoch {g.epoch}")
            counter = g.counter
            g.counter += 1
            self.save(g)
            msg = group.seal_message(self.key, gk, g.gid, g.epoch, counter, text)
            others = sorted(g.members() - {self.me})
        how = await self._fanout(others, MSG + msg.encode())
        return {"gid": g.gid.hex(), "name": g.name, "epoch": g.epoch, "counter": counter,
                "tunnel": [keys.checksum(p) for p in others if how.get(p) == "tunnel"],
                "cs": [keys.checksum(p) for p in others if how.get(p) == "cs"],
                "failed": [keys.checksum(p) for p in others if p not in how],
                **({"gms_unreachable": stale} if stale else {})}

    def recv(self, ref: str | None) -> list[dict]:
        """Messages not handed out before (of one group or all), oldest first."""
        out = []
        for g in [self.find(ref)] if ref else list(self.groups.values()):
            path = self._log_path(g)
            lines = path.read_text().splitlines() if path.exists() else []
            if len(lines) > g.read:
                out += [json.loads(line) for line in lines[g.read:]]
                g.read = len(lines)
                self.save(g)
        return out

    async def wait_messages(self, ref: str | None, wait: float) -> list[dict]:
        got = self.recv(ref)
        loop = asyncio.get_running_loop()
        end = loop.time() + wait
        while not got and loop.time() < end:
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), end - loop.time())
            except asyncio.TimeoutError:
                pass
            got = self.recv(ref)
        return got

    def describe(self, g: GroupState) -> dict:
        return {"gid": g.gid.hex(), "name": g.name, "admin": keys.checksum(g.admin), "gms": g.gms, "status": g.status,
                "epoch": g.epoch, "rn1_gen": g.epochs[g.epoch].rn1_gen if g.epoch in g.epochs else None,
                "has_key": g.key(g.epoch) is not None,
                "members": sorted(keys.checksum(m) for m in g.members()), "you": keys.checksum(self.me),
                "pending_removal": keys.checksum(g.pending_remove[0]) if g.pending_remove else None}

    def list(self) -> list[dict]:
        return [self.describe(g) for g in self.groups.values()]

    def _need_admin(self, g: GroupState) -> None:
        if g.admin != self.me:
            raise GroupError("not_admin", f"only the admin of group {g.name} ({keys.checksum(g.admin)}) may do that")

    # --- delivery --------------------------------------------------------------------------------
    async def _fanout(self, peers: list[bytes], payload: bytes) -> dict[bytes, str]:
        """Each peer over its tunnel; those that did not acknowledge, sealed at a Cache Server."""
        async def one(peer: bytes) -> bool:
            try:
                return await asyncio.wait_for(self.transport.deliver(peer, payload), FANOUT_ACK_S)
            except (asyncio.TimeoutError, NtmError, OSError):
                return False

        ok = await asyncio.gather(*(one(p) for p in peers))
        how = {p: "tunnel" for p, good in zip(peers, ok) if good}
        rest = [p for p, good in zip(peers, ok) if not good]
        if rest:
            try:
                stored = await self.transport.store(rest, payload)
            except (NtmError, OSError) as exc:
                log.warning("could not store for %d offline member(s): %s", len(rest), exc)
                stored = []
            how.update({p: "cs" for p in stored})
        return how

    async def _send_control(self, peers: list[bytes], note: dict) -> dict[bytes, str]:
        return await self._fanout(peers, CONTROL + json.dumps(note, separators=(",", ":")).encode())

    async def _sync_members(self, g: GroupState) -> None:
        """Admin: finish a pending removal, then hand the current RN1 to every member that lacks it."""
        if g.pending_remove is not None:
            try:
                await self._finish_remove(g)
            except GroupError as exc:
                log.info("group %s: removal still pending: %s", g.name, exc)
                return
        ep = g.epochs.get(g.epoch)
        if ep is None or ep.rn1_gen not in g.rn1:
            return
        lacking = [m for m in ep.members if m != self.me and g.rn1_sent.get(m, 0) < ep.rn1_gen]
        if not lacking:
            return
        how = await self._send_control(lacking, {"t": "rn1", "gid": g.gid.hex(), "gen": ep.rn1_gen,
                                                 "rn1": g.rn1[ep.rn1_gen].hex()})
        for m in how:
            g.rn1_sent[m] = ep.rn1_gen
        self.save(g)

    async def _admin_loop(self) -> None:
        while True:
            for g in list(self.groups.values()):
                if g.admin == self.me and g.status == "member":
                    await self._catch_up(g)
            await asyncio.sleep(ADMIN_SYNC_S)

    # --- incoming --------------------------------------------------------------------------------
    def on_payload(self, sender: bytes, payload: bytes, via: str) -> None:
        """A group payload from `sender` (authenticated: the tunnel's peer, or the item's signer)."""
        try:
            if payload[:1] == MSG:
                self._on_message(GroupMessage.decode(payload[1:]), via)
            elif payload[:1] == CONTROL:
                self._on_control(sender, payload[1:])
            else:
                raise GroupError("malformed", "not a group payload")
        except GroupError as exc:
            self.refused[exc.code] += 1
            log.info("group payload from %s (%s) refused: %s", keys.checksum(sender), via, exc)

    def _on_message(self, msg: GroupMessage, via: str, parked: bool = False) -> bool:
        """True when done with (delivered or refused), False when parked for a key."""
        g = self.groups.get(msg.gid)
        if g is None or g.status not in ("member", "removed", "left"):
            raise GroupError("unknown_group", f"a message for group {msg.gid.hex()}, which this node is not in")
        g.replay.check(msg)
        msg.check_signature()
        if g.joined and msg.epoch < g.joined:
            raise GroupError("before_join", f"epoch {msg.epoch} is before this node joined group {g.name}")
        gk = g.key(msg.epoch)
        if gk is None:
            if not parked:
                g.parked = [*g.parked, msg.encode()][-MAX_PARKED:]
                self.save(g)
                self._want_catch_up(g)
            return False
        if msg.sender not in g.epochs[msg.epoch].members:
            raise GroupError("not_member", f"{keys.checksum(msg.sender)} is not a member of epoch {msg.epoch}")
        group.check_still_member({e: ep.members for e, ep in g.epochs.items()}, msg.epoch, msg.sender)
        text = msg.decrypt(gk)
        g.replay.update(msg)
        entry = {"gid": g.gid.hex(), "group": g.name, "epoch": msg.epoch, "sender": keys.checksum(msg.sender),
                 "counter": msg.counter, "text": text.decode(errors="replace"), "via": via,
                 "received": int(time.time() * 1000), "wire": msg.encode().hex()}
        with open(self._log_path(g), "a") as fh:
            fh.write(json.dumps(entry) + "\n")
        self.save(g)
        self._arrived.set()
        return True

    def _retry_parked(self, g: GroupState) -> None:
        keep = []
        for wire in g.parked:
            try:
                if not self._on_message(GroupMessage.decode(wire), "parked", parked=True):
                    keep.append(wire)
            except GroupError as exc:
                self.refused[exc.code] += 1
        g.parked = keep
        self.save(g)

    def _on_control(self, sender: bytes, data: bytes) -> None:
        try:
            note = json.loads(data)
            kind, gid = note["t"], bytes.fromhex(note["gid"])
        except (ValueError, KeyError, TypeError) as exc:
            raise GroupError("malformed", f"control message: {exc}") from None
        g = self.groups.get(gid)
        if kind == "invite":
            self._on_invite(sender, gid, note)
        elif g is None:
            raise GroupError("unknown_group", f"control message for group {gid.hex()}, which this node is not in")
        elif kind == "rn1":
            if sender != g.admin:
                raise GroupError("not_admin", f"RN1 of group {g.name} from {keys.checksum(sender)}, not its admin")
            try:
                gen, rn1 = int(note["gen"]), bytes.fromhex(note["rn1"])
            except (ValueError, KeyError, TypeError) as exc:
                raise GroupError("malformed", f"RN1 message: {exc}") from None
            if len(rn1) != group.RN_LEN or g.rn1.get(gen, rn1) != rn1:
                raise GroupError("malformed", f"RN1 generation {gen} of group {g.name} is not 32 bytes or changed")
            g.rn1[gen] = rn1
            self.save(g)
            self._retry_parked(g)
        elif kind in ("joined", "left"):
            if g.admin == self.me:
                self._want_catch_up(g)
        else:
            raise GroupError("malformed", f"unknown control message {kind!r}")

    def _on_invite(self, sender: bytes, gid: bytes, note: dict) -> None:
        try:
            admin, name, gms = keys.parse_node_id(note["admin"]), group.check_name(note["name"]), check_gms_url(note["gms"])
        except (ValueError, KeyError) as exc:
            raise GroupError("malformed", f"invitation: {exc}") from None
        if admin != sender:
            raise GroupError("not_admin", f"an invitation to {name} signed by {keys.checksum(sender)}, not its admin")
        if gid in self.groups and self.groups[gid].status in ("member", "invited"):
            return  # a member already, or invited already: the first invitation stands
        held = [consent.HeldInvite(g.gid, g.admin, self.admits(g.admin)) for g in self.groups.values()
                if g.status == "invited"]
        verdict = consent.invitation_verdict(held, admin, self.admits(admin))
        if not verdict.keep:
            raise GroupError(verdict.refusal or "refused", f"invitation to {name} from {keys.checksum(admin)} not kept")
        if verdict.evict is not None:
            self._drop(self.groups[verdict.evict])
        g = GroupState(gid, name, admin, gms, "invited")
        self.groups[gid] = g
        self.save(g)
        log.info("invited to group %s by %s", name, keys.checksum(admin))
