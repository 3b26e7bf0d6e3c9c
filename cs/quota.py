"""The Cache Server's quota accounting, pure: an upload reserves its announced size against every
limit before a byte of it is stored, and releases it when it fails (issue 29 item 6). Stored
usage comes from the store (the caller reads it); this ledger adds what is in flight, so twelve
concurrent uploads by one sender are checked against each other, not each against the store
alone (they stored 4.8× the quota that way).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Hashable

from cs.errors import CsError
from ntm.ratelimit import Buckets, Concurrency

# Uploads one source network may have streaming in at once: a node sends a few items in parallel.
SOURCE_UPLOADS_AT_ONCE = 4
# Bytes one source network may upload: 2 GiB at once (a sender's quota and then some), refilled
# 2 GiB per hour, so a crowd of identities behind one source cannot fill the disk at link speed.
SOURCE_BYTES_PER_HOUR = 2 << 30
SOURCES_KEPT = 10_000  # source networks remembered (least recently seen forgotten first)


@dataclass(frozen=True)
class Stored:
    """What the store holds for the parties of one upload (read by the caller before reserving)."""

    sender_items: int
    sender_bytes: int
    recipient_bytes: dict[bytes, int]
    total_bytes: int


@dataclass(frozen=True)
class Caps:
    sender_items: int
    sender_bytes: int
    recipient_bytes: int
    total_bytes: int


@dataclass(frozen=True)
class Reservation:
    sender: bytes
    recipients: tuple[bytes, ...]
    source: Hashable | None
    size: int


@dataclass
class Ledger:
    """Reservations of the uploads in flight; refusals are CsError `over_quota` (a party's quota),
    `cs_full` (the CS's total) or `busy` (the source's uploads at once or its byte rate)."""

    caps: Caps
    sender_items: Counter = field(default_factory=Counter)
    sender_bytes: Counter = field(default_factory=Counter)
    recipient_bytes: Counter = field(default_factory=Counter)
    total_bytes: int = 0
    uploads: Concurrency = field(default_factory=lambda: Concurrency(SOURCE_UPLOADS_AT_ONCE))
    source_bytes: Buckets = field(
        default_factory=lambda: Buckets(SOURCE_BYTES_PER_HOUR / 3600, SOURCE_BYTES_PER_HOUR, SOURCES_KEPT)
    )

    def reserve(
        self,
        sender: bytes,
        recipients: tuple[bytes, ...],
        source: Hashable | None,
        size: int,
        stored: Stored,
        now: float,
    ) -> Reservation:
        """Reserve `size` bytes for an upload, or raise; `source` None is exempt from the source limits."""
        c = self.caps
        if stored.total_bytes + self.total_bytes + size > c.total_bytes:
            raise CsError("cs_full", f"this CS stores at most {c.total_bytes} bytes in all; try later")
        items = stored.sender_items + self.sender_items[sender] + 1
        used = stored.sender_bytes + self.sender_bytes[sender]
        if items > c.sender_items or used + size > c.sender_bytes:
            raise CsError(
                "over_quota",
                f"sender quota: {items - 1} items, {used} bytes stored or uploading of "
                f"{c.sender_items} items, {c.sender_bytes} bytes",
            )
        for r in recipients:
            if stored.recipient_bytes.get(r, 0) + self.recipient_bytes[r] + size > c.recipient_bytes:
                raise CsError("over_quota", f"recipient {r.hex()} already has {c.recipient_bytes} bytes waiting")
        if source is not None:
            if not self.uploads.acquire(source):
                raise CsError("busy", f"{SOURCE_UPLOADS_AT_ONCE} uploads from this network at once at most")
            if not self.source_bytes.take(source, now, size):
                self.uploads.release(source)
                raise CsError("busy", "this network uploaded too much lately; retry later")
        reservation = Reservation(sender, recipients, source, size)
        self._add(reservation, 1)
        return reservation

    def release(self, r: Reservation) -> None:
        """The upload is indexed (the store counts it now) or failed (nothing of it is kept)."""
        self._add(r, -1)
        if r.source is not None:
            self.uploads.release(r.source)

    def _add(self, r: Reservation, sign: int) -> None:
        self.sender_items[r.sender] += sign
        self.sender_bytes[r.sender] += sign * r.size
        for x in r.recipients:
            self.recipient_bytes[x] += sign * r.size
        self.total_bytes += sign * r.size
        for counter in (self.sender_items, self.sender_bytes, self.recipient_bytes):  # bounded memory
            for key in (r.sender, *r.recipients):
                if counter.get(key) == 0:
                    del counter[key]
