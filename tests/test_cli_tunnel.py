"""The `ntm` tunnel commands as a user runs them: listen, ping, send, status — real processes."""

from __future__ import annotations

import asyncio
import json
import select
import subprocess
import sys

from node import state
from ntm import keys
from tests.dcnet import until
from tests.test_dc import ntm


def read_json_line(proc: subprocess.Popen, timeout: float = 20.0) -> dict:
    """First line only: later lines may sit in the text wrapper's buffer where select cannot see them."""
    if not select.select([proc.stdout], [], [], timeout)[0]:
        raise AssertionError("no output from ntm listen")
    return json.loads(proc.stdout.readline())


async def test_listen_ping_send_status(net, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a_id = ntm(a, "keygen")["node"]
    ntm(b, "keygen")
    ntm(a, "register", "--dc", net.urls[0])
    ntm(b, "register", "--dc", net.urls[1])
    listener = subprocess.Popen(
        [sys.executable, "-m", "node.cli", "--home", str(a), "--json", "listen", "--echo", "--host", "127.0.0.1", "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    try:
        assert read_json_line(listener)["event"] == "listening"
        ping = ntm(b, "ping", a_id, "-c", "3", "--host", "127.0.0.1")
        assert ping["received"] == 3 and ping["route"] == "direct"
        sent = ntm(b, "send", a_id, "hello over the tunnel", "--relay", "--host", "127.0.0.1")
        assert sent["reply"] == "hello over the tunnel" and sent["route"] == "relay"
        status = ntm(a, "status")
        assert status["confirmed"] and len(status["agent"]["tunnels"]) == 2
        assert {t["route"] for t in status["agent"]["tunnels"]} == {"direct", "relay"}
        assert {t["state"] for t in status["agent"]["tunnels"]} == {"closed"}  # both commands exited
        relayed = [t for t in status["agent"]["tunnels"] if t["route"] == "relay"][0]
        assert relayed["rx_bytes"] == relayed["tx_bytes"] == len("hello over the tunnel")
    finally:
        listener.terminate()
        rest, _ = listener.communicate(timeout=10)
    events = [json.loads(line) for line in rest.splitlines()]
    # Each short-lived command closes its tunnel on exit (CLOSE), so the listener ends it
    # instead of trying to repair it.
    assert [e["event"] for e in events] == ["tunnel", "closed", "tunnel", "message", "closed", "stopped"]
    assert events[3]["data"] == "hello over the tunnel"
    assert listener.returncode == 0 and not (a / "agent.json").exists()


async def test_listen_fails_over_and_the_cli_follows(net, tmp_path):
    """kill -9 of the node's DC: `ntm listen` re-registers at the other DC, and the node's state
    (what `ntm status` and a later `ntm register` use) names the new DC."""
    a = tmp_path / "a"
    ntm(a, "keygen")
    ntm(a, "register", "--dc", net.urls[0])
    listener = subprocess.Popen(
        [sys.executable, "-m", "node.cli", "--home", str(a), "--json", "listen", "--host", "127.0.0.1", "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    try:
        assert read_json_line(listener)["event"] == "listening"
        await asyncio.sleep(0.5)  # the agent learns the DC list once its session is up
        net.dcs[0].kill()
        await until(lambda: state.read_json(a / "state.json").get("dc_url") == net.urls[1], timeout=20)
        status = ntm(a, "status")
        dc2 = keys.checksum(keys.node_id_of(net.dc_keys[1]))
        assert status["home_dc"] == dc2 and status["confirmed"] and status["online"]
    finally:
        listener.terminate()
        listener.communicate(timeout=10)
