"""A DC books a relay's exit for one of its nodes (docs/PROTOCOL.md §10.13).

The node asks with a node-signed envelope (`exit.request`); the DC checks it has a live session
with that node, then asks its relays in turn with a DC-signed Exit Booking (the relay admits only
booked nodes its operator allows) and hands the first grant to the node.

    booker = ExitBooker(coordinator)
    grant = await booker.book(envelope_json)     # ExitError with the refusal if none
"""

from __future__ import annotations

import os

from dc.coordinator import Coordinator
from dc.federation import FederationError
from ntm import envelope, keys, messages
from ntm.errors import CodedError
from ntm.ratelimit import Buckets

#: How long one booking lasts: the node books again after it (or after a move to a new path).
EXIT_BOOKING_S = 3600
#: What the DC asks for one booking; the relay's own cap (--exit-max-bytes) may grant less.
EXIT_BOOKING_BYTES = 4 * 1024**3
PATH_ID_LEN = 8
#: Bookings one node may ask for: a burst for a few moves in a row, then one per 5 s (a repair
#: retries every 0.3 s while it fails): each booking costs the DC a request to a relay.
EXIT_BOOKINGS_BURST = 5
EXIT_BOOKINGS_PER_S = 0.2
#: Nodes whose booking rate is remembered (least recently seen forgotten first).
EXIT_RATE_NODES = 10_000


class ExitError(CodedError):
    """No exit for this node: our own refusals by code, or a relay's refusal passed on with the
    relay's `status`."""

    STATUS = {"no_session": 403, "rate_limited": 429, "no_exit": 503}

    def __init__(self, code: str, message: str, status: int = 0) -> None:
        super().__init__(code, message)
        self.status = status

    def refusal(self) -> tuple[int, str]:
        return (self.status, self.code) if self.status else super().refusal()


class ExitBooker:
    """The DC's exit bookings: who may ask how often, and the relays asked."""

    def __init__(self, c: Coordinator) -> None:
        self.c = c
        self.rate = Buckets(EXIT_BOOKINGS_PER_S, EXIT_BOOKINGS_BURST, EXIT_RATE_NODES)

    async def book(self, obj: object) -> messages.ExitGrant:
        """The grant of the first relay that books an exit for the (signed, live) requesting node.
        ParseError / SignatureError for a bad envelope; ExitError when no relay grants one."""
        c = self.c
        env, _ = envelope.open_body(
            obj, messages.EXIT_REQUEST, messages.ExitRequest, c.clock.wall_ms(), lambda _n: True, c.guard
        )
        node = env.sender
        if not c.presence.online(node):
            raise ExitError("no_session", f"{keys.checksum(node)} has no session with this DC: open one first")
        if not self.rate.take(node, c.clock.now()):
            raise ExitError("rate_limited", "too many exit bookings from this node; retry in a few seconds")
        return await book_exit(c, env, obj)


async def book_exit(c: Coordinator, env: envelope.Envelope, obj: dict) -> messages.ExitGrant:
    """Ask the relays in turn to book their exit for `env`'s signer (checked by the caller)."""
    node, now_ms = env.sender, c.clock.wall_ms()
    if not c.relays:
        raise ExitError("no_exit", "this DC knows no relay to book an exit at")
    pub = keys.recover(env.digest(), bytes.fromhex(obj["sig"])).format(compressed=False)
    booking = messages.ExitBooking(
        os.urandom(PATH_ID_LEN).hex(),
        keys.checksum(node),
        pub.hex(),
        now_ms + EXIT_BOOKING_S * 1000,
        EXIT_BOOKING_BYTES,
    )
    last: FederationError | None = None
    for url in c.relays:
        try:
            return await c.federation.book_exit(url, booking)
        except FederationError as exc:
            last = exc
    assert last is not None
    raise ExitError(last.code, str(last), last.status) if last.code else ExitError("no_exit", str(last))
