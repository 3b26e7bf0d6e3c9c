"""NTMobile through real NATs (issue #5): the NAT-type grid, IPv4/IPv6 relay, mobility, DC
failover and NAT-table keepalives, with the real DC, RS and node agent in network namespaces.

One federation for the module (anvil, DC1..DC3, RS in lab.server: labkit/lab/fed.py); every node
is a long-lived driver process (labkit/lab/nodectl.py) in its own namespace. Keepalive interval in
the lab: KEEPALIVE_S (the agent's default is 25 s). Run with -s to see the tables.
"""

from __future__ import annotations

import json
import time

import pytest

from ntm.pmtu import CONFIRM_S, PROBE_ROUND_S

from labkit.lab.fed import KINDS, Federation, grid_rows, grid_table, ip_of, open_tunnel

pytestmark = pytest.mark.lab

KEEPALIVE_S = 2.0
N_PER_PAIR = 5


@pytest.fixture(scope="module")
def fed(lab_shared, tmp_path_factory):
    with Federation(lab_shared, tmp_path_factory.mktemp("federation"), n_dcs=3, keepalive_s=KEEPALIVE_S) as f:
        yield f


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return tmp_path_factory.mktemp("lab-results")


# --------------------------------------------------------------------------------------- grid
def test_nat_type_grid(fed, results):
    """All 16 ordered pairs: the requester's kind and the peer's differ in role (who initiates,
    which DC decides, whose candidates are tried), so both directions of each unordered pair run.
    A registers at DC1, B at DC2; N fresh tunnels per pair, data both ways, route kind and the path
    that carried the data (relay address or the peer's own address) asserted every time."""
    lab = fed.lab
    nodes = {}
    for kind in KINDS:
        for i in (1, 2):
            host = lab.add_site(f"g{kind[:3]}{i}", kind).host
            nodes[kind, i] = fed.node(host, dc=i - 1)
    rows = grid_rows(fed, nodes, N_PER_PAIR)
    failures = [r for r in rows if not r["ok"]]
    table = grid_table(rows)
    print("\n" + table)
    (results / "grid.txt").write_text(table + "\n")
    (results / "grid.json").write_text(json.dumps(rows, indent=1))
    assert not failures, f"{len(failures)} tunnels off the expected table; first: {failures[0]}"
    # When the peer initiates (nat_initiates, peer behind the NAT), its first Tunnel Request may
    # reach the requester before the DC's one reply does (§8.1): the requester's endpoint keeps it
    # and answers it when the path opens, else each such tunnel waits a 250 ms retransmission.
    slow = sorted(r["setup_ms"] for r in rows if r["kind"] == "nat_initiates" and r["a"] == "public")
    assert slow[len(slow) // 2] < 150, slow


def test_two_nodes_behind_one_nat_go_direct_over_the_lan(fed):
    """Two nodes behind one EIM NAT (one public IP, no hairpin). Their LAN addresses are only
    announced, never verified by a shared public IP (an attacker may share it: issue 29 item 8),
    so each gets the other's as its one unverified candidate, tried once: on a LAN that is enough,
    and every fresh tunnel still goes direct over the LAN."""
    lab = fed.lab
    site = lab.add_site("lan1", "eim")
    a = fed.node(site.host, dc=0)
    b_host = lab.add_host("lan1b", site)
    b = fed.node(b_host, dc=1)
    for _ in range(5):
        ta, tb = open_tunnel(a, b)
        ex = a.call("exchange", tunnel=ta["tunnel"], count=2)
        assert ta["kind"] == "punch" and ta["via"] != "relay", ta
        assert ip_of(ex["peer_addr"]) == b_host.addr4, ex
        a.call("close", tunnel=ta["tunnel"])
        b.call("close", tunnel=tb["tunnel"])


# ----------------------------------------------------------------------------------- mobility
def run_transfer(sender, receiver, tunnel_s, tunnel_r, moves, chunks=3000, size=1000, rate=1000.0):
    """Start a reliable transfer, run `moves` [(at_s, fn)], wait; both sides' results."""
    sender.call("transfer", tunnel=tunnel_s, chunks=chunks, size=size, rate=rate)
    t0 = time.monotonic()
    for at, fn in moves:
        time.sleep(max(0.0, at - (time.monotonic() - t0)))
        fn()
    res = sender.call("transfer_result", tunnel=tunnel_s, timeout=60)
    rx = receiver.call("received", tunnel=tunnel_r)
    return res, rx


def test_mobility_roaming_nat_public_nat(fed, results):
    """M moves behind NAT A → public → behind NAT B during a transfer to a public peer: the peer
    follows M's authenticated packets (roaming), no new direction; same node ID; data intact."""
    lab = fed.lab
    lab.add_site("mna", "eim")
    lab.add_site("mnb", "eim")
    m = fed.node(lab.add_host("mob1", "mna"), dc=0)
    p = fed.node(lab.add_site("mpub", "public").host, dc=1)
    ta, tb = open_tunnel(m, p)
    assert ta["kind"] == "nat_initiates"
    res, rx = run_transfer(
        m,
        p,
        ta["tunnel"],
        tb["tunnel"],
        [(0.8, lambda: lab.move("mob1", None)), (1.8, lambda: lab.move("mob1", "mnb"))],
    )
    info_p = p.call("info", tunnel=tb["tunnel"])
    line = (
        f"roaming handover (NAT A → public → NAT B, peer public): max gap {rx['max_gap'] * 1000:.0f} ms, "
        f"{res['retransmits']} retransmits, redirects {info_p['redirects']}, peer now sees M at {info_p['peer_addr']}"
    )
    print("\n" + line)
    (results / "mobility.txt").open("a").write(line + "\n")
    assert rx["done"] and rx["sha256"] == res["sha256"]
    assert m.call("status")["node"] == m.id
    assert ip_of(info_p["peer_addr"]) == lab.sites["mnb"].public4
    assert info_p["redirects"] == 0 and info_p["tunnel"] == tb["tunnel"]
    assert rx["max_gap"] < 1.0


def test_mobility_peer_behind_firewall_needs_redirection(fed, results):
    """M (public) moves behind a NAT while sending to Q behind a home-router NAT: Q's firewall
    drops M's packets from the new address, so roaming cannot work; the agents notice the silent
    path, ask the DCs for a new direction (resume) and the transfer continues on the new path."""
    lab = fed.lab
    lab.add_site("mnc", "eim")
    m = fed.node(lab.add_public_host("mob2"), dc=0)
    q = fed.node(lab.add_site("mq", "eim").host, dc=1)
    ta, tb = open_tunnel(m, q)
    assert ta["kind"] == "nat_initiates"
    res, rx = run_transfer(m, q, ta["tunnel"], tb["tunnel"], [(1.0, lambda: lab.move("mob2", "mnc"))])
    info_m = m.call("info", tunnel=ta["tunnel"])
    line = (
        f"re-direction handover (public → NAT, peer behind NAT+firewall): max gap {rx['max_gap'] * 1000:.0f} ms, "
        f"{res['retransmits']} retransmits, redirects {info_m['redirects']}, new route {info_m['kind']} via {info_m['via']}"
    )
    print("\n" + line)
    (results / "mobility.txt").open("a").write(line + "\n")
    assert rx["done"] and rx["sha256"] == res["sha256"]
    assert info_m["redirects"] >= 1 and info_m["path"] != ta["path"]
    assert info_m["kind"] == "punch"  # both behind EIM NATs now
    assert rx["max_gap"] < 3.0


def test_mobility_both_ends_move(fed, results):
    """Both nodes (behind EIM NATs, punched tunnel) move to other NATs at once: neither can reach
    the other's old address; both recover through the DCs and the transfer completes."""
    lab = fed.lab
    for s in ("bma", "bmb", "bmc", "bmd"):
        lab.add_site(s, "eim")
    x = fed.node(lab.add_host("both1", "bma"), dc=0)
    y = fed.node(lab.add_host("both2", "bmb"), dc=1)
    ta, tb = open_tunnel(x, y)
    assert ta["kind"] == "punch" and ta["via"] != "relay"

    def move_both():
        lab.move("both1", "bmc")
        lab.move("both2", "bmd")

    res, rx = run_transfer(x, y, ta["tunnel"], tb["tunnel"], [(1.0, move_both)])
    info_x, info_y = x.call("info", tunnel=ta["tunnel"]), y.call("info", tunnel=tb["tunnel"])
    line = (
        f"both ends move (NAT → NAT each): max gap {rx['max_gap'] * 1000:.0f} ms, {res['retransmits']} retransmits, "
        f"redirects {info_x['redirects']}/{info_y['redirects']}, route {info_x['kind']} via {info_x['via']}"
    )
    print("\n" + line)
    (results / "mobility.txt").open("a").write(line + "\n")
    assert rx["done"] and rx["sha256"] == res["sha256"]
    assert info_x["redirects"] + info_y["redirects"] >= 1
    assert rx["max_gap"] < 5.0


# ------------------------------------------------------------------------------- keepalives
def idle_then_echo(fed, name: str, keepalive_s: float, nat_timeout: int, idle_s: float) -> dict:
    lab = fed.lab
    site = lab.add_site(name, "eim")
    lab.set_udp_timeout(site, nat_timeout)
    k = fed.node(site.host, dc=0, keepalive_s=keepalive_s)
    p = fed.node(lab.add_public_host(name + "p"), dc=1, keepalive_s=keepalive_s)
    ta, tb = open_tunnel(k, p)
    k.call("exchange", tunnel=ta["tunnel"], count=2)
    time.sleep(idle_s)
    # The public side speaks first after the idle time: only an open NAT mapping lets it in.
    return p.call("echo_once", tunnel=tb["tunnel"], timeout=5.0)


# Idle long enough that the NAT mapping expires without keepalives: the path-MTU confirmation
# that follows the last data (ntm/pmtu.py: after CONFIRM_S, one PROBE_ROUND_S) refreshes it once,
# then NAT_TIMEOUT_S passes; 2 s of headroom.
NAT_TIMEOUT_S = 3
IDLE_S = CONFIRM_S + PROBE_ROUND_S + NAT_TIMEOUT_S + 2.0


def test_keepalive_keeps_idle_tunnel_through_nat(fed, results):
    """NAT UDP timeout 3 s; idle ~8.4 s. With a 1 s keepalive the public peer reaches the NATed
    node at once on the same path; with keepalives at 30 s (control) the mapping is gone and the
    first packet only gets through after a new direction."""
    kept = idle_then_echo(fed, "kal", keepalive_s=1.0, nat_timeout=NAT_TIMEOUT_S, idle_s=IDLE_S)
    control = idle_then_echo(fed, "kac", keepalive_s=30.0, nat_timeout=NAT_TIMEOUT_S, idle_s=IDLE_S)
    line = (
        f"keepalive 1 s, NAT timeout 3 s, idle {IDLE_S:.1f} s: echo {kept['ms']} ms, redirects {kept['redirects']}; "
        f"control (keepalive 30 s): echo {control['ms']} ms, redirects {control['redirects']}"
    )
    print("\n" + line)
    (results / "keepalive.txt").write_text(line + "\n")
    assert kept["echo"] and kept["redirects"] == 0 and kept["ms"] < 100
    assert (not control["echo"]) or control["redirects"] >= 1


# -------------------------------------------------------------------------------- DC failover
def test_dc_failover(fed, results):
    """F's home DC (DC3) is SIGKILLed. F re-registers at another DC from the list it kept, a node
    at DC2 reaches F again through the chain, and F's running tunnel loses nothing meanwhile."""
    lab = fed.lab
    f = fed.node(lab.add_site("fo", "eim").host, dc=2)
    p = fed.node(lab.add_public_host("fop"), dc=1)
    ta, tb = open_tunnel(f, p)
    f.call("transfer", tunnel=ta["tunnel"], chunks=3000, size=1000, rate=1000.0)
    time.sleep(0.5)
    t0 = time.monotonic()
    fed.kill_dc(2)
    attempts, reached = 0, None
    while time.monotonic() - t0 < 15:
        attempts += 1
        try:
            t2 = p.call("connect", peer=f.id, timeout=10)
        except RuntimeError:
            time.sleep(0.1)
            continue
        reached = time.monotonic() - t0
        break
    assert reached is not None, "F not reachable again within 15 s"
    f.next_event("accepted", tunnel=t2["tunnel"])
    p.call("exchange", tunnel=t2["tunnel"], count=1)
    res = f.call("transfer_result", tunnel=ta["tunnel"], timeout=30)
    rx = p.call("received", tunnel=tb["tunnel"])
    st = f.call("status")
    info = f.call("info", tunnel=ta["tunnel"])
    line = (
        f"DC failover: reachable again after {reached:.2f} s ({reached / KEEPALIVE_S:.2f} × keepalive "
        f"{KEEPALIVE_S} s, {attempts} connect attempts); F now at {st['dc']} (failovers {st['failovers']}); "
        f"running transfer: max gap {rx['max_gap'] * 1000:.0f} ms, {res['retransmits']} retransmits"
    )
    print("\n" + line)
    (results / "failover.txt").write_text(line + "\n")
    assert st["failovers"] == 1 and st["dc"] != fed.dc_url(2)
    assert rx["done"] and rx["sha256"] == res["sha256"] and res["retransmits"] == 0
    assert info["redirects"] == 0 and info["path"] == ta["path"]
    assert reached <= 2 * KEEPALIVE_S
