"""Consent before anything lands (docs/PROTOCOL.md §12.1): what a node does with a stranger's
group invitation, with a Cache Server notice, and with a peer's text it prints. No I/O.

A stranger (any registered node, or many of them) can seal items for us at a Cache Server and
invite us to groups. None of that may admit it (an invitation is a request the user accepts),
make us store its bytes (its items wait at the Cache Server, on its quota, until the user fetches
them), evict what others sent us, or reach the user's terminal (control characters escaped).
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from typing import Sequence

# Invitations held per sender that the node does not admit: a stranger inviting us to many
# groups keeps its first few, never anyone else's.
MAX_INVITES_PER_STRANGER = 4
# Invitations held in all (the user reads them with `ntm group invitations`). Strangers' are
# refused once it is full; an admitted sender's replaces the oldest stranger's.
MAX_INVITES_HELD = 64
# Bytes of fetched Cache Server items kept in $NTM_HOME/inbox: beyond it nothing more is fetched
# (items wait at their Cache Server, and the user is told why), so a disk fills at nobody's will.
MAX_INBOX_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class HeldInvite:
    """An invitation waiting for the user's answer: which group, from whom, admitted or not."""

    gid: bytes
    sender: bytes
    admitted: bool


@dataclass(frozen=True)
class InviteVerdict:
    keep: bool
    evict: bytes | None = None  # the gid of a stranger's invitation that makes room
    refusal: str | None = None  # why not kept: a code for counters and logs


def invitation_verdict(held: Sequence[HeldInvite], sender: bytes, admitted: bool) -> InviteVerdict:
    """A new invitation from `sender` (`held`: the ones waiting, oldest first). Admitted senders'
    are always kept (room made by dropping the oldest stranger's); a stranger's only while it holds
    fewer than MAX_INVITES_PER_STRANGER and there is room: it can never push out another's."""
    if not admitted and sum(1 for h in held if h.sender == sender) >= MAX_INVITES_PER_STRANGER:
        return InviteVerdict(False, refusal="too_many_from_sender")
    if len(held) < MAX_INVITES_HELD:
        return InviteVerdict(True)
    oldest_stranger = next((h for h in held if not h.admitted), None)
    if admitted and oldest_stranger is not None:
        return InviteVerdict(True, evict=oldest_stranger.gid)
    return InviteVerdict(False, refusal="invitations_full")


def fetch_verdict(admitted: bool, size: int, inbox_used: int) -> str | None:
    """Fetch an item on its notice (or the start-up sweep)? None: yes. Else why it waits at its
    Cache Server: `not_admitted` (the user fetches it with `ntm inbox fetch`), or `inbox_full`."""
    if not admitted:
        return "not_admitted"
    return inbox_room(size, inbox_used)


def inbox_room(size: int, inbox_used: int) -> str | None:
    """`inbox_full` if an item of `size` bytes would take the inbox past MAX_INBOX_BYTES."""
    return "inbox_full" if inbox_used + max(0, size) > MAX_INBOX_BYTES else None


def escape(text: object) -> str:
    """A peer's text as it may reach a terminal: every control or format character (ESC, CR,
    newline, BEL, C1, bidirectional overrides, ...) shown as a `\\x..`/`\\u....` escape, so a
    peer can neither drive the terminal nor forge a line of output; backslashes are doubled
    so an escape cannot be faked either."""
    out = []
    for ch in str(text):
        if ch == "\\":
            out.append("\\\\")
        elif unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp"):
            out.append(
                f"\\x{ord(ch):02x}"
                if ord(ch) < 0x100
                else f"\\u{ord(ch):04x}"
                if ord(ch) < 0x10000
                else f"\\U{ord(ch):08x}"
            )
        else:
            out.append(ch)
    return "".join(out)
