"""NodeRegistry on a real anvil: every rule of docs/PROTOCOL.md §2–3, through chain.registry."""

from __future__ import annotations

import asyncio
import os
import time

import pytest
from eth_account import Account

from ntm import keys, record
from chain.registry import DcInfo, OnChainRecord, Registry, RegistryError
from scripts.anvil import DEV_KEYS


def now_ms() -> int:
    return int(time.time() * 1000)


def signed(key, dc: bytes, domain: record.Domain, ts: int, revoked: bool = False):
    rec = record.NodeTransaction(keys.node_id_of(key), dc, ts, revoked)
    return rec, rec.sign(key, domain)


async def expect_revert(reg: Registry, item, reason: str, node: bytes, before):
    with pytest.raises(RegistryError) as info:
        await reg.register([item])
    assert info.value.reason == f"NodeRegistry: {reason}", str(info.value)
    assert reason in str(info.value)
    assert await reg.lookup(node) == before  # state unchanged


async def test_register_and_lookup(registry_net):
    dc1 = registry_net.dc1
    key = keys.generate()
    nid = keys.node_id_of(key)
    assert await dc1.lookup(nid) is None
    ts = now_ms()
    res = await dc1.register([signed(key, dc1.sender, dc1.domain, ts)])
    assert res.accepted == 1 and res.rejected == [] and res.gas_used > 21000 and len(res.tx_hash) == 32
    assert await dc1.lookup(nid) == OnChainRecord(dc1.sender, ts, False)
    res = await dc1.register([signed(key, dc1.sender, dc1.domain, ts + 5, True)])
    assert await dc1.lookup(nid) == OnChainRecord(dc1.sender, ts + 5, True)


async def test_contract_digest_matches_python(registry_net):
    reg = registry_net.dc1
    rec = record.NodeTransaction(keys.node_id_of(keys.generate()), reg.sender, 1700000000000, True)
    assert await reg.digest(rec) == rec.digest(reg.domain)
    (sep,) = await reg._call("domainSeparator")
    assert sep == reg.domain.separator()


async def test_rejections_leave_state_unchanged(registry_net):
    dc1, dc2 = registry_net.dc1, registry_net.dc2
    key = keys.generate()
    nid = keys.node_id_of(key)
    ts = now_ms()
    first = signed(key, dc1.sender, dc1.domain, ts)
    await dc1.register([first])
    stored = await dc1.lookup(nid)

    # signed by another key (claims to be `nid`)
    rec = record.NodeTransaction(nid, dc1.sender, ts + 1)
    other = keys.generate()
    await expect_revert(dc1, (rec, keys.sign_digest(other, rec.digest(dc1.domain))), "bad signature", nid, stored)
    # signed for another chain id / another registry address
    for domain in (record.Domain(dc1.chain_id + 1, dc1.address), record.Domain(dc1.chain_id, os.urandom(20))):
        await expect_revert(dc1, signed(key, dc1.sender, domain, ts + 1), "bad signature", nid, stored)
    # replay of the exact record, equal and older timestamps
    await expect_revert(dc1, first, "stale timestamp", nid, stored)
    await expect_revert(dc1, signed(key, dc1.sender, dc1.domain, ts), "stale timestamp", nid, stored)
    await expect_revert(dc1, signed(key, dc1.sender, dc1.domain, ts - 1), "stale timestamp", nid, stored)
    # too far ahead of chain time (10 min + margin)
    await expect_revert(
        dc1, signed(key, dc1.sender, dc1.domain, ts + 660_000), "timestamp too far in future", nid, stored
    )
    # a record naming DC2 submitted by DC1: the digest uses msg.sender, so the signature fails
    await expect_revert(dc1, signed(key, dc2.sender, dc1.domain, ts + 1), "bad signature", nid, stored)
    # a DC that is not (or no longer) active
    await expect_revert(
        registry_net.outsider,
        signed(key, registry_net.outsider.sender, dc1.domain, ts + 1),
        "not an active DC",
        nid,
        stored,
    )
    await registry_net.owner.remove_dc(dc2.sender)
    await expect_revert(dc2, signed(key, dc2.sender, dc1.domain, ts + 1), "not an active DC", nid, stored)


async def test_high_s_refused(registry_net):
    dc1 = registry_net.dc1
    key = keys.generate()
    nid = keys.node_id_of(key)
    rec, sig = signed(key, dc1.sender, dc1.domain, now_ms())
    r, s, v = sig[:32], int.from_bytes(sig[32:64], "big"), sig[64]
    # The malleable twin (n - s, flipped v) as the contract would see it in EIP-2098 form: the twin's
    # s is >= 2^255 for all but ~2^-127 of signatures, so it does not even fit; it fails recovery.
    twin = r + (keys.SECP256K1_N - s).to_bytes(32, "big") + bytes([55 - v])
    twin_vs = (((twin[64] - 27) << 255) | int.from_bytes(twin[32:64], "big")) & (2**256 - 1)
    enc = (keys.checksum(nid), rec.timestamp, False, r, twin_vs.to_bytes(32, "big"))
    with pytest.raises(RegistryError, match="bad signature|high s"):
        await dc1._transact(dc1._abi.encode("register", enc), dc1.address, "register")
    # An s in (n/2, 2^255) is representable and must be refused before ecrecover.
    high = r + (keys.HALF_N + 1).to_bytes(32, "big") + bytes([v])
    with pytest.raises(RegistryError) as info:
        await dc1.register([(rec, high)])
    assert info.value.reason == "NodeRegistry: high s"
    assert await dc1.lookup(nid) is None
    # A signature ecrecover cannot recover (r = 0) must not be mistaken for the node's.
    with pytest.raises(RegistryError, match="bad signature"):
        await dc1.register([(rec, bytes(32) + sig[32:])])
    await dc1.register([(rec, sig)])  # the low-s original still works
    assert (await dc1.lookup(nid)).timestamp == rec.timestamp


async def test_revoked_is_terminal(registry_net):
    dc1, dc2 = registry_net.dc1, registry_net.dc2
    key = keys.generate()
    nid = keys.node_id_of(key)
    ts = now_ms()
    await dc1.register([signed(key, dc1.sender, dc1.domain, ts, revoked=True)])
    stored = await dc1.lookup(nid)
    assert stored.revoked
    for reg, revoked in ((dc1, False), (dc1, True), (dc2, False)):
        await expect_revert(reg, signed(key, reg.sender, reg.domain, ts + 1, revoked), "node revoked", nid, stored)


async def test_rehoming(registry_net):
    dc1, dc2 = registry_net.dc1, registry_net.dc2
    key = keys.generate()
    nid = keys.node_id_of(key)
    ts = now_ms()
    old_at_dc1 = signed(key, dc1.sender, dc1.domain, ts + 1)
    await dc1.register([signed(key, dc1.sender, dc1.domain, ts)])
    await dc2.register([signed(key, dc2.sender, dc2.domain, ts + 2)])
    moved = await dc1.lookup(nid)
    assert moved == OnChainRecord(dc2.sender, ts + 2, False)
    await expect_revert(dc1, old_at_dc1, "stale timestamp", nid, moved)


async def test_batch_all_good(registry_net):
    dc1 = registry_net.dc1
    ts = now_ms()
    node_keys = [keys.generate() for _ in range(12)]
    res = await dc1.register([signed(k, dc1.sender, dc1.domain, ts + i) for i, k in enumerate(node_keys)])
    assert res.accepted == 12 and res.rejected == [] and res.reasons == []
    for i, k in enumerate(node_keys):
        assert await dc1.lookup(keys.node_id_of(k)) == OnChainRecord(dc1.sender, ts + i, False)


async def test_batch_mixed_reports_rejects(registry_net):
    dc1, dc2 = registry_net.dc1, registry_net.dc2
    ts = now_ms()
    good = [keys.generate() for _ in range(3)]
    stale, revoked, forged, future, other_dc = (keys.generate() for _ in range(5))
    await dc2.register([signed(stale, dc2.sender, dc2.domain, ts + 10)])  # newer record landed elsewhere
    await dc1.register([signed(revoked, dc1.sender, dc1.domain, ts, True)])
    forged_rec = record.NodeTransaction(keys.node_id_of(forged), dc1.sender, ts)
    items = [
        signed(good[0], dc1.sender, dc1.domain, ts),
        signed(stale, dc1.sender, dc1.domain, ts + 5),
        signed(good[1], dc1.sender, dc1.domain, ts),
        signed(revoked, dc1.sender, dc1.domain, ts + 1),
        (forged_rec, keys.sign_digest(keys.generate(), forged_rec.digest(dc1.domain))),
        signed(future, dc1.sender, dc1.domain, ts + 3_600_000),
        signed(other_dc, dc2.sender, dc1.domain, ts),
        signed(good[2], dc1.sender, dc1.domain, ts),
    ]
    res = await dc1.register(items)
    assert res.accepted == 3
    assert res.rejected == [keys.node_id_of(k) for k in (stale, revoked, forged, future, other_dc)]
    assert res.reasons == [
        "NodeRegistry: stale timestamp",
        "NodeRegistry: node revoked",
        "NodeRegistry: bad signature",
        "NodeRegistry: timestamp too far in future",
        "NodeRegistry: bad signature",
    ]
    for k in good:
        assert (await dc1.lookup(keys.node_id_of(k))).dc == dc1.sender
    assert (await dc1.lookup(keys.node_id_of(stale))) == OnChainRecord(dc2.sender, ts + 10, False)
    for k in (forged, future, other_dc):
        assert await dc1.lookup(keys.node_id_of(k)) is None


async def test_batch_needs_active_dc(registry_net):
    out = registry_net.outsider
    items = [signed(keys.generate(), out.sender, out.domain, now_ms()) for _ in range(2)]
    with pytest.raises(RegistryError, match="not an active DC"):
        await out.register(items)


async def test_concurrent_submissions_share_nonce_space(registry_net):
    dc1 = registry_net.dc1
    ts = now_ms()
    node_keys = [keys.generate() for _ in range(8)]
    results = await asyncio.gather(*(dc1.register([signed(k, dc1.sender, dc1.domain, ts)]) for k in node_keys))
    assert len({r.tx_hash for r in results}) == 8
    for k in node_keys:
        assert (await dc1.lookup(keys.node_id_of(k))).timestamp == ts


async def test_dc_membership(registry_net):
    owner, dc1, dc2, out = registry_net.owner, registry_net.dc1, registry_net.dc2, registry_net.outsider
    assert await owner.dcs() == [
        DcInfo(dc1.sender, True, "dc1.test", "http://127.0.0.1:9001"),
        DcInfo(dc2.sender, True, "dc2.test", "http://127.0.0.1:9002"),
    ]
    await dc1.update_dc("dc1.moved", "http://127.0.0.1:9101")  # a DC updates itself
    assert await owner.dc(dc1.sender) == DcInfo(dc1.sender, True, "dc1.moved", "http://127.0.0.1:9101")
    with pytest.raises(RegistryError, match="not owner"):
        await dc1.admit_dc(out.sender, "x", "y")
    with pytest.raises(RegistryError, match="not owner or the DC"):
        await dc1.update_dc("evil", "http://evil", address=dc2.sender)
    with pytest.raises(RegistryError, match="already active"):
        await owner.admit_dc(dc1.sender, "again", "again")
    await owner.remove_dc(dc1.sender)
    assert await owner.dc(dc1.sender) is None
    assert [d.address for d in await owner.dcs()] == [dc2.sender]
    with pytest.raises(RegistryError, match="not an active DC"):
        await owner.remove_dc(dc1.sender)
    await owner.transfer_ownership(dc2.sender)
    assert await owner.owner() == dc2.sender
    with pytest.raises(RegistryError, match="not owner"):
        await owner.admit_dc(out.sender, "x", "y")
    await dc2.admit_dc(out.sender, "dc3.test", "http://127.0.0.1:9003")
    assert (await dc2.dc(out.sender)).hostname == "dc3.test"


async def test_events_iterator(registry_net):
    owner, dc1 = registry_net.owner, registry_net.dc1
    key = keys.generate()
    nid = keys.node_id_of(key)
    ts = now_ms()
    await dc1.register([signed(key, dc1.sender, dc1.domain, ts)])
    await dc1.register([signed(key, dc1.sender, dc1.domain, ts + 1, True)])
    await dc1.update_dc("dc1.new", "http://127.0.0.1:9999")
    await owner.remove_dc(registry_net.dc2.sender)

    got = []

    async def collect():
        async for ev in dc1.events(owner.deploy_block):
            got.append(ev)
            if len(got) == 6:
                return

    await asyncio.wait_for(collect(), 10)
    assert [e.kind for e in got] == [
        "DCAdmitted",
        "DCAdmitted",
        "NodeRegistered",
        "NodeRevoked",
        "DCUpdated",
        "DCRemoved",
    ]
    assert (got[0].dc, got[0].hostname, got[0].endpoint) == (dc1.sender, "dc1.test", "http://127.0.0.1:9001")
    assert (got[2].node, got[2].dc, got[2].timestamp) == (nid, dc1.sender, ts)
    assert (got[3].node, got[3].dc, got[3].timestamp) == (nid, dc1.sender, ts + 1)
    assert got[4].hostname == "dc1.new" and got[5].dc == registry_net.dc2.sender
    assert [(e.block, e.log_index) for e in got] == sorted((e.block, e.log_index) for e in got)


async def test_events_follow_new_blocks(registry_net):
    dc1 = registry_net.dc1
    start = await dc1.block_number() + 1
    key = keys.generate()

    async def first():
        async for ev in dc1.events(start, poll_interval=0.01):
            return ev

    task = asyncio.create_task(first())
    await asyncio.sleep(0.1)
    await dc1.register([signed(key, dc1.sender, dc1.domain, now_ms())])
    ev = await asyncio.wait_for(task, 5)
    assert ev.kind == "NodeRegistered" and ev.node == keys.node_id_of(key)


async def test_connect_errors(anvil, registry_net):
    with pytest.raises(RegistryError, match="no contract at"):
        await Registry.connect(anvil.url, os.urandom(20))
    with pytest.raises(RegistryError, match="cannot reach the chain RPC"):
        await Registry.connect("http://127.0.0.1:1", registry_net.owner.address)
    with pytest.raises(RegistryError, match="not a compatible NodeRegistry"):  # anvil's CREATE2 factory: code, not ours
        await Registry.connect(anvil.url, "0x4e59b44847b379578588920cA78FbF26c0B4956C")
    poor = await Registry.connect(anvil.url, registry_net.owner.address, os.urandom(32))
    try:
        await registry_net.owner.admit_dc(poor.sender, "poor.test", "http://127.0.0.1:9004")  # an unfunded DC
        with pytest.raises(RegistryError, match="insufficient funds"):
            await poor.register([signed(keys.generate(), poor.sender, poor.domain, now_ms())])
        with pytest.raises(RegistryError, match="insufficient funds"):
            await Registry.deploy(anvil.url, os.urandom(32))
    finally:
        await poor.close()


def test_dev_keys_are_anvil_accounts(anvil):
    assert [a.lower() for a in anvil.rpc("eth_accounts")] == [Account.from_key(k).address.lower() for k in DEV_KEYS]
