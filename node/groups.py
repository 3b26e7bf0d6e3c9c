"""A member's side of group keys (docs/PROTOCOL.md §13): the adapter around ntm/groupstate.py's
GroupBook, with the GMS's HTTP, the files, the tasks and the clock.

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
from pathlib import Path
from typing import Callable, Protocol

import aiohttp
import coincurve

from daemon import tlspin
from daemon.service import BackgroundTasks
from node import state
from ntm import envelope, group, keys, messages
from ntm.clock import SYSTEM, Clock
from ntm.errors import NtmError
from ntm.group import GroupError
from ntm.groupstate import (
    CONTROL,
    MSG,
    Action,
    CatchUp,
    Deliver,
    Forget,
    GroupBook,
    GroupState,
    Save,
    apply_view,
    check_gms_url,
    decode_view,
    encode_note,
    rn1_lacking,
    stage_removal,
)

log = logging.getLogger("ntm.node.groups")

GROUP_APP = "ntm-group"  # the app_id of Cache Server items that carry group traffic
__all__ = ["CONTROL", "GROUP_APP", "MSG", "Groups", "Transport"]  # CONTROL, MSG: from the core, for callers
# A member that has not acknowledged a message over its tunnel by then gets it from a Cache
# Server (tunnel set-up included: a direct path opens in well under a second).
FANOUT_ACK_S = 3.0
# The admin looks at its groups at the GMS this often (a member's "joined"/"left" note makes it
# look at once; this catches notes that were lost).
ADMIN_SYNC_S = 30.0
GMS_TIMEOUT_S = 10.0


class Transport(Protocol):
    async def deliver(self, peer: bytes, payload: bytes) -> bool:
        """Over a tunnel; True once the peer acknowledged."""

    async def store(self, peers: list[bytes], payload: bytes) -> list[bytes]:
        """Sealed at a Cache Server for `peers`; returns those it was stored for."""


class Groups:
    def __init__(
        self,
        base: Path,
        key: coincurve.PrivateKey,
        dc_url: Callable[[], str],
        transport: Transport,
        admits: Callable[[bytes], bool] = lambda peer: False,
        clock: Clock = SYSTEM,
    ) -> None:
        """`admits(peer)`: the node's own policy (allow list), which decides whose invitations are
        held first (ntm/consent.py); an invitation itself admits nobody."""
        self.dir = base / "groups"
        self.key, self.me, self.dc_url, self.transport, self.clock = key, keys.node_id_of(key), dc_url, transport, clock
        self.book = GroupBook(key, clock, admits)
        for path in sorted(self.dir.glob("*.json")) if self.dir.is_dir() else []:
            try:
                g = GroupState.from_json(json.loads(path.read_text()))
                self.book.groups[g.gid] = g
            except (ValueError, KeyError, TypeError) as exc:
                log.error("group state %s unreadable, left aside: %s", path, exc)
        self.groups, self.refused = self.book.groups, self.book.refused
        self.find, self.knows, self.describe, self.invitations = (
            self.book.find,
            self.book.knows,
            self.book.describe,
            self.book.invitations,
        )
        self.tasks = BackgroundTasks()
        self._arrived = asyncio.Event()
        self._locks: dict[bytes, asyncio.Lock] = {}
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

    # --- files and actions -----------------------------------------------------------------------
    def save(self, g: GroupState) -> None:
        state.write_json(self.dir / f"{g.gid.hex()}.json", g.to_json())

    def _log_path(self, g: GroupState) -> Path:
        return self.dir / f"{g.gid.hex()}.messages.jsonl"

    def _do(self, actions: list[Action]) -> None:
        """Carry out the core's actions, in order."""
        for a in actions:
            if isinstance(a, Save):
                self.save(a.g)
            elif isinstance(a, Forget):
                (self.dir / f"{a.g.gid.hex()}.json").unlink(missing_ok=True)
            elif isinstance(a, Deliver):
                with open(self._log_path(a.g), "a") as fh:
                    fh.write(json.dumps(a.entry) + "\n")
                self._arrived.set()
            elif isinstance(a, CatchUp):
                self.tasks.spawn(self._catch_up_later(a))

    def _lock(self, g: GroupState) -> asyncio.Lock:
        return self._locks.setdefault(g.gid, asyncio.Lock())

    # --- the GMS ---------------------------------------------------------------------------------
    async def _gms(self, url: str, kind: str, body: messages.Message) -> object:
        assert self.http is not None, "Groups.start() first"
        env = envelope.seal_body(self.key, kind, body, self.clock.wall_ms())
        try:  # the GMS is a DC: over TLS pinned to its chain address (known from the DC list, §5)
            tls = await tlspin.ssl_for(self.http, url.rstrip("/"), None, GMS_TIMEOUT_S)
            async with self.http.post(url + "/v1/groups", json=env, ssl=tls) as r:
                answer = await r.json(content_type=None)
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError, tlspin.ChannelError) as exc:
            raise GroupError(
                "gms_unreachable", f"cannot reach the GMS at {url}: {str(exc) or type(exc).__name__}"
            ) from None
        if r.status != 200:
            err = answer if isinstance(answer, dict) else {}
            raise GroupError(str(err.get("error", "gms_refused")), f"GMS {url}: {err.get('message', r.status)}")
        return answer

    async def _view(self, g: GroupState, kind: str, body: messages.Message) -> None:
        """A GMS request whose answer is the group: taken in and saved."""
        apply_view(g, decode_view(await self._gms(g.gms, kind, body)), self.key)
        self.save(g)

    async def refresh(self, g: GroupState) -> None:
        """Ask the GMS what changed; a GMS that no longer counts us a member means we were removed."""
        self.book.refreshed(g)
        since = max(g.epochs) + 1 if g.epochs else 0
        try:
            await self._view(g, "group.state", messages.GroupStateQuery(g.gid.hex(), since))
        except GroupError as exc:
            gone = self.book.gms_refused(g, exc.code)
            if gone:
                log.info("group %s: this node is no longer a member", g.name)
            self._do(gone)
            raise

    async def _catch_up(self, g: GroupState) -> None:
        """Refresh, retry the parked messages; an admin also finishes removals and hands out RN1."""
        async with self._lock(g):
            try:
                await self.refresh(g)
            except GroupError as exc:
                log.info("group %s: no refresh: %s", g.name, exc)
            self._do(self.book.retry_parked(g))
            if g.admin == self.me:
                await self._sync_members(g)

    async def _catch_up_later(self, a: CatchUp) -> None:
        try:
            await asyncio.sleep(a.delay_s)
        finally:
            self.book.catching_up(a.g)
        await self._catch_up(a.g)

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
            await self._view(g, "group.create", messages.GroupCreate(gid.hex(), name))
        return self.describe(g)

    async def invite(self, ref: str, node: bytes) -> dict:
        g = self.find(ref)
        self.book.need_admin(g)
        async with self._lock(g):
            await self._view(g, "group.invite", messages.GroupInvite(g.gid.hex(), keys.checksum(node)))
        how = await self._send_control([node], messages.InviteNote(g.gid.hex(), g.name, keys.checksum(self.me), g.gms))
        return {**self.describe(g), "invited": keys.checksum(node), "via": how.get(node, "failed")}

    async def accept(self, ref: str) -> dict:
        g = self.find(ref)
        if g.status == "member":
            return self.describe(g)
        async with self._lock(g):
            await self._view(g, "group.accept", messages.GroupRef(g.gid.hex()))
            self._do(self.book.retry_parked(g))
        await self._send_control([g.admin], messages.JoinedNote(g.gid.hex()))
        return self.describe(g)

    async def decline(self, ref: str) -> dict:
        """Forget an invitation (the admin is not told: a stranger learns nothing from a refusal)."""
        g = self.find(ref)
        self._do(self.book.decline(ref))
        return {**self.describe(g), "status": "declined"}

    async def leave(self, ref: str) -> dict:
        g = self.find(ref)
        if g.admin == self.me:
            raise GroupError("bad_request", "the admin cannot leave its own group (remove the others instead)")
        async with self._lock(g):
            if g.status == "member":
                await self._gms(g.gms, "group.leave", messages.GroupRef(g.gid.hex()))
            g.status = "left"
            self.save(g)
        await self._send_control([g.admin], messages.LeftNote(g.gid.hex()))
        return self.describe(g)

    async def remove(self, ref: str, node: bytes) -> dict:
        """Remove `node` at the GMS and hand every remaining member a new RN1 generation. The new
        RN1 is saved first, so a crash (ours or the GMS's) anywhere is finished by `_sync_members`."""
        g = self.find(ref)
        self.book.need_admin(g)
        async with self._lock(g):
            if g.pending_remove is not None and g.pending_remove[0] != node:
                await self._finish_remove(g)  # an earlier removal first
            if g.pending_remove is None:
                stage_removal(g, node)
                self.save(g)
            await self._finish_remove(g)
            await self._sync_members(g)
        return self.describe(g)

    async def _finish_remove(self, g: GroupState, again: bool = True) -> None:
        assert g.pending_remove is not None
        node, gen = g.pending_remove
        try:
            view = await self._gms(g.gms, "group.remove", messages.GroupRemove(g.gid.hex(), keys.checksum(node), gen))
        except GroupError as exc:
            if exc.code not in ("bad_request", "not_member"):
                raise  # unreachable or the like: the removal stays pending and is retried
            # a departure moved the generation on meanwhile, or it is no member: start again from the GMS's view
            g.pending_remove = None
            self.save(g)
            await self.refresh(g)
            if again and node in g.members():
                stage_removal(g, node)
                self.save(g)
                return await self._finish_remove(g, again=False)
            raise
        g.pending_remove = None
        apply_view(g, decode_view(view), self.key)
        self.save(g)

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
        return {
            "gid": g.gid.hex(),
            "name": g.name,
            "epoch": g.epoch,
            "counter": counter,
            "tunnel": [keys.checksum(p) for p in others if how.get(p) == "tunnel"],
            "cs": [keys.checksum(p) for p in others if how.get(p) == "cs"],
            "failed": [keys.checksum(p) for p in others if p not in how],
            **({"gms_unreachable": stale} if stale else {}),
        }

    def recv(self, ref: str | None) -> list[dict]:
        """Messages not handed out before (of one group or all), oldest first."""
        out = []
        for g in [self.find(ref)] if ref else list(self.groups.values()):
            path = self._log_path(g)
            lines = path.read_text().splitlines() if path.exists() else []
            if len(lines) > g.read:
                out += [json.loads(line) for line in lines[g.read :]]
                g.read = len(lines)
                self.save(g)
        return out

    async def wait_messages(self, ref: str | None, wait: float) -> list[dict]:
        got = self.recv(ref)
        end = self.clock.now() + wait
        while not got and self.clock.now() < end:
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), end - self.clock.now())
            except asyncio.TimeoutError:
                pass
            got = self.recv(ref)
        return got

    def list(self) -> list[dict]:
        return [self.describe(g) for g in self.groups.values()]

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

    async def _send_control(self, peers: list[bytes], note: messages.ControlNote) -> dict[bytes, str]:
        return await self._fanout(peers, encode_note(note))

    async def _sync_members(self, g: GroupState) -> None:
        """Admin: finish a pending removal, then hand the current RN1 to every member that lacks it."""
        if g.pending_remove is not None:
            try:
                await self._finish_remove(g)
            except GroupError as exc:
                log.info("group %s: removal still pending: %s", g.name, exc)
                return
        todo = rn1_lacking(g, self.me)
        if todo is None:
            return
        note, lacking = todo
        how = await self._send_control(lacking, note)
        for m in how:
            g.rn1_sent[m] = note.gen
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
            self._do(self.book.receive(sender, payload, via))
        except GroupError as exc:
            log.info("group payload from %s (%s) refused: %s", keys.checksum(sender), via, exc)
