"""`ntm` never shows a traceback: every subcommand × {bad input, Ctrl-C, silent DC, no key, wrong
passphrase} ends in one line on stderr (or one JSON object with --json) and the exit code that
node/output.py and the README document. No network outside loopback: the "DC" is a socket that
accepts connections and never answers, the "daemon" a Unix socket that does the same."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import pytest

from daemon import keystore
from node import commands, state
from ntm import keys

USAGE, FAILED, NO_DAEMON, UNREACHABLE, INTERRUPTED = 2, 1, 3, 4, 130
PEER = "0x1a642f0E3c3aF545E7AcBD38b07251B3990914F1"
BAD_CHECKSUM = "0x1A642f0E3c3aF545E7AcBD38b07251B3990914F1"  # one letter's case changed


@pytest.fixture(scope="module")
def silent_dc():
    """Accepts TCP connections (the kernel's backlog) and never answers, not even the TLS
    handshake: a hung DC."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(128)
    yield f"https://127.0.0.1:{s.getsockname()[1]}"
    s.close()


@pytest.fixture(scope="module")
def homes(tmp_path_factory, silent_dc):
    """`ok`: a key (passphrase "pw") registered at the silent DC; `nokey`: nothing; `silentd`: like
    ok, with a daemon socket that never answers."""
    root = tmp_path_factory.mktemp("cli")
    key = keys.generate()
    made = {}
    for name in ("ok", "silentd"):
        home = root / name
        keystore.save_keystore(key, home / state.KEY_FILE, "pw")
        commands.write_id(home, key)  # as `ntm keygen` leaves it: `ntm id` answers without the passphrase
        state.write_json(
            home / state.STATE_FILE,
            {"dc_url": silent_dc, "dc": PEER, "hostname": "dc1", "chain_id": 31337, "registry": PEER, "timestamp": 1},
        )
        made[name] = home
    made["nokey"] = root / "nokey"
    made["nokey"].mkdir()
    daemon_sock = socket.socket(socket.AF_UNIX)
    daemon_sock.bind(str(made["silentd"] / "ntm.sock"))
    daemon_sock.listen(16)
    made["silentd_listener"] = daemon_sock  # for a test to see when a command has reached the daemon
    yield made
    daemon_sock.close()


def ntm(
    home: Path,
    *args: str,
    passphrase: str | None = "pw",
    interrupt_after: float | None = None,
    as_json: bool = False,
    interrupt_once: Callable[[], bool] | None = None,
) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "NTM_PASSPHRASE"}
    if passphrase is not None:
        env["NTM_PASSPHRASE"] = passphrase
    argv = [sys.executable, "-m", "node.cli", "--home", str(home), *args, *(["--json"] if as_json else [])]
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, env=env
    )
    if interrupt_after is not None:
        time.sleep(interrupt_after)
        proc.send_signal(signal.SIGINT)  # Ctrl-C
    if interrupt_once is not None:  # ... once the command got that far (a loaded machine imports slowly)
        deadline = time.monotonic() + 60
        while not interrupt_once() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def one_line(proc: subprocess.CompletedProcess, code: int, *needles: str) -> None:
    what = f"{' '.join(proc.args[4:])}: exit {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    assert "Traceback" not in proc.stdout + proc.stderr, what
    assert proc.returncode == code, what
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ntm: "), what
    for n in needles:
        assert n in lines[0], what


BAD_INPUT = [  # (args, what the one line says)
    (("keygen", "--bogus"), "unrecognized"),
    (("id", "extra"), "unrecognized"),
    (("register", "--dc", "http://"), "not a DC address"),
    (("revoke",), "--yes"),
    (("status", "--wat"), "unrecognized"),
    (("up", "--path-mtu", "100"), "MTU"),
    (("up", "--keepalive", "-1"), "--keepalive"),
    (("up", "--dns", "nope"), "IP:PORT"),
    (("down", "now"), "unrecognized"),
    (("ping", PEER, "-c", "0"), "--count"),
    (("ping", PEER, "-c", "-1"), "--count"),
    (("ping", PEER, "-i", "-1"), "--interval"),
    (("ping", BAD_CHECKSUM), "checksum"),
    (("send", PEER, "hi", "--wait-reply", "-1"), "--wait-reply"),
    (("send", PEER), "nothing to send"),
    (("send", PEER, "--offline", "--file", "/nonexistent"), "not a readable file"),
    (("inbox", "x"), "invalid choice"),
    (("fetch", "--out"), "expected one argument"),
    (("recv", "--wait", "-1"), "--wait"),
    (("alias", "bob", "0xnothex"), "not hex"),
    (("allow", BAD_CHECKSUM), "checksum"),
    (("whois", BAD_CHECKSUM), "checksum"),
    (("whois", "0x1234"), "bytes"),
    (("group",), "required"),
    (("group", "send", "team", "x" * 1100), "1024"),
    (("group", "recv", "--wait", "-1"), "--wait"),
    (("group", "invite", "team", BAD_CHECKSUM), "checksum"),
    (("completion", "fish"), "invalid choice"),
    (("--timeout", "0", "status"), "seconds"),
    (("nosuchcommand",), "invalid choice"),
]


def test_bad_input_is_one_line_with_exit_2_before_any_network_work(homes):
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda case: (case, ntm(homes["ok"], *case[0])), BAD_INPUT))
    for (args, needle), proc in results:
        one_line(proc, USAGE, needle)


def test_errors_are_json_with_json_anywhere(homes):
    for args in (
        ("--json", "ping", PEER, "-c", "0"),
        ("ping", "--json", PEER, "-c", "0"),
        ("ping", PEER, "-c", "0", "--json"),
    ):
        proc = ntm(homes["ok"], *args)
        assert proc.returncode == USAGE and proc.stdout == ""
        err = json.loads(proc.stderr)
        assert err["error"] == "usage" and err["exit"] == USAGE and "--count" in err["message"]


DC_COMMANDS = [
    ("register",),
    ("revoke", "--yes"),
    ("whois", PEER),
    ("inbox",),
    ("fetch",),
    ("send", PEER, "hi", "--offline"),
]


def test_a_silent_dc_gives_a_real_reason_and_exit_4(homes):
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda args: ntm(homes["ok"], "--timeout", "1", *args), DC_COMMANDS))
    for proc in results:
        one_line(proc, UNREACHABLE, "did not answer within 1 s")
    up = ntm(homes["ok"], "--timeout", "1", "up", "--no-tun", "--port", "0")
    one_line(up, UNREACHABLE, "did not open a session in time")
    status = ntm(homes["ok"], "--timeout", "1", "--json", "status")  # reports, does not fail
    assert status.returncode == 0 and "did not answer within 1 s" in json.loads(status.stdout)["dc_error"]


KEY_COMMANDS = [
    ("register",),
    ("revoke", "--yes"),
    ("status",),
    ("up", "--no-tun"),
    ("inbox",),
    ("fetch",),
    ("send", PEER, "hi", "--offline"),
    ("id",),
]


@pytest.mark.parametrize("which", ["nokey", "wrong_passphrase"])
def test_no_key_and_a_wrong_passphrase(homes, which):
    home, pw = (homes["nokey"], "pw") if which == "nokey" else (homes["ok"], "wrong")
    needle = "no key file" if which == "nokey" else "wrong passphrase"
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda args: ntm(home, *args, passphrase=pw), KEY_COMMANDS))
    for args, proc in zip(KEY_COMMANDS, results):
        if args == ("id",) and which == "wrong_passphrase":
            assert proc.returncode == 0  # the ID is public: id.json answers without the passphrase
            continue
        one_line(proc, USAGE, needle)


def test_a_bad_dc_is_told_before_the_key_is_opened(homes):
    """A user typing a plain-http DC (an on-path attacker could rewrite it) learns that first: the
    key is not opened, so the wrong passphrase is not what the one line says (no prompt either)."""
    for cmd in (("register",), ("revoke", "--yes")):
        one_line(ntm(homes["ok"], *cmd, "--dc", "http://127.0.0.1:1", passphrase="wrong"), USAGE, "plain HTTP")


def test_a_bad_up_flag_is_told_before_the_key_is_opened(homes):
    """`ntm up` with a typo in a flag says so, not "wrong passphrase" (no prompt: the key is not
    opened)."""
    cases = [(args, needle) for args, needle in BAD_INPUT if args[0] == "up"]
    assert len(cases) == 3
    for args, needle in cases:
        one_line(ntm(homes["ok"], *args, passphrase="wrong"), USAGE, needle)


DAEMON_COMMANDS = [
    ("ping", PEER),
    ("send", PEER, "hi"),
    ("recv", "--wait", "30"),
    ("down",),
    ("netcheck",),
    ("group", "members"),
    ("group", "send", "team", "hi"),
    ("group", "recv", "--wait", "30"),
]


def test_without_a_daemon_exit_3_and_say_how_to_start_one(homes):
    for args in DAEMON_COMMANDS:
        one_line(ntm(homes["ok"], *args), NO_DAEMON, "ntm up")


def test_ctrl_c_anywhere_is_one_line_and_exit_130(homes):
    cases = [
        (homes["ok"], ("--timeout", "30", *args))
        for args in DC_COMMANDS + [("status",), ("up", "--no-tun", "--port", "0")]
    ]
    cases += [(homes["silentd"], args) for args in DAEMON_COMMANDS]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda c: (c, ntm(c[0], *c[1], interrupt_after=2.0)), cases))
    for (home, args), proc in results:
        one_line(proc, INTERRUPTED, "interrupted")


def test_ping_prints_its_summary_on_ctrl_c(homes):
    """Ctrl-C while the ping waits for the daemon's answer (the daemon here never answers)."""
    listener = homes["silentd_listener"]
    listener.setblocking(False)
    held: list[socket.socket] = []

    def connected() -> bool:  # the ping's request reached the daemon, which holds it unanswered
        try:
            held.append(listener.accept()[0])
            return True
        except BlockingIOError:
            return False

    while connected():  # connections other tests left in the backlog
        pass
    for conn in held:
        conn.close()
    held.clear()
    proc = ntm(homes["silentd"], "ping", PEER, "-c", "100", interrupt_once=connected)
    for conn in held:
        conn.close()
    one_line(proc, INTERRUPTED, "interrupted")
    assert "0/0 replies" in proc.stdout


def test_bad_local_state_is_one_line(homes, tmp_path):
    a_file = tmp_path / "afile"
    a_file.write_text("x")
    one_line(ntm(a_file, "keygen"), USAGE)
    (tmp_path / "badstate").mkdir()
    keystore.save_keystore(keys.generate(), tmp_path / "badstate" / state.KEY_FILE, "pw")
    (tmp_path / "badstate" / state.STATE_FILE).write_text("[1, 2]")
    one_line(ntm(tmp_path / "badstate", "status"), USAGE, "not a JSON object")  # a local file: the README says 2
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        one_line(ntm(ro, "keygen"), USAGE, "ermission")


def test_help_version_and_completion(homes):
    for args in (("--help",), ("group", "--help"), ("--version",)):
        proc = ntm(homes["ok"], *args)
        assert proc.returncode == 0 and proc.stderr == "" and "ntm" in proc.stdout
    proc = ntm(homes["ok"], "completion", "bash")
    assert proc.returncode == 0 and "complete" in proc.stdout and "group" in proc.stdout


def test_the_passphrase_is_asked_on_a_terminal_and_read_from_a_file(tmp_path):
    import fcntl
    import pty
    import select
    import termios

    master, slave = pty.openpty()

    def controlling_tty() -> None:
        os.setsid()
        fcntl.ioctl(slave, termios.TIOCSCTTY, 0)

    env = {k: v for k, v in os.environ.items() if k != "NTM_PASSPHRASE"}
    home = tmp_path / "tty"
    proc = subprocess.Popen(
        [sys.executable, "-m", "node.cli", "--home", str(home), "keygen"],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=env,
        preexec_fn=controlling_tty,
        close_fds=True,
        pass_fds=(slave,),
    )
    os.close(slave)
    seen = b""
    for prompt in (b"passphrase for the node key: ", b"again: "):
        deadline = time.monotonic() + 20
        while prompt not in seen and time.monotonic() < deadline:
            if select.select([master], [], [], 0.5)[0]:
                seen += os.read(master, 1024)
        assert prompt in seen, seen
        os.write(master, b"s3cret\n")
    assert proc.wait(30) == 0
    os.close(master)
    (tmp_path / "pw").write_text("s3cret\n")
    assert ntm(home, "--password-file", str(tmp_path / "pw"), "status", passphrase=None).returncode == 0
    assert ntm(home, "status", passphrase="s3cret").returncode == 0
    one_line(ntm(home, "status", passphrase="wrong"), USAGE, "wrong passphrase")


def started_importing(pid: int) -> bool:
    """The process has begun loading packages (any site-packages file mapped): past the
    interpreter's own start, so past daemon.startup's guard, which comes first."""
    try:
        return "site-packages/" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def test_ctrl_c_while_a_server_starts_is_one_line_and_exit_130(tmp_path, silent_dc):
    """Ctrl-C at any moment of a server's start-up (its imports, its key, a chain that does not
    answer): one line, exit 130, never a traceback; once it printed its ready line, a clean stop."""
    key = tmp_path / "dc.key.json"
    keystore.save_keystore(keys.generate(), key, "")
    deployment = tmp_path / "deployment.json"
    deployment.write_text(json.dumps({"chain_id": 31337, "registry": PEER, "block": 0}))
    chain = silent_dc  # a chain that accepts connections and never answers
    servers = {
        "ntm-dc": [
            "-m",
            "dc",
            "--key-file",
            str(key),
            "--rpc-url",
            chain,
            "--deployment",
            str(deployment),
            "--db",
            str(tmp_path / "dc.sqlite"),
            "--http-port",
            "0",
            "--udp-port",
            "0",
        ],
        "ntm-rs": [
            "-m",
            "rs",
            "--rpc-url",
            chain,
            "--deployment",
            str(deployment),
            "--udp-port",
            "0",
            "--http-port",
            "0",
            "--stream-port",
            "off",
            "--data-dir",
            str(tmp_path / "rs"),
        ],
        "ntm-cs": [
            "-m",
            "cs",
            "--dc",
            silent_dc,
            "--key-file",
            str(key),
            "--data-dir",
            str(tmp_path / "cs"),
            "--http-port",
            "0",
        ],
        "ntm-deploy": ["-m", "scripts.deploy", "--rpc", chain, "--key", "11" * 32, "--out", str(tmp_path / "d.json")],
    }

    def interrupt(case: tuple[str, float]) -> tuple[str, float, subprocess.CompletedProcess]:
        name, delay = case
        env = {k: v for k, v in os.environ.items() if not k.startswith("NTM_")}
        proc = subprocess.Popen(
            [sys.executable, *servers[name]],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        deadline = time.monotonic() + 30
        while not started_importing(proc.pid) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        return name, delay, subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    cases = [(name, delay) for name in servers for delay in (0.0, 2.5)]  # in the imports; past them
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(interrupt, cases))
    for name, delay, proc in results:
        what = f"{name} after {delay} s: exit {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
        assert "Traceback" not in proc.stdout + proc.stderr, what
        if '"ready"' in proc.stdout:  # started before the signal: an ordinary stop
            assert proc.returncode == 0, what
            continue
        assert proc.returncode == INTERRUPTED, what
        assert proc.stderr.strip().splitlines()[-1] in (f"{name}: interrupted", "ntm-deploy: interrupted"), what
