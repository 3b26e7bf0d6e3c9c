"""A subnet router in the lab (issue 24, PROTOCOL §10.10), for tests/lab/test_lab_routes.py and
bench/lab.py: node R behind a NAT advertises LAN, where a plain host H (no NTMobile, no route to
the overlay) sits; node N behind another NAT uses R's routes.

    r, h, n = subnet_router(fed, "rt")     # sites rt1 (R), rtn (N); H at H_ADDR
    wait_for_route(n, r)                   # N learned and accepted R's offer
    e, m = exit_pair(fed, "ex", s.addr4)   # M sends what it sends to S through exit node E
    Federation(..., rs_args=relay_exit_args(dir))   # a relay whose exit admits RELAY_EXIT_USER
    m = relay_exit_user(fed, host, s.addr4)         # M sends what it sends to S through the relay's exit
"""

from __future__ import annotations

import hashlib
import ipaddress
import time
from pathlib import Path

from ntm import keys
from .fed import Federation
from .topology import Host
from .upnode import UpNode

LAN = "10.77.0.0/24"
H_ADDR = "10.77.0.2"  # add_lan_host: the router's lan0 is .1, the host .2
#: How long N may take to learn R's offer: its first whois right after `ntm up`, then every
#: node/subnet.py RETRY_S (3 s) while unknown; generous for a loaded machine.
LEARN_TIMEOUT_S = 20.0


def subnet_router(fed: Federation, name: str, *n_args: str) -> tuple[UpNode, Host, UpNode]:
    """R (site `<name>1`, home DC 0) advertising LAN with H behind it, and N (site `<name>n`,
    home DC 1) started with `--use-routes R` and `n_args`. R accepts any peer."""
    lab = fed.lab
    r = UpNode(fed, lab.add_site(f"{name}1", "eim").host, 0, "--accept-any", "--advertise-routes", LAN)
    h = lab.add_lan_host(f"{name}h", r.host, LAN)
    n = UpNode(fed, lab.add_site(f"{name}n", "eim").host, 1, "--use-routes", r.id, *n_args)
    return r, h, n


EXIT_ROUTES = ["0.0.0.0/0", "::/0"]
EXIT_TABLE = "4330"  # node/subnet.py: where an exit's default routes go


def wait_for_route(node: UpNode, router: UpNode, want: list[str] | None = None) -> dict:
    """`node`'s routes status once it accepted `want` (LAN) from `router` (or after LEARN_TIMEOUT_S)."""
    deadline = time.monotonic() + LEARN_TIMEOUT_S
    while True:
        routes = node.status()["routes"]
        if routes["accepted"].get(router.id) == (want or [LAN]) or time.monotonic() > deadline:
            return routes
        time.sleep(0.3)


def exit_pair(fed: Federation, name: str, server4: str) -> tuple[UpNode, UpNode]:
    """Exit node E (site `<name>1`, DC 0, --advertise-exit, admitting only M) and M (site
    `<name>m`, DC 1) using E's exit for `server4`."""
    lab = fed.lab
    e = UpNode(fed, lab.add_site(f"{name}1", "eim").host, 0, "--advertise-exit")
    m = exit_user(fed, e, lab.add_site(f"{name}m", "eim").host, server4)
    e.cli("allow", m.id)
    return e, m


def exit_user(fed: Federation, e: UpNode, host: Host, server4: str) -> UpNode:
    """A node (home DC 1) started with --exit-node E whose traffic to `server4` goes through E
    (the user's `ip rule` for table 4330), once it accepted E's exit."""
    m = UpNode(fed, host, 1, "--exit-node", e.id)
    routes = wait_for_route(m, e, EXIT_ROUTES)
    assert routes["accepted"] == {e.id: EXIT_ROUTES}, routes
    r = m.run("ip", "rule", "add", "to", f"{server4}/32", "lookup", EXIT_TABLE)
    assert r.returncode == 0, r.stderr
    return m


#: The one node the relay's exit admits in the lab (§10.13): its ID must be on the relay's
#: --exit-allow when the relay starts, before the node exists, so its key is fixed.
RELAY_EXIT_USER = keys.private_key(hashlib.sha256(b"lab relay exit user").digest())


def relay_exit_args(state: Path) -> tuple[str, ...]:
    """`ntm-rs` flags of a relay whose exit admits RELAY_EXIT_USER only (rules recorded in `state`)."""
    return ("--exit", "--exit-allow", keys.checksum(keys.node_id_of(RELAY_EXIT_USER)), "--exit-state", str(state))


def relay_exit_user(fed: Federation, host: Host, *servers: str) -> UpNode:
    """RELAY_EXIT_USER (home DC 1) on `host` with `ntm up --exit-relay`, its traffic to `servers`
    going through the relay's exit (the user's `ip rule`s for table 4330)."""
    m = UpNode(fed, host, 1, "--exit-relay", key=RELAY_EXIT_USER)
    for addr in servers:
        r = m.run("ip", f"-{ipaddress.ip_address(addr).version}", "rule", "add", "to", addr, "lookup", EXIT_TABLE)
        assert r.returncode == 0, r.stderr
    return m
