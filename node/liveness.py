"""When a node repairs things: pure decisions over monotonic times, no I/O (tested without sockets).

The agent asks these functions every tick and does what they answer: probe a silent tunnel,
ask the DCs for a new path, drop an old path, reopen the DC session, move to another DC.
docs/PROTOCOL.md §8.3.
"""

from __future__ import annotations

import enum

# A Link counts as in use if the application sent or received within this window; only links in
# use are probed (an idle tunnel is kept open by keepalives, not by probes).
ACTIVE_WINDOW_S = 1.0
# In use and nothing authenticated heard for this long: send a PING (it also lets the peer roam
# to our new address, the cheap repair).
PROBE_AFTER_S = 0.15
# ... and for this long: the path is dead, ask the DCs for a new one. Handover target is 1 s.
DEAD_AFTER_S = 0.45
# After a switch, the old path keeps delivering what is still in flight; it is closed once it has
# been silent this long.
OLD_PATH_GRACE_S = 10.0
# The DC session counts as dead after this many keepalive intervals without any reply (a DC whose
# host vanished closes no TCP connection).
KEEPALIVE_MISSES = 3
# Session reconnect backoff: a moved node reconnects within tens of ms; a dead DC is not hammered.
RECONNECT_BACKOFF_S = (0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2)
# A tunnel on the relay asks for a direct path this often (and at once after each move of its
# node): NATs and firewalls that blocked a punch rarely change faster, and each try costs one
# Direction Request and a few handshake packets.
DIRECT_RETRY_S = 30.0
# Consecutive failed session attempts after which the home DC is given up for another one
# (~0.35 s of "connection refused" with the backoff above).
FAILOVER_AFTER_FAILURES = 3
# The session's WebSocket is pinged after this long without a frame from the DC, and counts as
# dead if the pong is not back within half of it (aiohttp's heartbeat): a DC whose link or host
# vanished without a RST is noticed within 1.5 × this. One ~60-byte ping and pong per 3 s and
# idle node is no storm (a TCP keepalive default would take hours).
SESSION_HEARTBEAT_S = 3.0
# Consecutive silences (a session lost to a missed heartbeat, a session attempt that got no answer
# at all) after which the home DC is given up: one unanswered reconnect after a missed heartbeat.
# A DC that answers, even with a refusal, is a flapping or restarting one and gets the
# FAILOVER_AFTER_FAILURES attempts instead. Bound: 1.5 × SESSION_HEARTBEAT_S +
# SESSION_OPEN_TIMEOUT_S (3 s) + one registration at the next DC, ~8 s.
FAILOVER_AFTER_SILENCES = 2
# A tunnel repair that failed without a refusal (no answer, handshake timeout, the DC session
# reconnecting; the peer may be moving too) asks again this soon: a real path loss stays fast.
REPAIR_RETRY_S = 0.3
# A repair the peer or a DC refused (peer_busy, rate_limited, not_allowed) waits instead, longer
# after each refusal in a row: the peer's per-node direction rate refills one per 2 s
# (node/tunnels.py PEER_DIRECTIONS), so asking sooner only earns another refusal; the 16 s cap
# keeps a repair alive through a minute of a busy peer with 6 requests instead of 200.
REPAIR_REFUSED_BACKOFF_S = (2.0, 4.0, 8.0, 16.0)
# The error codes that are refusals (docs/PROTOCOL.md §8.1), not failures of the path.
REPAIR_REFUSALS = frozenset({"peer_busy", "rate_limited", "not_allowed"})


class LinkAction(enum.Enum):
    NONE = "none"
    PROBE = "probe"  # PING from where we are now
    REDIRECT = "redirect"  # ask the DCs for a new path to the same peer


def in_use(now: float, last_app: float) -> bool:
    """The application sent or received on the tunnel within ACTIVE_WINDOW_S."""
    return now - last_app <= ACTIVE_WINDOW_S


def silent_since(last_heard: float, resumed_at: float) -> float:
    """Where silence counts from: the last packet heard, or when the tunnel was used again after
    an idle spell if that is later. An idle tunnel hears nothing but the 25 s keepalives, so
    counted from the last packet alone it would look dead the moment it is used again, before
    the answer could come back (seen in the NAT lab under loss: a re-direction, no PING, each time
    the reply to the first packet after an idle second was lost; with a round trip above one
    liveness tick it would happen without loss)."""
    return max(last_heard, resumed_at)


def link_action(now: float, last_app: float, last_heard: float, recovering: bool) -> LinkAction:
    """What to do with a tunnel: nothing while idle or already recovering; probe it when it has
    been silent a little while in use; re-direct it when probing did not bring anything back.
    `last_heard` is where silence counts from (silent_since)."""
    if recovering or not in_use(now, last_app):
        return LinkAction.NONE
    silent = now - last_heard
    if silent >= DEAD_AFTER_S:
        return LinkAction.REDIRECT
    if silent >= PROBE_AFTER_S:
        return LinkAction.PROBE
    return LinkAction.NONE


def direct_retry_due(now: float, last_try: float, on_relay: bool, busy: bool) -> bool:
    """A tunnel on the relay (not pinned there by its application) should try a direct path."""
    return on_relay and not busy and now - last_try >= DIRECT_RETRY_S


def old_path_expired(now: float, last_heard: float) -> bool:
    """An old path (not the one we send on) that has been silent past its grace period."""
    return now - last_heard > OLD_PATH_GRACE_S


def recovered(now: float, last_heard: float) -> bool:
    """While re-directing: the old path came back (the peer roamed, or resumed from its side)."""
    return now - last_heard < PROBE_AFTER_S


def session_dead(now: float, last_reply: float, keepalive_interval: float) -> bool:
    """No keepalive reply from the DC for KEEPALIVE_MISSES intervals."""
    return now - last_reply > KEEPALIVE_MISSES * keepalive_interval


def reconnect_delay(failures: int) -> float:
    """Backoff before the next session attempt after `failures` failures in a row (≥ 1)."""
    return RECONNECT_BACKOFF_S[min(max(failures, 1), len(RECONNECT_BACKOFF_S)) - 1]


def should_fail_over(failures: int, silences: int = 0) -> bool:
    """Give the home DC up for another known DC: it refused or failed `failures` session attempts
    in a row, or stayed silent (no answer at all) `silences` times in a row."""
    return failures >= FAILOVER_AFTER_FAILURES or silences >= FAILOVER_AFTER_SILENCES


def repair_refusals(code: str, refusals: int) -> int:
    """Refusals in a row after a failed repair attempt with error `code`: one more after a
    refusal, none after any other failure (the path, not the peer, is the problem)."""
    return refusals + 1 if code in REPAIR_REFUSALS else 0


def repair_retry_delay(refusals: int) -> float:
    """How long a tunnel repair waits before its next Direction Request, `refusals` being the
    refusals in a row so far (0: the last attempt failed otherwise, retry fast)."""
    if refusals <= 0:
        return REPAIR_RETRY_S
    return REPAIR_REFUSED_BACKOFF_S[min(refusals, len(REPAIR_REFUSED_BACKOFF_S)) - 1]
