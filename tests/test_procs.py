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


def test_ports_drawn_before_any_is_bound_are_all_different(monkeypatch):
    """Condition: the devnet draws nine ports, then starts its servers one by one. Drawn from a
    range of 10, nine independent picks would repeat one nearly always (all differ with p 0.004); a
    repeat gives two servers one port and the second fails with "Address already in use"."""
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    monkeypatch.setattr(procs, "FREE_PORT_RANGE", (28_000, 28_009))
    monkeypatch.setattr(procs, "_handed_out", set())
    ports = [procs.free_port() for _ in range(9)]
    assert len(set(ports)) == 9
