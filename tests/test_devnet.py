"""`ntm devnet` as a user runs it: start, register through network.json defaults, SIGTERM (every
child gone), restart (same registry, the node still registered), plus its readable errors."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def ntm(home: Path, *args: str) -> dict:
    """The real CLI with --json; asserts success."""
    proc = subprocess.run(
        [sys.executable, "-m", "node.cli", "--home", str(home), "--json", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def start(data: Path, home: Path, *extra: str) -> tuple[subprocess.Popen, dict]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "node.cli",
            "--home",
            str(home),
            "--json",
            "devnet",
            "--data-dir",
            str(data),
            "--free-ports",
            *extra,
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    if not select.select([proc.stdout], [], [], 45)[0]:
        proc.kill()
        raise AssertionError("devnet printed nothing in 45 s")
    line = proc.stdout.readline()
    if not line:
        raise AssertionError(f"devnet exited {proc.wait()}: {proc.stderr.read().decode()}")
    return proc, json.loads(line)


def stop(proc: subprocess.Popen, ready: dict) -> str:
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err.decode()
    assert json.loads(out.decode().strip().splitlines()[-1]) == {"event": "stopped"}
    deadline = time.monotonic() + 5
    alive = []
    while time.monotonic() < deadline:
        alive = [name for name, pid in ready["pids"].items() if _alive(pid)]
        if not alive:
            break
        time.sleep(0.05)
    assert not alive, f"children still running after SIGTERM: {alive}"
    return out.decode()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ")[-1][:1] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def test_devnet_register_stop_resume(tmp_path):
    data, home, node = tmp_path / "devnet", tmp_path / "home", tmp_path / "node"
    proc, ready = start(data, home)
    try:
        assert ready["event"] == "ready" and ready["chain_id"] == 31337 and not ready["resumed"]
        assert set(ready["pids"]) == {"anvil", "dc1", "dc2", "rs", "dc1-cs", "dc2-cs"}
        ports = json.loads((data / "devnet.json").read_text())["ports"]  # a Cache Server beside each DC
        assert [d["cs"] for d in ready["dcs"]] == [f"http://127.0.0.1:{ports[f'dc{i}_cs']}" for i in (1, 2)]
        net = json.loads((home / "network.json").read_text())
        assert net["dcs"] == [d["url"] for d in ready["dcs"]] and net["registry"] == ready["registry"]
        # a node whose home has only the network.json (copied) registers without --dc
        node.mkdir()
        (node / "network.json").write_text((home / "network.json").read_text())
        nid = ntm(node, "keygen")["node"]
        reg = ntm(node, "register")
        assert reg["status"] == "confirmed" and reg["dc_url"] == net["dcs"][0]
    finally:
        if proc.poll() is None:
            stop(proc, ready)
    assert (data / "chain.json").exists() and (data / "devnet.lock").exists()

    proc2, ready2 = start(data, home)
    try:
        assert ready2["resumed"] and ready2["registry_action"] == "reused"
        assert ready2["registry"] == ready["registry"]
        assert [d["address"] for d in ready2["dcs"]] == [d["address"] for d in ready["dcs"]]
        seen = ntm(node, "whois", nid, "--dc", ready2["dcs"][1]["url"])  # through the other DC
        assert seen["confirmed"] and not seen["revoked"] and seen["home_dc"] == ready["dcs"][0]["address"]
        assert ntm(node, "status")["confirmed"]
    finally:
        stop(proc2, ready2)


def test_sigkill_of_the_devnet_takes_its_children_and_its_lock(tmp_path):
    data = tmp_path / "devnet"
    proc, ready = start(data, tmp_path / "home")
    proc.kill()  # SIGKILL: no handler runs; the kernel tells each child (PR_SET_PDEATHSIG) and drops the lock
    proc.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(pid) for pid in ready["pids"].values()):
        time.sleep(0.1)
    assert not [name for name, pid in ready["pids"].items() if _alive(pid)], "children outlived a SIGKILLed devnet"
    again, ready2 = start(data, tmp_path / "home")  # the same data dir starts afresh, not beside a ghost
    try:
        assert (
            ready2["event"] == "ready"
            and ready2["resumed"]
            and set(ready2["pids"].values()).isdisjoint(ready["pids"].values())
        )
    finally:
        stop(again, ready2)


def test_devnet_errors(tmp_path):
    # a second devnet on the same data dir is refused while the first runs
    data = tmp_path / "devnet"
    proc, ready = start(data, tmp_path / "home")
    try:
        again = subprocess.run(
            [
                sys.executable,
                "-m",
                "scripts.devnet",
                "--home",
                str(tmp_path / "h2"),
                "--data-dir",
                str(data),
                "--free-ports",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert again.returncode == 1 and "already runs" in again.stderr and "Traceback" not in again.stderr
    finally:
        stop(proc, ready)
    # a port in use is named
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        offset = taken - 8545
        busy = subprocess.run(
            [
                sys.executable,
                "-m",
                "scripts.devnet",
                "--home",
                str(tmp_path / "h3"),
                "--data-dir",
                str(tmp_path / "d3"),
                "--port-offset",
                str(offset),
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert busy.returncode == 1 and f"chain JSON-RPC {taken}" in busy.stderr and "in use" in busy.stderr
    # ports beyond 65535, a data dir that cannot be one: one line each
    far = subprocess.run(
        [sys.executable, "-m", "scripts.devnet", "--data-dir", str(tmp_path / "d5"), "--port-offset", "70000"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert far.returncode == 1 and "outside 1..65535" in far.stderr and "Traceback" not in far.stderr
    (tmp_path / "afile").write_text("x")
    nodir = subprocess.run(
        [sys.executable, "-m", "scripts.devnet", "--data-dir", str(tmp_path / "afile" / "d")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert nodir.returncode == 1 and "Not a directory" in nodir.stderr and "Traceback" not in nodir.stderr
    # --reset refuses a directory that is not a devnet's
    other = tmp_path / "precious"
    other.mkdir()
    (other / "thesis.tex").write_text("x")
    wipe = subprocess.run(
        [sys.executable, "-m", "scripts.devnet", "--data-dir", str(other), "--reset"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert wipe.returncode == 1 and "refusing to wipe" in wipe.stderr and (other / "thesis.tex").exists()
    # --chain without a deployer key
    nokey = subprocess.run(
        [sys.executable, "-m", "scripts.devnet", "--data-dir", str(tmp_path / "d4"), "--chain", "http://127.0.0.1:1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        env={k: v for k, v in os.environ.items() if k != "NTM_DEPLOYER_KEY"},
    )
    assert nokey.returncode == 1 and "deployer key" in nokey.stderr


def test_deploy_only_on_existing_chain(anvil, tmp_path):
    """The docker-compose deploy job: --chain + --deploy-only + --dc-endpoint, idempotent."""
    args = [
        sys.executable,
        "-m",
        "scripts.devnet",
        "--json",
        "--data-dir",
        str(tmp_path),
        "--chain",
        anvil.url,
        "--deploy-only",
        "--dc-endpoint",
        "http://dc1:8330",
        "--dc-endpoint",
        "http://dc2:8330",
    ]
    env = {**os.environ, "NTM_DEPLOYER_KEY": anvil.keys[0].hex()}
    first = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)
    assert first.returncode == 0, first.stderr
    dep = json.loads(first.stdout)
    assert dep["event"] == "deployed" and dep["action"] == "deployed"
    assert [d["endpoint"] for d in dep["dcs"]][-2:] == ["http://dc1:8330", "http://dc2:8330"]
    assert (tmp_path / "dc1.key.json").exists() and (tmp_path / "deployment.json").exists()
    second = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout)["registry"] == dep["registry"] and json.loads(second.stdout)["action"] == "reused"
