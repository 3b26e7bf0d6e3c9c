"""The systemd units in packaging/systemd/ (`ntm up`, `ntm-dc`, `ntm-rs`, `ntm-cs`): systemd itself
checks them (`systemd-analyze verify`), and a server under a Type=notify unit really tells systemd
it is ready (READY=1 on $NOTIFY_SOCKET) and that it stops (STOPPING=1), then exits 0 on SIGTERM.
The hostile condition: a unit that systemd would half-ignore (a misspelt key is only a warning),
or a service systemd waits on forever because the ready message never comes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from daemon.service import sd_notify

ROOT = Path(__file__).resolve().parent.parent
UNITS = sorted((ROOT / "packaging" / "systemd").glob("*.service"))
INSTALLED_BIN = "/usr/local/bin/"  # where the units expect `pip install .` to put the console scripts


def unit_lines(path: Path) -> dict[str, str]:
    return dict(
        line.split("=", 1) for line in path.read_text().splitlines() if "=" in line and not line.startswith("#")
    )


def test_one_unit_per_role_each_notify_and_a_clean_stop():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert {u.stem for u in UNITS} == {"ntm", "ntm-dc", "ntm-rs", "ntm-cs"}
    for unit in UNITS:
        keys = unit_lines(unit)
        assert keys["Type"] == "notify" and keys["NotifyAccess"] == "main", unit.name
        assert keys["KillSignal"] == "SIGTERM" and keys["Restart"] == "on-failure", unit.name
        program = keys["ExecStart"].split()[0]
        assert program.startswith(INSTALLED_BIN) and program[len(INSTALLED_BIN) :] in scripts, unit.name


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed here")
def test_systemd_analyze_verify_accepts_every_unit_without_a_warning(tmp_path):
    venv_bin = Path(sys.executable).parent  # the console scripts, where this checkout installed them
    for unit in UNITS:  # verify checks that ExecStart's program exists: point it at this venv's
        (tmp_path / unit.name).write_text(unit.read_text().replace(INSTALLED_BIN, f"{venv_bin}/"))
    proc = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *sorted(map(str, tmp_path.glob("*.service")))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0 and proc.stdout + proc.stderr == "", proc.stdout + proc.stderr


def test_sd_notify_reaches_a_path_and_an_abstract_socket(tmp_path, monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sd_notify("READY=1") is False  # not under systemd: nothing to tell
    for where, address in (
        (str(tmp_path / "notify"), str(tmp_path / "notify")),
        (f"@ntm-test-{os.getpid()}", f"\0ntm-test-{os.getpid()}"),
    ):
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(address)
            monkeypatch.setenv("NOTIFY_SOCKET", where)
            assert sd_notify("READY=1")
            assert sock.recv(64) == b"READY=1"
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody"))
    assert sd_notify("READY=1") is False  # nobody listening: a warning, never a crash


def test_a_server_tells_systemd_it_is_ready_then_stopping(tmp_path):
    """ntm-cs (the server that starts without a chain) as systemd runs it: $NOTIFY_SOCKET set."""
    from eth_account import Account

    from ntm import keys

    key = tmp_path / "dc.key.json"
    key.write_text(json.dumps(Account.encrypt(keys.generate().secret, "", kdf="pbkdf2", iterations=1)))
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(60)
        env = {**os.environ, "NOTIFY_SOCKET": str(path)}
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cs",
                "--dc",
                "http://127.0.0.1:9",
                "--key-file",
                str(key),
                "--data-dir",
                str(tmp_path / "cs"),
                "--http-port",
                "0",
            ],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        try:
            assert sock.recv(64) == b"READY=1"
            assert proc.stdout is not None and json.loads(proc.stdout.readline())["event"] == "ready"
            proc.send_signal(signal.SIGTERM)  # systemctl stop
            assert sock.recv(64) == b"STOPPING=1"
            assert proc.wait(30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
            out, err = proc.communicate()
        assert "Traceback" not in out + err
