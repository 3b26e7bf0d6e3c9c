"""The node daemon and the commands that use it, as a user runs them: `ntm up` (datagram mode,
no TUN), ping, send, recv, status, allow, down — real processes against a real federation."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import subprocess
import time

import pytest

from node import state
from ntm import keys
from labkit import nodeproc
from labkit.dcnet import until
from labkit.nodeproc import read_json_line
from ntm.overlay import VIEW_LEN
from tests.test_dc import ntm


@pytest.fixture
def daemons():
    """Started `ntm up` processes, all stopped at the end whatever happens (no leaked daemons)."""
    procs: list[subprocess.Popen] = []
    yield procs
    for p in procs:
        stop(p)


def start_up(procs: list, home, *extra: str) -> subprocess.Popen:
    proc = nodeproc.start_up(home, *extra)
    procs.append(proc)
    ready = read_json_line(proc)
    assert ready["event"] == "up" and ready["tun"] is None, ready
    return proc


def stop(proc: subprocess.Popen) -> str:
    if proc.poll() is None:
        proc.terminate()
    out, _ = proc.communicate(timeout=15)
    return out


def registered(tmp_path, net, name: str, dc: int) -> tuple:
    home = tmp_path / name
    nid = ntm(home, "keygen")["node"]
    ntm(home, "register", *net.dc_args(dc))
    return home, nid


async def test_up_ping_send_recv_status_down(net, tmp_path, daemons):
    a, a_id = registered(tmp_path, net, "a", 0)
    b, b_id = registered(tmp_path, net, "b", 1)
    da = start_up(daemons, a, "--accept-any", "--echo")
    db = start_up(daemons, b)
    sock = a / "ntm.sock"
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600  # only the owner may drive the daemon
    before = ntm(a, "status")["daemon"]
    ping = ntm(b, "ping", a_id, "-c", "3")
    assert ping["received"] == 3 and ping["route"] == "direct"
    ntm(b, "alias", "alice", a_id)
    sent = ntm(b, "send", "alice", "hello over the tunnel", "--relay")
    assert sent["reply"] == "hello over the tunnel" and sent["route"] == "relay"
    assert ntm(a, "recv")["messages"] == [
        {"peer": keys.checksum(keys.parse_node_id(b_id)), "text": "hello over the tunnel"}
    ]
    for _ in range(3):
        status = ntm(a, "status")
    d = status["daemon"]
    # `ntm status` asks the daemon: it never opens a second DC session that would knock it off.
    assert d["sessions"] == before["sessions"] == 1 and d["session_drops"] == 0
    assert status["confirmed"] and status["online"]
    [row] = d["peers"]  # one peer, its current tunnel; the replaced direct one is not listed
    assert row["peer"] == b_id and row["route"] == "relay" and row["ipv4"] == "100.64.0.2"
    assert row["ipv6"].startswith("fd6e:746d:") and row["last_handshake_s"] is not None
    assert row["path_mtu"] == 1500 and row["inner_mtu"] == 1500 - 28 - 33  # probed on loopback (§7 "Path MTU")
    # APP byte + text, and each side's VIEW (its question at attach, its answer to the other's; §10.2)
    assert row["rx_bytes"] == row["tx_bytes"] == 1 + len("hello over the tunnel") + 2 * VIEW_LEN
    assert row["sees_you_as"] == {"ipv6": d["ipv6"], "ipv4": ntm(b, "status")["daemon"]["peers"][0]["ipv4"]}
    # A second daemon for the same home is refused; the first keeps running.
    again = ntm(a, "up", "--no-tun", "--port", "0", check=False)
    assert again.returncode == 1 and "already runs" in again.stderr
    assert ntm(b, "down")["stopping"]
    assert db.wait(15) == 0 and "down" in db.stdout.read()
    assert not (b / "ntm.sock").exists()
    gone = ntm(b, "ping", a_id, check=False)
    assert gone.returncode == 3 and "ntm up" in gone.stderr  # says how to start one
    da.send_signal(signal.SIGINT)  # Ctrl-C: a clean stop, no traceback
    assert da.wait(15) == 0
    assert "Traceback" not in da.stderr.read() and json.loads(da.stdout.readline())["event"] == "down"


async def test_allow_list_refuses_unknown_peers(net, tmp_path, daemons):
    """A node without --accept-any accepts tunnels only from peers on its allow list; a refused
    direction is counted and no tunnel or session exists for it."""
    a, a_id = registered(tmp_path, net, "a", 0)
    b, b_id = registered(tmp_path, net, "b", 1)
    c, c_id = registered(tmp_path, net, "c", 1)
    ntm(a, "allow", b_id)
    start_up(daemons, a), start_up(daemons, b), start_up(daemons, c)
    assert ntm(b, "ping", a_id, "-c", "1")["received"] == 1
    t0 = time.monotonic()
    refused = ntm(c, "ping", a_id, "-c", "1", check=False)
    print(f"refused in {time.monotonic() - t0:.2f} s: {refused.stdout.strip()} {refused.stderr.strip()}")
    assert refused.returncode == 1 and "allow list" in refused.stdout + refused.stderr  # the reason, at once
    d = ntm(a, "status")["daemon"]
    assert d["counters"]["refused_tunnels"] == 1
    assert [r["peer"] for r in d["peers"]] == [b_id]
    # Allowed while running: `ntm allow` tells the daemon to re-read its list.
    ntm(a, "allow", c_id)
    assert ntm(c, "ping", a_id, "-c", "1")["received"] == 1


async def test_up_fails_over_and_the_cli_follows(net, tmp_path, daemons):
    """kill -9 of the node's DC: the daemon re-registers at the other DC, and the node's state
    (what `ntm status` and a later `ntm register` use) names the new DC."""
    a, _ = registered(tmp_path, net, "a", 0)
    start_up(daemons, a)
    await asyncio.sleep(0.5)  # the node learns the DC list once its session is up
    net.dcs[0].kill()
    await until(lambda: state.read_json(a / "state.json").get("dc_url") == net.urls[1], timeout=20)
    status = ntm(a, "status")
    dc2 = keys.checksum(keys.node_id_of(net.dc_keys[1]))
    assert status["home_dc"] == dc2 and status["confirmed"] and status["online"]
    # the node's log says what happened (stderr and $NTM_HOME/ntm.log)
    log = (a / "ntm.log").read_text()
    assert f"failed over from {net.urls[0]} to {net.urls[1]}" in log and "Traceback" not in log
