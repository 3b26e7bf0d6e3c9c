"""Shared fixtures: one real anvil per test session, a fresh NodeRegistry per test."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from chain.registry import Registry
from ntm import keys
from scripts.anvil import Anvil


@pytest.fixture(scope="session")
def anvil():
    """A real anvil devnode (automine) shared by the whole session."""
    with Anvil() as chain:
        yield chain


@dataclass
class RegistryNet:
    chain: Anvil
    owner: Registry  # deployer/owner client (dev key 0)
    dc1: Registry  # active DC client (dev key 1)
    dc2: Registry  # active DC client (dev key 2)
    outsider: Registry  # funded, never admitted (dev key 3)


@pytest.fixture
async def registry_net(anvil):
    """A freshly deployed NodeRegistry with DC1 and DC2 admitted."""
    owner = await Registry.deploy(anvil.url, anvil.keys[0])
    clients = [await Registry.connect(anvil.url, owner.address, anvil.keys[i]) for i in (1, 2, 3)]
    net = RegistryNet(anvil, owner, *clients)
    await owner.admit_dc(net.dc1.sender, "dc1.test", "http://127.0.0.1:9001")
    await owner.admit_dc(net.dc2.sender, "dc2.test", "http://127.0.0.1:9002")
    try:
        yield net
    finally:
        for reg in (owner, *clients):
            await reg.close()


@pytest.fixture
async def net(tmp_path):
    """Real processes on loopback: a fresh anvil, the registry, one RS, DC1 and DC2 (labkit/dcnet.py)."""
    from labkit.dcnet import relay_federation

    async with relay_federation(tmp_path) as net:
        yield net


@pytest.fixture
async def pair(net):
    """Node A at DC1 and node B at DC2, both online (in-process Nodes)."""
    from node.agent import Node
    from labkit.dcnet import register

    ka, kb = keys.generate(), keys.generate()
    await register(net.urls[0], ka)
    await register(net.urls[1], kb)
    a = await Node.start(ka, net.urls[0], host="127.0.0.1", port=0)
    b = await Node.start(kb, net.urls[1], host="127.0.0.1", port=0)
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()
