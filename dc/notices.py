"""Cache Server notices at a recipient's home DC: the seed's push (APNS/GCM there; the node's
DC session here) and its Cache List (kept for the node's next session).

A CS tells the home DC of each recipient, in a DC-signed envelope (the CS signs with its DC's
key, so any DC can check it is an active DC's). The DC keeps the notice durably, pushes it at
once if the node is online, again at every new session until the node acknowledges it, and
forgets it after NOTICE_TTL_MS. Spec: docs/PROTOCOL.md §12.
"""

from __future__ import annotations

import logging
from typing import Callable

from dc.presence import Presence
from dc.store import Store
from dc.errors import NodeLookupError
from ntm import envelope, keys, messages
from ntm.clock import Clock
from ntm.errors import NtmError

log = logging.getLogger("ntm.dc.notices")

# A notice outlives the item's default TTL at the CS (7 days): the node learns of it whenever it
# comes back within that time.
NOTICE_TTL_MS = 7 * 24 * 3600 * 1000
# Notices kept per node: a flood of uploads for one node cannot grow the DC's database unbounded
# (the CS's per-recipient quota bounds it before this; the node finds older ones with `ntm inbox`).
MAX_NOTICES_PER_NODE = 1000


class Notices:
    def __init__(
        self,
        store: Store,
        presence: Presence,
        is_active_dc: Callable[[bytes], bool],
        guard: envelope.ReplayGuard,
        clock: Clock,
    ) -> None:
        self.store, self.presence, self.is_active_dc, self.guard, self.clock = (
            store,
            presence,
            is_active_dc,
            guard,
            clock,
        )
        self.counters = {"cs_notices_accepted": 0, "cs_notices_pushed": 0, "cs_notices_refused": 0}

    async def accept(self, request: dict) -> dict:
        """A CS_NOTICE envelope from a Cache Server (signed with an active DC's key)."""
        try:
            env, notice = envelope.open_body(
                request, messages.CS_NOTICE, messages.CsNotice, self.clock.wall_ms(), self.is_active_dc, self.guard
            )
            node = keys.parse_node_id(notice.node)
            if self.store.node(node) is None:
                raise NodeLookupError("wrong_dc", f"{notice.node} is not registered at this DC")
        except NtmError:
            self.counters["cs_notices_refused"] += 1
            raise
        if self.store.notice_count(node) >= MAX_NOTICES_PER_NODE:
            self.counters["cs_notices_refused"] += 1
            raise NodeLookupError("too_many_notices", f"{notice.node} has {MAX_NOTICES_PER_NODE} notices waiting")
        self.store.add_notice(
            node, bytes.fromhex(notice.item), messages.encode(notice), self.clock.wall_ms() + NOTICE_TTL_MS
        )
        self.counters["cs_notices_accepted"] += 1
        await self.push(node, [notice])
        return {"ok": True}

    async def push(self, node: bytes, notices: list[messages.CsNotice]) -> None:
        """On the node's session, if it has one (else they wait for its next session)."""
        session = self.presence.sessions.get(node)
        if session is None:
            return
        for notice in notices:
            try:
                await session.send(messages.encode(messages.CsNoticePush(notice)))
                self.counters["cs_notices_pushed"] += 1
            except (ConnectionError, RuntimeError) as exc:
                log.debug("notice push to %s failed: %s", keys.checksum(node), exc)
                return

    async def on_session(self, node: bytes) -> None:
        """A session opened: push what waits for the node."""
        waiting = [messages.decode(messages.CsNotice, body) for body in self.store.notices(node, self.clock.wall_ms())]
        await self.push(node, waiting)

    def ack(self, node: bytes, item: str) -> None:
        self.store.drop_notice(node, bytes.fromhex(item))
