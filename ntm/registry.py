"""What the DC and the relay need from the NodeRegistry, as types and one interface, free of I/O.

The web3 adapter is chain/registry.py (`Registry`); tests use an in-memory one (tests/fakes.py).
Keeping the interface here lets dc/ logic be tested without a chain, and keeps web3 out of ntm/.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import AsyncIterator, Protocol

from ntm import record
from ntm.errors import NtmError


class RegistryError(NtmError):
    """A registry call that failed; `.reason` is the contract's revert string when it reverted."""

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class OnChainRecord:
    dc: bytes
    timestamp: int
    revoked: bool


@dataclass(frozen=True)
class DcInfo:
    address: bytes
    active: bool
    hostname: str
    endpoint: str


@dataclass(frozen=True)
class SubmitResult:
    tx_hash: bytes
    block_number: int
    gas_used: int
    accepted: int
    rejected: list[bytes] = field(default_factory=list)  # node IDs skipped by registerBatch, in order
    reasons: list[str] = field(default_factory=list)  # parallel to `rejected`: the revert string
    block_hash: bytes = b""  # of the block it was mined in (for rollback detection)


@dataclass(frozen=True)
class BlockRef:
    """A block as the DC remembers it: a changed hash at a known height means a reorg."""

    number: int
    hash: bytes
    timestamp: int  # seconds
    gas_limit: int = field(default=0, compare=False)  # the block's gas limit (0: not known)


@dataclass(frozen=True)
class RegistryEvent:
    """kind: one of EVENT_KINDS (or "RecordRejected"/"OwnershipTransferred" when asked for).
    node: node ID for Node* / RecordRejected events; dc: the DC (home DC for Node* events);
    timestamp: the record's ms timestamp for Node* events."""

    kind: str
    block: int
    log_index: int
    tx_hash: bytes
    node: bytes | None = None
    dc: bytes | None = None
    timestamp: int | None = None
    hostname: str | None = None
    endpoint: str | None = None
    reason: int | None = None


class RegistryView(Protocol):
    """The registry as a DC uses it: read records and DCs, follow events, submit records."""

    chain_id: int
    address: bytes

    @property
    def domain(self) -> record.Domain: ...

    async def lookup(self, node: bytes) -> OnChainRecord | None: ...

    async def dcs(self) -> list[DcInfo]: ...

    async def dc(self, address: bytes) -> DcInfo | None: ...

    def events(self, from_block: int, *, kinds: tuple[str, ...] = ...) -> AsyncIterator[RegistryEvent]: ...

    async def submit(self, items: list[tuple[record.NodeTransaction, bytes]]) -> SubmitResult:
        """Send records in one registerBatch transaction and return once it is mined: refused
        records are listed in the result (the chain's verdict), never raised."""

    async def block_number(self) -> int: ...

    async def head(self) -> BlockRef: ...

    async def block(self, number: int) -> BlockRef | None: ...

    async def get_events(self, from_block: int, to_block: int) -> list[RegistryEvent]: ...

    async def balance(self) -> tuple[int, int]:
        """(the sending key's balance, the current gas price), both in wei."""

    async def mined(self, tx_hash: bytes) -> int | None:
        """The block a transaction is in now (None if a reorg took it out)."""

    def forget_nonce(self) -> None:
        """Re-read the sending key's nonce from the chain before the next send (after a rollback)."""
