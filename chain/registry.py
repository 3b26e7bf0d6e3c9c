"""Async client of the NodeRegistry contract (docs/PROTOCOL.md §3): a thin adapter, no policy.

Built on web3 8 `AsyncWeb3` with NO middleware (the default onion adds eth_chainId round trips
for validation and a gas-estimate layer we do ourselves) over chain/rpc.py's provider: one or
more JSON-RPC URLs, the next one tried when one fails at the transport; no retries beyond that
(callers retry: `events()` and the DC's submitter and follower do).
Calls are ABI-encoded with eth_abi from the committed artifact; transactions are signed locally
with an eth-account key, the nonce is kept locally and sends are serialized with an asyncio.Lock,
so concurrent `register()` calls pipeline without nonce collisions.

Errors: every failure surfaces as `RegistryError` with a readable message; a contract revert
carries the contract's reason string in `.reason` (e.g. "NodeRegistry: stale timestamp"). Only a
mined block is a verdict on a record: `submit()` never simulates (an estimate runs against the
latest block, whose timestamp on an idle chain is old, so it refuses records the next block takes).
"""

from __future__ import annotations

import asyncio
import json

from importlib import resources
from pathlib import Path
from typing import Any, AsyncIterator, Iterable, Sequence

import eth_abi
from eth_account import Account
from eth_utils import (
    event_abi_to_log_topic,
    function_abi_to_4byte_selector,
    get_abi_input_types,
    get_abi_output_types,
    to_checksum_address,
)
from web3 import AsyncWeb3
from web3.exceptions import BlockNotFound, ContractLogicError, TransactionNotFound, Web3Exception, Web3RPCError

from ntm import record
from ntm.clock import SYSTEM, Clock
from ntm.errors import NtmError
from chain.rpc import TRANSPORT_ERRORS, FailoverHTTPProvider
from ntm.registry import BlockRef, DcInfo, OnChainRecord, RegistryError, RegistryEvent, SubmitResult

ARTIFACT_NAME = "NodeRegistry.json"

# RecordRejected reason codes (NodeRegistry.sol) -> the revert string register() would give.
REJECT_REASONS: dict[int, str] = {
    1: "NodeRegistry: bad signature",
    2: "NodeRegistry: high s",
    3: "NodeRegistry: stale timestamp",
    4: "NodeRegistry: timestamp too far in future",
    5: "NodeRegistry: node revoked",
}

EVENT_KINDS = ("NodeRegistered", "NodeRevoked", "DCAdmitted", "DCUpdated", "DCRemoved")
_ERROR_SELECTOR = bytes.fromhex("08c379a0")  # Error(string)
# What a JSON-RPC call can fail with: an error answer, or the transport (every URL tried).
RPC_ERRORS = (Web3Exception, *TRANSPORT_ERRORS)
_GAS_MARGIN = 1.25
# Priority fee: 1 gwei gets a transaction into the next block on a private chain.
_TIP_WEI = 10**9


def fee_fields(gas_price: int) -> dict[str, int]:
    """The EIP-1559 fee fields of every transaction we send: up to twice the current base price
    plus the tip, so a rising base fee does not leave it stuck (only what is used is paid)."""
    return {"maxFeePerGas": 2 * gas_price + _TIP_WEI, "maxPriorityFeePerGas": _TIP_WEI, "type": 2}


# Gas limit of a registerBatch transaction, so it need not be estimated first: measured ~30k per
# new record plus ~25k per transaction (bench/gas.py); 50% headroom, only gas used is paid.
BATCH_GAS_BASE = 60_000
BATCH_GAS_PER_RECORD = 45_000
# A sent transaction whose receipt has not come after this is looked for in the pool; if the
# node no longer has it (dropped, or lost in a chain restart), the nonce is re-read and the
# records are sent again. Several block periods of a private network.
DROP_CHECK_S = 10.0


def load_artifact() -> dict:
    try:
        text = resources.files("chain").joinpath("artifacts", ARTIFACT_NAME).read_text()
    except FileNotFoundError:
        raise RegistryError(
            f"contract artifact chain/artifacts/{ARTIFACT_NAME} is missing: run `python -m scripts.compile`"
        ) from None
    return json.loads(text)


class _Abi:
    """Selectors, types and topics of the artifact's functions and events."""

    def __init__(self, abi: list[dict]) -> None:
        self.functions: dict[str, tuple[bytes, list[str], list[str]]] = {}
        self.events: dict[bytes, tuple[str, list[dict]]] = {}
        self.topics: dict[str, bytes] = {}
        for item in abi:
            if item["type"] == "function":
                self.functions[item["name"]] = (
                    function_abi_to_4byte_selector(item),
                    list(get_abi_input_types(item)),
                    list(get_abi_output_types(item)),
                )
            elif item["type"] == "event":
                topic = event_abi_to_log_topic(item)
                self.events[topic] = (item["name"], item["inputs"])
                self.topics[item["name"]] = topic

    def encode(self, name: str, *args: Any) -> bytes:
        selector, types, _ = self.functions[name]
        return selector + eth_abi.encode(types, args)

    def decode(self, name: str, data: bytes) -> tuple:
        return eth_abi.decode(self.functions[name][2], data)

    def decode_log(self, log: dict) -> tuple[str, dict] | None:
        topics = [bytes(t) for t in log["topics"]]
        if not topics or topics[0] not in self.events:
            return None
        name, inputs = self.events[topics[0]]
        indexed = [i for i in inputs if i["indexed"]]
        plain = [i for i in inputs if not i["indexed"]]
        values: dict[str, Any] = {}
        for inp, topic in zip(indexed, topics[1:]):
            values[inp["name"]] = eth_abi.decode([inp["type"]], topic)[0]
        for inp, val in zip(plain, eth_abi.decode([i["type"] for i in plain], bytes(log["data"]))):
            values[inp["name"]] = val
        return name, values


def _addr(value: bytes | str) -> bytes:
    if isinstance(value, (bytes, bytearray)):
        if len(value) != 20:
            raise ValueError("address must be 20 bytes")
        return bytes(value)
    raw = value[2:] if value[:2] in ("0x", "0X") else value
    out = bytes.fromhex(raw)
    if len(out) != 20:
        raise ValueError(f"address {value!r} is not 20 bytes")
    return out


def _cs(a: bytes) -> str:
    return to_checksum_address(a)


def _revert_reason(exc: ContractLogicError) -> str:
    """The Error(string) of a revert, from the data if present, else from web3's message."""
    data = exc.data
    if isinstance(data, dict):
        data = data.get("data")
    if isinstance(data, str) and data.startswith("0x"):
        raw = bytes.fromhex(data[2:])
        if raw[:4] == _ERROR_SELECTOR:
            try:
                return eth_abi.decode(["string"], raw[4:])[0]
            except Exception:
                pass
    msg = exc.message or str(exc)
    return msg.removeprefix("execution reverted: ").removeprefix("execution reverted")


class Registry:
    """One NodeRegistry deployment, seen through one RPC endpoint, optionally with a sending key."""

    def __init__(
        self, w3: AsyncWeb3, address: bytes, chain_id: int, key: bytes | None, artifact: dict, clock: Clock = SYSTEM
    ) -> None:
        self.w3, self.clock = w3, clock
        self.address = address
        self.chain_id = chain_id
        self.deploy_block: int | None = None  # set by deploy()
        self._account = Account.from_key(key) if key is not None else None
        self.sender: bytes | None = bytes.fromhex(self._account.address[2:]) if self._account else None
        self._abi = _Abi(artifact["abi"])
        self._lock = asyncio.Lock()
        self._nonce: int | None = None
        self._fee: tuple[float, int] | None = None  # (fetched at, gas price)

    # ------------------------------------------------------------------ construction

    @property
    def url(self) -> str:
        """The JSON-RPC URL in use now."""
        return self.w3.provider.url

    @staticmethod
    def _w3(rpc_urls: str | Sequence[str], clock: Clock = SYSTEM) -> AsyncWeb3:
        urls = [rpc_urls] if isinstance(rpc_urls, str) else list(rpc_urls)
        return AsyncWeb3(FailoverHTTPProvider(urls, clock=clock), middleware=[])

    @classmethod
    async def _chain_id(cls, w3: AsyncWeb3) -> int:
        try:
            return await w3.eth.chain_id
        except Exception as exc:
            await w3.provider.disconnect()
            raise RegistryError(f"cannot reach the chain RPC at {', '.join(w3.provider.urls)}: {exc}") from None

    @classmethod
    async def deploy(
        cls, rpc_url: str | Sequence[str], deployer_key: bytes, artifact: dict | None = None, clock: Clock = SYSTEM
    ) -> "Registry":
        """Deploy a fresh NodeRegistry; the deployer becomes its owner. `artifact`: another
        compilation of the same contract (bench/gas.py compares EVM targets), else the committed one."""
        artifact = artifact or load_artifact()
        w3 = cls._w3(rpc_url, clock)
        chain_id = await cls._chain_id(w3)
        reg = cls(w3, b"\0" * 20, chain_id, deployer_key, artifact, clock)
        try:
            receipt = await reg._transact(bytes.fromhex(artifact["bytecode"][2:]), to=None)
        except BaseException:
            await reg.close()
            raise
        reg.address = _addr(receipt["contractAddress"])
        reg.deploy_block = receipt["blockNumber"]
        return reg

    @classmethod
    async def connect(
        cls, rpc_url: str | Sequence[str], address: bytes | str, key: bytes | None = None, clock: Clock = SYSTEM
    ) -> "Registry":
        """Attach to an existing deployment; checks that a NodeRegistry with our EIP-712 domain is
        there. Several URLs: the first is preferred, the others are fallbacks (chain/rpc.py)."""
        artifact = load_artifact()
        address = _addr(address)
        w3 = cls._w3(rpc_url, clock)
        chain_id = await cls._chain_id(w3)
        reg = cls(w3, address, chain_id, key, artifact, clock)
        try:
            code = await w3.eth.get_code(_cs(address))
            if not code:
                raise RegistryError(f"no contract at {_cs(address)} on chain {chain_id} ({reg.url})")
            try:
                sep = await reg._call("domainSeparator")
            except RegistryError:
                sep = (None,)
            if sep[0] != reg.domain.separator():
                raise RegistryError(
                    f"the contract at {_cs(address)} on chain {chain_id} is not a compatible NodeRegistry"
                )
        except BaseException:
            await reg.close()
            raise
        return reg

    async def close(self) -> None:
        await self.w3.provider.disconnect()

    async def __aenter__(self) -> "Registry":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    @property
    def domain(self) -> record.Domain:
        return record.Domain(self.chain_id, self.address)

    # ------------------------------------------------------------------ plumbing

    def _wrap(self, exc: BaseException, what: str) -> RegistryError:
        if isinstance(exc, ContractLogicError):
            reason = _revert_reason(exc)
            return RegistryError(f"{what} reverted: {reason}", reason=reason)
        text = str(getattr(exc, "message", None) or exc)
        if isinstance(exc, Web3RPCError) and isinstance(exc.rpc_response, dict):
            err = exc.rpc_response.get("error")
            if isinstance(err, dict) and err.get("message"):
                text = str(err["message"])
        if "insufficient funds" in text.lower():
            who = self._account.address if self._account else "the sender"
            return RegistryError(f"account {who} has insufficient funds for gas on chain {self.chain_id} ({text})")
        if isinstance(exc, TRANSPORT_ERRORS):
            return RegistryError(f"cannot reach the chain RPC at {self.url}: {exc}")
        return RegistryError(f"{what} failed: {text}")

    async def _call(self, fn: str, *args: Any) -> tuple:
        data = self._abi.encode(fn, *args)
        try:
            out = await self.w3.eth.call({"to": _cs(self.address), "data": data})
        except RPC_ERRORS as exc:
            raise self._wrap(exc, fn) from None
        return self._abi.decode(fn, bytes(out))

    async def _gas_price(self) -> int:
        now = self.clock.now()
        if self._fee is None or now - self._fee[0] > 2.0:
            self._fee = (now, await self.w3.eth.gas_price)
        return self._fee[1]

    async def _transact(
        self, data: bytes, to: bytes | None, what: str = "transaction", gas_limit: int | None = None
    ) -> dict:
        """Estimate (surfacing a revert reason without spending gas), sign, send, wait for the receipt.

        With `gas_limit` the estimate is skipped: registerBatch never reverts for a bad record (it
        skips it), and estimating would execute the whole batch once more before sending it."""
        if self._account is None:
            raise RegistryError(f"{what} needs a key: connect with key=...")
        tx: dict[str, Any] = {"from": self._account.address, "data": data, "chainId": self.chain_id}
        if to is not None:
            tx["to"] = _cs(to)
        try:
            gas = gas_limit or int(await self.w3.eth.estimate_gas(tx) * _GAS_MARGIN) + 10_000
            price = await self._gas_price()
            tx.update(gas=gas, **fee_fields(price))
            async with self._lock:
                if self._nonce is None:
                    self._nonce = await self.w3.eth.get_transaction_count(self._account.address, "pending")
                tx["nonce"] = self._nonce
                signed = self._account.sign_transaction(tx)
                try:
                    tx_hash = await self.w3.eth.send_raw_transaction(signed.raw_transaction)
                except BaseException:
                    self._nonce = None  # unknown whether it was taken: re-read next time
                    raise
                if self._nonce == tx["nonce"]:  # else forget_nonce() ran meanwhile (a rollback): re-read
                    self._nonce += 1
            receipt = await self._receipt(bytes(tx_hash), tx["nonce"])
        except RegistryError:
            raise
        except RPC_ERRORS as exc:
            raise self._wrap(exc, what) from None
        if receipt["status"] != 1:
            reason = None
            try:  # replay on the current state to learn why (e.g. a race with another DC)
                await self.w3.eth.call({k: v for k, v in tx.items() if k in ("from", "to", "data")})
            except ContractLogicError as exc:
                reason = _revert_reason(exc)
            except Exception:
                pass
            raise RegistryError(f"{what} reverted on chain: {reason or 'no reason given'}", reason=reason)
        return receipt

    async def _receipt(self, tx_hash: bytes, nonce: int, timeout: float = 120.0) -> dict:
        """Wait for the receipt. Errors while waiting are not verdicts (a client may answer "not
        found in DB" for a moment after inclusion). A transaction that cannot mine (the node no
        longer has it, or its nonce is past the chain's: a restart or rollback lost our earlier
        ones) is given up: the nonce is re-read and RegistryError says so; the caller sends again."""
        delay, start = 0.002, self.clock.now()
        next_check = start + DROP_CHECK_S
        while True:
            try:
                return await self.w3.eth.get_transaction_receipt(tx_hash)
            except TransactionNotFound:
                pass
            except RPC_ERRORS:
                pass  # transient: the next poll (possibly through another URL) decides
            now = self.clock.now()
            if now > next_check:
                next_check = now + DROP_CHECK_S
                if not await self._can_mine(tx_hash, nonce):
                    self.forget_nonce()
                    raise RegistryError(
                        f"transaction 0x{tx_hash.hex()} (nonce {nonce}) cannot be mined: dropped "
                        "by the chain node or behind a nonce gap; sending again with a fresh nonce"
                    )
            if now - start > timeout:
                self.forget_nonce()
                raise RegistryError(f"transaction 0x{tx_hash.hex()} not mined within {timeout} s")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.1)

    async def _can_mine(self, tx_hash: bytes, nonce: int) -> bool:
        """Whether the node still has the transaction and nothing of ours is missing before it
        (the node's next pending nonce is past it); True when unsure."""
        assert self._account is not None
        try:
            await self.w3.eth.get_transaction(tx_hash)
            return await self.w3.eth.get_transaction_count(self._account.address, "pending") > nonce
        except TransactionNotFound:
            return False
        except RPC_ERRORS:
            return True

    def forget_nonce(self) -> None:
        self._nonce = None

    # ------------------------------------------------------------------ writes

    async def admit_dc(self, address: bytes | str, hostname: str, endpoint: str) -> SubmitResult:
        return await self._simple("admitDC", _cs(_addr(address)), hostname, endpoint)

    async def update_dc(self, hostname: str, endpoint: str, address: bytes | str | None = None) -> SubmitResult:
        """Update a DC's hostname/endpoint: our own (default), or `address`'s when we are the owner."""
        target = _addr(address) if address is not None else self.sender
        if target is None:
            raise RegistryError("update_dc needs a key: connect with key=...")
        return await self._simple("updateDC", _cs(target), hostname, endpoint)

    async def remove_dc(self, address: bytes | str) -> SubmitResult:
        return await self._simple("removeDC", _cs(_addr(address)))

    async def transfer_ownership(self, new_owner: bytes | str) -> SubmitResult:
        return await self._simple("transferOwnership", _cs(_addr(new_owner)))

    async def _simple(self, fn: str, *args: Any) -> SubmitResult:
        receipt = await self._transact(self._abi.encode(fn, *args), self.address, fn)
        return SubmitResult(bytes(receipt["transactionHash"]), receipt["blockNumber"], receipt["gasUsed"], 0)

    @staticmethod
    def encode_record(rec: record.NodeTransaction, signature: bytes) -> tuple:
        r, vs = record.to_compact(signature)
        return (_cs(rec.node), rec.timestamp, rec.revoked, r, vs)

    async def register(self, items: list[tuple[record.NodeTransaction, bytes]]) -> SubmitResult:
        """Submit node-signed records with this client's key as the DC (the records must name it).

        One item -> `register`, estimated first, so a refusal raises RegistryError with the
        reason before any gas is spent (for tools and tests); several -> `submit()`."""
        if not items:
            raise ValueError("nothing to register")
        if len(items) > 1:
            return await self.submit(items)
        data = self._abi.encode("register", self.encode_record(*items[0]))
        receipt = await self._transact(data, self.address, "register")
        return SubmitResult(bytes(receipt["transactionHash"]), receipt["blockNumber"], receipt["gasUsed"], 1)

    async def submit(self, items: list[tuple[record.NodeTransaction, bytes]]) -> SubmitResult:
        """One `registerBatch` transaction with a fixed gas limit, never simulated: the mined
        block is the verdict, refused records come back in `rejected`/`reasons` (the DC's path)."""
        if not items:
            raise ValueError("nothing to register")
        data = self._abi.encode("registerBatch", [self.encode_record(rec, sig) for rec, sig in items])
        receipt = await self._transact(
            data, self.address, "registerBatch", BATCH_GAS_BASE + BATCH_GAS_PER_RECORD * len(items)
        )
        rejected, reasons = [], []
        topic = self._abi.topics["RecordRejected"]
        for log in receipt["logs"]:
            if log["topics"] and bytes(log["topics"][0]) == topic:
                _, vals = self._abi.decode_log(log)
                rejected.append(_addr(vals["node"]))
                reasons.append(REJECT_REASONS.get(vals["reason"], f"reason {vals['reason']}"))
        return SubmitResult(
            bytes(receipt["transactionHash"]),
            receipt["blockNumber"],
            receipt["gasUsed"],
            len(items) - len(rejected),
            rejected,
            reasons,
            bytes(receipt["blockHash"]),
        )

    # ------------------------------------------------------------------ reads

    async def lookup(self, node: bytes | str) -> OnChainRecord | None:
        dc, timestamp, revoked = await self._call("lookup", _cs(_addr(node)))
        if timestamp == 0 and int(dc, 16) == 0:
            return None
        return OnChainRecord(_addr(dc), timestamp, revoked)

    async def digest(self, rec: record.NodeTransaction) -> bytes:
        """The contract's own EIP-712 digest of a record (equals rec.digest(self.domain))."""
        return bytes((await self._call("digest", _cs(rec.node), _cs(rec.dc), rec.timestamp, rec.revoked))[0])

    async def owner(self) -> bytes:
        return _addr((await self._call("owner"))[0])

    async def dc(self, address: bytes | str) -> DcInfo | None:
        address = _addr(address)
        active, hostname, endpoint = await self._call("getDC", _cs(address))
        if not active:
            return None
        return DcInfo(address, active, hostname, endpoint)

    async def dcs(self) -> list[DcInfo]:
        (addrs,) = await self._call("dcList")
        infos = await asyncio.gather(*(self.dc(a) for a in addrs))
        return [i for i in infos if i is not None]

    async def _rpc(self, what: str, call):
        try:
            return await call
        except RPC_ERRORS as exc:
            raise self._wrap(exc, what) from None

    async def block_number(self) -> int:
        return await self._rpc("eth_blockNumber", self.w3.eth.block_number)

    @staticmethod
    def _ref(block: dict) -> BlockRef:
        return BlockRef(block["number"], bytes(block["hash"]), block["timestamp"], block.get("gasLimit", 0))

    async def head(self) -> BlockRef:
        return self._ref(await self._rpc("eth_getBlockByNumber", self.w3.eth.get_block("latest")))

    async def block(self, number: int) -> BlockRef | None:
        try:
            return self._ref(await self.w3.eth.get_block(number))
        except BlockNotFound:
            return None
        except RPC_ERRORS as exc:
            raise self._wrap(exc, "eth_getBlockByNumber") from None

    async def balance(self) -> tuple[int, int]:
        if self._account is None:
            raise RegistryError("balance needs a key: connect with key=...")
        wei = await self._rpc("eth_getBalance", self.w3.eth.get_balance(self._account.address))
        return wei, await self._rpc("eth_gasPrice", self._gas_price())

    async def mined(self, tx_hash: bytes) -> int | None:
        try:
            return (await self.w3.eth.get_transaction_receipt(tx_hash))["blockNumber"]
        except TransactionNotFound:
            return None
        except RPC_ERRORS as exc:
            raise self._wrap(exc, "eth_getTransactionReceipt") from None

    # ------------------------------------------------------------------ events

    def parse_log(self, log: dict) -> RegistryEvent | None:
        decoded = self._abi.decode_log(log)
        if decoded is None:
            return None
        kind, v = decoded
        node = _addr(v["node"]) if "node" in v else None
        dc = _addr(v["dc"]) if "dc" in v else None
        return RegistryEvent(
            kind=kind,
            block=log["blockNumber"],
            log_index=log["logIndex"],
            tx_hash=bytes(log["transactionHash"]),
            node=node,
            dc=dc,
            timestamp=v.get("timestamp"),
            hostname=v.get("hostname"),
            endpoint=v.get("endpoint"),
            reason=v.get("reason"),
        )

    async def get_events(
        self, from_block: int, to_block: int, kinds: Iterable[str] = EVENT_KINDS
    ) -> list[RegistryEvent]:
        """Events of the given kinds in [from_block, to_block], in chain order.

        The logs are read as the raw JSON-RPC answer, not through web3's result formatters: a
        DC's catch-up reads every record of the registry, and formatting plus ABI-decoding each
        log was most of its ~80 µs per record (issue 30). Node events (two indexed addresses and
        one uint64) are sliced out of their hex; the rare DC events go through the ABI decoder."""
        params = {
            "address": _cs(self.address),
            "fromBlock": hex(from_block),
            "toBlock": hex(to_block),
            "topics": [["0x" + self._abi.topics[k].hex() for k in kinds]],
        }
        answer = await self._rpc("eth_getLogs", self.w3.provider.make_request("eth_getLogs", [params]))
        if not isinstance(answer, dict) or not isinstance(answer.get("result"), list):
            err = answer.get("error") if isinstance(answer, dict) else None
            message = err.get("message") if isinstance(err, dict) else None
            raise RegistryError(f"eth_getLogs failed: {message or 'no result in the answer'}")
        try:
            events = [e for e in map(self.parse_raw_log, answer["result"]) if e is not None]
        except (KeyError, ValueError, TypeError, IndexError, AttributeError) as exc:  # a chain node's garbage
            raise RegistryError(f"eth_getLogs answered a malformed log: {exc!r}") from None
        events.sort(key=lambda e: (e.block, e.log_index))
        return events

    def parse_raw_log(self, log: dict) -> RegistryEvent | None:
        """One log as eth_getLogs answers it (hex strings)."""
        topics = log["topics"]
        kind = self._abi.events.get(bytes.fromhex(topics[0][2:]), ("",))[0] if topics else ""
        if kind in ("NodeRegistered", "NodeRevoked") and len(topics) == 3 and len(log["data"]) == 66:
            return RegistryEvent(
                kind=kind,
                block=int(log["blockNumber"], 16),
                log_index=int(log["logIndex"], 16),
                tx_hash=bytes.fromhex(log["transactionHash"][2:]),
                node=bytes.fromhex(topics[1][-40:]),
                dc=bytes.fromhex(topics[2][-40:]),
                timestamp=int(log["data"], 16),
            )
        return self.parse_log(
            {
                "topics": [bytes.fromhex(t[2:]) for t in topics],
                "data": bytes.fromhex(log["data"][2:]),
                "blockNumber": int(log["blockNumber"], 16),
                "logIndex": int(log["logIndex"], 16),
                "transactionHash": bytes.fromhex(log["transactionHash"][2:]),
            }
        )

    async def events(
        self,
        from_block: int,
        poll_interval: float = 0.05,
        kinds: Iterable[str] = EVENT_KINDS,
        chunk: int = 2000,
        max_backoff: float = 5.0,
    ) -> AsyncIterator[RegistryEvent]:
        """Every event of `kinds` from `from_block` on, forever, in order. Polls eth_getLogs when
        the head moves; an RPC error is retried with backoff on the same block range (no gaps)."""
        kinds = tuple(kinds)
        next_block = from_block
        backoff = poll_interval
        while True:
            try:
                head = await self.w3.eth.block_number
                if head < next_block:
                    await asyncio.sleep(poll_interval)
                    continue
                to_block = min(head, next_block + chunk - 1)
                batch = await self.get_events(next_block, to_block, kinds)
            except RPC_ERRORS:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, max_backoff)
                continue
            backoff = poll_interval
            for ev in batch:
                yield ev
            next_block = to_block + 1


def load_deployment(path: Path) -> dict:
    """The deployment file written by scripts/deploy.py: chain id, registry address, deploy block."""
    try:
        dep = json.loads(Path(path).read_text())
        return {"chain_id": int(dep["chain_id"]), "registry": dep["registry"], "block": int(dep.get("block", 0))}
    except FileNotFoundError:
        raise NtmError(f"deployment file {path} not found (run scripts/deploy.py)") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise NtmError(f"deployment file {path} is invalid: {exc}") from None


async def connect_registry(
    rpc_url: str | Sequence[str], deployment: Path, key: bytes | None = None, clock: Clock = SYSTEM
) -> tuple[Registry, dict]:
    """The registry of a deployment, refusing a chain whose id differs from the deployment's."""
    dep = load_deployment(deployment)
    registry = await Registry.connect(rpc_url, dep["registry"], key, clock)
    if registry.chain_id != dep["chain_id"]:
        await registry.close()
        raise NtmError(f"chain at {registry.url} has id {registry.chain_id}, deployment says {dep['chain_id']}")
    return registry, dep
