"""scripts/procs.free_port: ports for servers started a little later, apart per pytest worker."""

from __future__ import annotations

import socket

from scripts import procs


def test_each_pytest_worker_draws_free_ports_from_its_own_slice(monkeypatch):
    """Condition: two xdist workers' tests pick ports at the same time (a devnet's DC binds its
    port seconds after the pick). Their slices of FREE_PORT_RANGE do not overlap, so one worker
    never draws a port another just picked; outside pytest-xdist the whole range is used."""
    slices = []
    for worker in ("gw0", "gw1", "gw7"):
        monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
        low, high = procs._free_port_range()
        port = procs.free_port()
        assert procs.FREE_PORT_RANGE[0] <= low <= port <= high <= procs.FREE_PORT_RANGE[1]
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # free, as promised
        slices.append(range(low, high + 1))
    assert not set(slices[0]) & set(slices[1]) and not set(slices[1]) & set(slices[2])
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "master")
    assert procs._free_port_range() == procs.FREE_PORT_RANGE
