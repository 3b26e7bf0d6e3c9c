"""The Cache Server's decisions, pure (docs/PROTOCOL.md §12): who may use it, which upload is
taken and what it reserves, when an item expires, who may fetch, list or confirm an item, and
the notices to the recipients' home DCs.

Typed requests in, a decision (or CsError) out; time from the injected Clock. The edges read
what a decision needs and carry out the answer: cs/server.py (HTTP, the DC link) and cs/store.py
(SQLite and blob files). Imports only ntm/ and the pure cs/errors.py and cs/quota.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable

from cs.errors import CsError
from cs.quota import Caps, Ledger, Reservation, Stored
from ntm import envelope, keys, messages, seal
from ntm.clock import Clock

# Slowest upload taken: 16 KiB/s (128 kbit/s, a poor mobile uplink) on average; a 256 MiB item then
# has 4.5 h. A trickle below it would hold a socket and a quota reservation for nothing.
MIN_UPLOAD_BYTES_PER_S = 16 * 1024


@dataclass(frozen=True)
class Limits:
    """Per-CS limits; every refusal names the one it hit."""

    max_item_bytes: int = 256 << 20  # one item: a large file, not a backup
    sender_bytes: int = 1 << 30  # stored for one sender, across its items
    sender_items: int = 1000
    recipient_bytes: int = 1 << 30  # waiting for one recipient
    ttl_ms: int = 7 * 24 * 3600 * 1000  # an undelivered item is deleted after a week
    total_bytes: int = 50 << 30  # stored in all: many identities together cannot fill the disk

    def caps(self) -> Caps:
        return Caps(self.sender_items, self.sender_bytes, self.recipient_bytes, self.total_bytes)


@dataclass(frozen=True)
class Offer:
    """An upload as announced in its signed header: checked, nothing reserved yet."""

    sender: bytes
    header: seal.Header
    size: int


@dataclass(frozen=True)
class Upload:
    """An upload the core took: its bytes may stream in; `reservation` holds its share of every limit."""

    offer: Offer
    reservation: Reservation
    deadline: float  # Clock.now() by which all of it must be in


@dataclass(frozen=True)
class Accepted:
    """A complete upload, to index with these times and announce with these notices."""

    created_ms: int
    expires_ms: int
    notices: tuple[messages.CsNotice, ...]


def admit(node: bytes, info: messages.NodeInfo | None) -> messages.NodeInfo:
    """The node's record, if it may use this CS (registered, not revoked); CsError otherwise."""
    if info is None:
        raise CsError("unregistered", f"{keys.checksum(node)} is not a registered node")
    if info.revoked:
        raise CsError("revoked", f"{keys.checksum(node)} is revoked")
    return info


def notice_target(info: messages.NodeInfo, active_dcs: dict[bytes, str]) -> tuple[bytes, str]:
    """Where a notice for the node of `info` goes: its home DC (address, endpoint), if that DC is
    active (on our DC's list): a notice to anyone else would be refused or lost."""
    home = keys.parse_node_id(info.home_dc)
    endpoint = active_dcs.get(home)
    if endpoint is None:
        raise CsError("home_dc_unknown", f"home DC {info.home_dc} is not active")
    return home, endpoint.rstrip("/")


def bad_recipient(refusal: CsError) -> CsError:
    """A recipient that may not use this CS refuses the whole upload: nobody could fetch it."""
    return CsError("bad_recipient", f"recipient: {refusal}")


class CacheCore:
    """The Cache Server's state besides its store: uploads streaming in, their reservations, and
    the envelopes already seen (replays)."""

    def __init__(self, url: str, limits: Limits, clock: Clock, idle_s: float) -> None:
        """`idle_s`: the longest pause in an upload (the HTTP idle limit)."""
        self.url, self.limits, self.clock, self.idle_s = url, limits, clock, idle_s
        self.guard = envelope.ReplayGuard()
        self.uploading: set[bytes] = set()  # item IDs streaming in now (a second upload of one is refused)
        self.ledger = Ledger(limits.caps())  # what the uploads in flight have reserved

    def now_ms(self) -> int:
        """Wall time for what is stored and compared with stored times (created, expires)."""
        return self.clock.wall_ms()

    def open(self, obj: object, kind: str) -> envelope.Envelope:
        """A node-signed envelope of `kind`: signature, freshness, no replay. Whether its signer
        may use this CS is asked of the DC next (`admit`)."""
        return envelope.open_envelope(obj, kind, self.now_ms(), lambda _: True, self.guard)

    def offer(self, env: envelope.Envelope) -> Offer:
        """A CS_PUT request: a sealed item's header, sealed by the uploader, within the item limit."""
        put = envelope.body_of(env, messages.CsPut)
        header = seal.Header.from_json(put.header)
        if header.sender != env.sender:
            raise CsError("not_sender", "an item is uploaded by the node that sealed it")
        if put.size > self.limits.max_item_bytes:
            raise CsError("too_large", f"item of {put.size} bytes; this CS takes at most {self.limits.max_item_bytes}")
        return Offer(env.sender, header, put.size)

    def reserve(self, offer: Offer, stored: Stored, exists: bool, source: Hashable | None) -> Upload:
        """Take the upload or refuse it: a new item, within every quota counting the uploads in
        flight (cs/quota.py). `stored`/`exists`: what the store holds, read with nothing awaited
        since; `source` None is exempt from the per-source limits (the operator's networks)."""
        item = offer.header.item
        if exists or item in self.uploading:
            raise CsError("exists", f"item {item.hex()} is already stored or being uploaded")
        now = self.clock.now()
        reservation = self.ledger.reserve(offer.sender, tuple(offer.header.wraps), source, offer.size, stored, now)
        self.uploading.add(item)
        return Upload(offer, reservation, now + self.idle_s + offer.size / MIN_UPLOAD_BYTES_PER_S)

    def received(self, upload: Upload, got: int, done: bool) -> None:
        """`got` bytes are in (all of them if `done`): refused `incomplete` beyond the announced
        size, or short of it at the end."""
        size = upload.offer.size
        if got > size:
            raise CsError("incomplete", f"more than the announced {size} bytes")
        if done and got != size:
            raise CsError("incomplete", f"got {got} of the announced {size} bytes")

    def accept(self, upload: Upload) -> Accepted:
        """The upload is complete and durable: when it expires, and a notice for each recipient."""
        o, now = upload.offer, self.now_ms()
        notices = tuple(
            messages.CsNotice(
                node=keys.checksum(r),
                item=o.header.item.hex(),
                cs=self.url,
                sender=keys.checksum(o.sender),
                size=o.size,
                created=now,
            )
            for r in o.header.wraps
        )
        return Accepted(now, now + self.limits.ttl_ms, notices)

    def end(self, upload: Upload) -> None:
        """The upload is indexed (the store counts it now) or failed (nothing of it is kept)."""
        self.uploading.discard(upload.offer.header.item)
        self.ledger.release(upload.reservation)

    def may_fetch(
        self, node: bytes, item: bytes, ref: messages.CsItemRef, expires_ms: int | None, waiting: bool
    ) -> None:
        """A CS_GET or CS_ACK of `item` (the URL's) by `node`: the signed request names that item,
        it exists (`expires_ms` not None) and has not expired, and `node` is a recipient that has
        not confirmed it (`waiting`). Every refusal is the same `not_found`, whether the item does
        not exist or is someone else's: no probing."""
        if ref.item != item.hex() or expires_ms is None or expires_ms <= self.now_ms() or not waiting:
            raise CsError("not_found", f"no item {item.hex()} for {keys.checksum(node)}")
