"""Bad input for every command line we ship (`ntm` and each of its subcommands, `ntm-dc`,
`ntm-rs`, `ntm-cs`, `ntm-deploy`, `ntm devnet`) ends in one line on stderr and the exit code of
the README's table, never a traceback. The adversary is a user (or a script) typing anything:
garbage in every typed flag, out-of-range numbers, URLs that are not URLs, missing files, and
local files damaged by hand or by a disk (id.json, state.json, network.json).

The table runs in-process (main(argv), SystemExit caught): seconds for the whole sweep. The cases
come from the parsers themselves, so a new subcommand or flag is covered without an edit here.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Callable

import pytest

import cs.__main__ as cs_main
import dc.__main__ as dc_main
import rs.__main__ as rs_main
import scripts.deploy as deploy_main
import scripts.devnet as devnet_main
from daemon import startup
from dc import config as dc_config
from node import cli, state
from ntm import keys

OK, FAILED, USAGE = 0, 1, 2
PEER = "0x1a642f0E3c3aF545E7AcBD38b07251B3990914F1"


def run_main(main: Callable[[list[str]], int], argv: list[str], capsys) -> tuple[int, str, str]:
    """main(argv) in this process: (exit code, stdout, stderr)."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line(result: tuple[int, str, str], code: int, *needles: str, what: str = "") -> None:
    got, out, err = result
    report = f"{what}: exit {got}\nstdout: {out}\nstderr: {err}"
    assert "Traceback" not in out + err, report
    assert got == code, report
    lines = err.strip().splitlines()
    assert len(lines) == 1, report
    for n in needles:
        assert n in lines[0], report


def leaf_parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(words, parser) for every subcommand, however deep (`group send`, ...)."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
        return
    for name, sub in subs[0].choices.items():
        yield from leaf_parsers(sub, (*path, name))


def typed_options(parser: argparse.ArgumentParser):
    """Flags whose values are checked (int, float, or a daemon.startup check): garbage must be refused."""
    for action in parser._actions:
        checked = action.type in (int, float) or getattr(action.type, "__module__", "") == startup.__name__
        if action.option_strings and checked and action.nargs is None:
            yield action.option_strings[-1]


SERVERS = {  # program → (main, parser)
    "ntm-dc": (dc_main.main, dc_config.parser()),
    "ntm-rs": (rs_main.main, rs_main.parser()),
    "ntm-cs": (cs_main.main, cs_main.parser()),
    "ntm-deploy": (deploy_main.main, deploy_main.parser()),
    "ntm devnet": (lambda argv: devnet_main.main(argv, prog="ntm devnet"), devnet_main.parser("ntm devnet")),
}

GARBAGE = "/nonexistent/garbage!"  # not a number, URL, file, nor a path in a directory


def required(prog: str, tmp: Path) -> list[str]:
    """Valid values for a program's required flags (files are checked after parsing, so a bad file
    is seen only once the rest parses). A chain or DC that is not there: nothing starts."""
    some_file = tmp / "some.json"
    some_file.write_text("{}")
    return {
        "ntm-rs": ["--rpc-url", "http://127.0.0.1:9", "--deployment", str(some_file)],
        "ntm-cs": ["--dc", "http://127.0.0.1:9", "--key-file", str(some_file)],
        "ntm-deploy": ["--rpc", "http://127.0.0.1:9", "--key", "00"],
    }.get(prog, [])


@pytest.mark.parametrize("prog", sorted(SERVERS))
def test_every_typed_server_flag_refuses_garbage_in_one_line(prog, capsys, tmp_path):
    main, parser = SERVERS[prog]
    flags = list(typed_options(parser))
    assert flags, f"{prog} has no checked flags"
    for flag in flags:
        argv = [*required(prog, tmp_path), flag, GARBAGE]
        assert_one_line(run_main(main, argv, capsys), USAGE, flag, prog, what=f"{prog} {flag}")
    assert_one_line(run_main(main, ["--no-such-flag"], capsys), USAGE, what=prog)  # or the required flags named


SERVER_BAD_VALUES = [  # the sweep of issue 27: bad values the servers used to accept or crash on
    ("ntm-dc", ["--relay", "notaurl"], "--relay"),
    ("ntm-dc", ["--cs", "ftp://x"], "--cs"),
    ("ntm-dc", ["--http-port", "70000"], "--http-port"),
    ("ntm-dc", ["--confirmations", "0"], "--confirmations"),
    ("ntm-dc", ["--key-file", "/nonexistent/key.json"], "--key-file"),
    ("ntm-dc", ["--db", "/nonexistent/dir/dc.sqlite"], "/nonexistent/dir is not a directory"),
    ("ntm-dc", ["--new-nodes-per-hour", "-3"], "--new-nodes-per-hour"),
    ("ntm-rs", ["--max-paths", "-5"], "--max-paths"),
    ("ntm-rs", ["--udp-port", "-1"], "--udp-port"),
    ("ntm-rs", ["--rpc-url", "not a url"], "--rpc-url"),
    ("ntm-rs", ["--rpc-url", "http://127.0.0.1:9", "--deployment", "/nonexistent.json"], "--deployment"),
    ("ntm-rs", ["--advertise", "nohost"], "--advertise"),
    ("ntm-cs", ["--max-item-mb", "-1"], "--max-item-mb"),
    ("ntm-cs", ["--sender-items", "0"], "--sender-items"),
    ("ntm-cs", ["--ttl-hours", "nan"], "--ttl-hours"),
    ("ntm-cs", ["--dc", "127.0.0.1:8330"], "--dc"),
    ("ntm-deploy", ["--rpc", "localhost:8545", "--key", "00"], "--rpc"),
    ("ntm-deploy", ["--rpc", "http://127.0.0.1:1", "--key", "00", "--fund", "-1"], "--fund"),
    ("ntm-deploy", ["--rpc", "http://127.0.0.1:1", "--key", "0x00"], "--key is 1 bytes"),
    ("ntm-deploy", ["--rpc", "http://127.0.0.1:1", "--key", "00" * 32, "--dc", f"{PEER},dc1,not a url"], "endpoint"),
    ("ntm devnet", ["--dc-endpoint", "not a url"], "--dc-endpoint"),
    ("ntm devnet", ["--chain", "nowhere"], "--chain"),
]


def test_server_bad_values_are_refused_at_start(capsys):
    for prog, argv, needle in SERVER_BAD_VALUES:
        assert_one_line(run_main(SERVERS[prog][0], argv, capsys), USAGE, needle, what=f"{prog} {argv}")


def test_a_dc_config_file_is_checked_like_the_flags(tmp_path, capsys):
    key = tmp_path / "key.json"
    key.write_text("{}")
    for body, needle in (
        ('relays = ["notaurl"]', "notaurl"),
        ('cs = "nope"', "nope"),
        ('http_port = "abc"', "http_port"),
        ("not toml [", "config file"),
    ):
        conf = tmp_path / "dc.toml"
        conf.write_text(f'key_file = "{key}"\nrpc_url = "http://127.0.0.1:1"\ndeployment = "{key}"\n{body}\n')
        assert_one_line(run_main(dc_main.main, ["--config", str(conf)], capsys), USAGE, needle, what=body)


# ------------------------------------------------------------------------------------------ ntm


@pytest.fixture(scope="module")
def key_file(tmp_path_factory) -> Path:
    """One node keystore (passphrase "pw"), copied into each home. A cheap key derivation (the
    format allows it): these tests open the key dozens of times, scrypt would take minutes."""
    from eth_account import Account

    path = tmp_path_factory.mktemp("key") / state.KEY_FILE
    path.write_text(json.dumps(Account.encrypt(keys.generate().secret, "pw", kdf="pbkdf2", iterations=1)))
    return path


@pytest.fixture
def home(tmp_path, key_file, monkeypatch) -> Path:
    monkeypatch.setenv(state.PASSPHRASE_ENV, "pw")
    base = tmp_path / "home"
    base.mkdir()
    shutil.copy(key_file, base / state.KEY_FILE)
    return base


def ntm(home: Path, capsys, *argv: str) -> tuple[int, str, str]:
    return run_main(cli.main, ["--home", str(home), *argv], capsys)


def test_every_ntm_subcommand_refuses_an_unknown_flag_and_answers_help(home, capsys):
    leaves = list(leaf_parsers(cli.parser()))
    assert len(leaves) > 20
    for words, _ in leaves:
        if words == ("devnet",):  # a separate program (exec'd): its own test above
            continue
        assert_one_line(ntm(home, capsys, *words, "--no-such-flag"), USAGE, what=" ".join(words))
        code, out, err = ntm(home, capsys, *words, "--help")
        assert code == OK and err == "" and "usage:" in out, words


def test_every_typed_ntm_flag_refuses_garbage(home, capsys):
    for words, parser in leaf_parsers(cli.parser()):
        for flag in typed_options(parser):
            if words == ("devnet",):
                continue
            positional = [
                PEER if a.dest == "node" else "x" for a in parser._actions if not a.option_strings and a.nargs is None
            ]
            assert_one_line(
                ntm(home, capsys, *words, *positional, flag, GARBAGE), USAGE, flag, what=f"{' '.join(words)} {flag}"
            )


def test_options_go_anywhere_on_the_line(home, capsys):
    """The README's `ntm send bob --offline "see you tomorrow"`: the options before the text."""
    for argv in (
        ("send", PEER, "--offline", "see you tomorrow"),
        ("send", "--offline", PEER, "see you tomorrow"),
        ("send", PEER, "see you tomorrow", "--offline"),
    ):
        assert_one_line(ntm(home, capsys, *argv), USAGE, "not registered", what=" ".join(argv))
    assert_one_line(ntm(home, capsys, "send", PEER, "--relay", "hi"), 3, "ntm up")  # parsed: no daemon


def test_send_of_100_kb_is_a_usage_error_not_an_internal_one(home, capsys):
    assert_one_line(ntm(home, capsys, "send", PEER, "x" * 100_000), USAGE, "100000 bytes", "--offline --file")


def test_a_garbage_id_json_is_a_cache_and_is_rebuilt(home, capsys):
    for garbage in ("{not json", "[1, 2]", '{"node": 5}', ""):
        (home / state.ID_FILE).write_text(garbage)
        code, out, err = ntm(home, capsys, "--json", "id")
        assert code == OK and err == "", (garbage, err)
        assert json.loads((home / state.ID_FILE).read_text()) == json.loads(out)
        (home / state.ID_FILE).write_text(garbage)
        code, out, err = ntm(home, capsys, "status")
        assert code == OK and "not registered" in out, (garbage, err)
        (home / state.ID_FILE).write_text(garbage)
        assert_one_line(ntm(home, capsys, "register"), USAGE, "no DC given")  # id.json did not block it


@pytest.mark.parametrize(
    "content, needle",
    [
        ('{"dc_url": 5}', "wrong type: dc_url"),
        (
            '{"dc_url": "http://127.0.0.1:1", "dc": "x", "hostname": "dc1", "chain_id": "31337", "registry": "x"}',
            "wrong type: chain_id",
        ),
        ('{"dc_url": "http://127.0.0.1:1"}', "missing: dc, hostname"),
        ("[1, 2]", "not a JSON object"),
        ("{", "not valid JSON"),
    ],
)
def test_a_damaged_state_json_is_refused_naming_the_file(home, capsys, content, needle):
    (home / state.STATE_FILE).write_text(content)
    for argv in (
        ("status",),
        ("register",),
        ("up", "--no-tun"),
        ("whois", PEER),
        ("inbox",),
        ("send", PEER, "hi", "--offline"),
    ):
        assert_one_line(ntm(home, capsys, *argv), USAGE, str(home / state.STATE_FILE), needle, what=" ".join(argv))


@pytest.mark.parametrize("content", ['{"dcs": 5}', '{"dcs": [5]}', '{"dcs": "http://x"}', "[]", "{"])
def test_a_damaged_network_json_is_refused_naming_the_file(home, capsys, content):
    (home / state.NETWORK_FILE).write_text(content)
    for argv in (("register",), ("whois", PEER)):
        assert_one_line(ntm(home, capsys, *argv), USAGE, str(home / state.NETWORK_FILE), what=" ".join(argv))


@pytest.mark.parametrize(
    "argv, taken",
    [
        (["status"], True),
        (["--home", "/x", "-v", "--timeout", "3", "--log-level", "debug", "--password-file", "pw", "status"], True),
        (["--home", "status", "status"], True),
        (["status", "--help"], False),
        (["--version", "status"], False),
        (["--hom", "/x", "status"], False),
        (["status", "extra"], False),
        (["--timeout", "0", "status"], False),
        (["id"], False),
        ([], False),
        (["-vv", "status"], True),
        (["status", "--dc", "x"], False),
    ],
)
def test_the_status_fast_reader_takes_only_what_the_full_parser_reads_the_same(argv, taken):
    """`ntm status` is read by a small parser that skips building every subcommand (cli.status_args).
    The hostile case is a line it reads differently from the full parser (an abbreviation, --help, a
    stray word): the fast path would then act on options the user did not give, or hide an error.
    What it takes must parse to the same values in parser(); the rest goes to parser()."""
    fast = cli.status_args(argv)
    assert (fast is not None) == taken
    if fast is not None:
        full = cli.parser().parse_args(argv)
        assert vars(fast) == {k: v for k, v in vars(full).items() if k in vars(fast)}


async def test_the_status_fast_path_reads_the_daemons_answer_and_its_refusal(tmp_path):
    """status_view.ask_daemon speaks HTTP/1.0 by hand to the real control server (aiohttp): an
    answer is read whole, and a refusal (a daemon that answers {"error": ...}) is no answer, so
    `ntm status` falls back to the full path that says why."""
    import asyncio

    from node import control, status_view

    big = {"peers": ["p" * 100] * 2000}  # more than one read from the socket

    async def refuse(body: dict) -> dict:
        raise control.ControlError("busy", "not now")

    async def answer(body: dict) -> dict:
        return big

    server = await control.ControlServer.start(tmp_path, {"status": answer, "netcheck": refuse})
    try:
        assert await asyncio.to_thread(status_view.ask_daemon, tmp_path, "status", 5) == big
        with pytest.raises(ValueError, match="refused"):
            await asyncio.to_thread(status_view.ask_daemon, tmp_path, "netcheck", 5)
    finally:
        await server.close()
    with pytest.raises(OSError):
        status_view.ask_daemon(tmp_path, "status", 5)


def test_status_says_where_each_peer_sees_this_node():
    """IPv4 overlay addresses are per machine (§10.2): a user comparing two machines' logs must be
    told which address the peer uses for this node, under its own column and with a note. A row
    from a daemon that has not heard the peer's VIEW (or predates it) shows "-", never fails."""
    from node import status_view

    row = {
        "peer": PEER,
        "names": ["bob"],
        "ipv6": "fd6e:746d::2",
        "ipv4": "100.64.0.2",
        "route": "direct",
        "transport": "udp",
        "endpoint": "192.0.2.1:4330",
        "last_handshake_s": 3.0,
        "rx_bytes": 10,
        "tx_bytes": 20,
        "rtt_ms": 1.5,
        "reason": "",
        "sees_you_as": {"ipv6": "fd6e:746d::1", "ipv4": "100.64.0.7"},
    }
    head, bob, note = status_view.peers_table([row]).splitlines()
    assert head.index("SEES YOU AS") == bob.index("100.64.0.7") and bob.startswith("bob ")
    assert "IPv4 is per machine" in note
    older = {k: v for k, v in row.items() if k != "sees_you_as"}
    head, bob, _ = status_view.peers_table([older]).splitlines()
    assert bob[head.index("SEES YOU AS") :].startswith("- ")
