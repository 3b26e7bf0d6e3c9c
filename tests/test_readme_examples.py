"""The README's command examples run as written: a README that shows a command the CLI rejects
fails here. The adversary is the README itself (or the CLI changing under it): a user copies an
example and gets a usage error, a traceback, or an exit code the README's table does not give.

Which examples, by rule (so a new one is covered without an edit here):
- a line of a fenced code block that starts, after an optional transcript prompt (`alice$ `),
  with `ntm`, `ntm-dc`, `ntm-rs`, `ntm-cs` or `ntm-deploy`; a block written as two machines side
  by side (columns three or more spaces apart) gives one command per column; `\\` continues a line,
  `&&` separates commands; a `# comment`, a trailing `&` and redirections are not part of it;
- except the blocks other tests run verbatim (`<!-- by-hand -->`: tests/test_readme.py,
  `<!-- several: ... -->`: tests/lab/test_lab_guide.py, `<!-- app-example -->`);
- placeholders are filled in: `0xPEER`, `0xALICE...`-style IDs and `laptop-id` by a node ID,
  `ITEM` by an item ID.

Every example must parse with its program's own parser. Every `ntm` example, except `ntm up` and
`ntm devnet` (they would start a daemon, a federation) and the servers' (they would start servers),
then runs in-process in a scratch home that has a key and the aliases the README uses (alice, bob,
carol, car) but no registration, no daemon and no DC: each must end without a traceback, with the
exit code the README's table gives for that situation (EXPECTED below), never 70.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import pytest

from tests.test_cli_table import SERVERS, key_file, run_main  # noqa: F401 (key_file: a fixture)
from node import cli, state
from node.output import CliError

ROOT = Path(__file__).resolve().parent.parent
PROGRAMS = ("ntm", "ntm-dc", "ntm-rs", "ntm-cs", "ntm-deploy")
VERBATIM = re.compile(r"<!-- (by-hand: begin|several: \w+|app-example: begin) -->\n```")
NODE = "0x1a642f0E3c3aF545E7AcBD38b07251B3990914F1"
PLACEHOLDERS = {r"^0x[A-Z0-9]+(\.\.\.)?$": NODE, r"^laptop-id$": NODE, r"^ITEM$": "ab" * 16}
ALIASES = ("alice", "bob", "carol", "car")

# The README's exit-code table, for a home with a key and aliases, not registered, no daemon running:
# 0 ok; 2 usage or local files (here: no DC known, the node is not registered); 3 no daemon; 4 DC
# unreachable (a DC given on the line that is not there).
EXPECTED = {
    "keygen": 0,
    "id": 0,
    "alias": 0,
    "allow": 0,
    "status": 0,
    "completion": 0,
    "register": 2,
    "whois": 2,
    "revoke": 2,
    "inbox": 2,
    "fetch": 2,
    "ping": 3,
    "send": 3,
    "recv": 3,
    "nc": 3,
    "serve": 3,
    "down": 3,
    "group": 3,
}
# `ntm send --offline` goes to our DC's Cache Server, not through the daemon: no DC known is 2.
EXPECTED_OFFLINE_SEND = 2
NOT_RUN = ("up", "devnet")  # a daemon, a federation: parsed only


def fenced_blocks(text: str) -> list[str]:
    """The README's fenced blocks, without those other tests run verbatim."""
    blocks = []
    for m in re.finditer(r"^```[^\n]*\n(.*?)^```", text, re.S | re.M):
        if not VERBATIM.search(text[max(0, m.start() - 80) : m.start() + 4]):
            blocks.append(m.group(1))
    return blocks


def examples(text: str) -> list[list[str]]:
    """Each example command as argv (program first), in the README's order."""
    found = []
    for block in fenced_blocks(text):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            for column in re.split(r" {3,}", line.strip()):
                column = re.sub(r"^\w+\$ ", "", column)
                for command in column.split("&&"):
                    argv = words(command)
                    if argv and argv[0] in PROGRAMS:
                        found.append(argv)
    return found


def words(command: str) -> list[str]:
    """A shell command's words, up to a comment, a redirection or a trailing `&`; placeholders filled."""
    argv = []
    for w in shlex.split(command, comments=True):
        if w in ("&", ">", "2>&1") or w.startswith((">", "2>", "<")):
            break
        argv.append(next((v for p, v in PLACEHOLDERS.items() if re.match(p, w)), w))
    return argv


def expected(argv: list[str]) -> int:
    """The exit code the README's table gives `ntm ARGV` in the scratch home."""
    command = next(a for a in argv if not a.startswith("-"))
    if command == "send" and "--offline" in argv:
        return EXPECTED_OFFLINE_SEND
    if command == "register" and "--dc" in argv:
        return 4  # a DC given that is not there
    return EXPECTED[command]


README_EXAMPLES = examples((ROOT / "README.md").read_text())


def test_the_rule_finds_the_readmes_examples():
    """The extraction itself: two machines side by side, prompts, chains, comments, placeholders."""
    text = (
        "```\n# on alice                 # on bob\nntm up &                   ntm alias alice 0xALICE...\n"
        "bob$ ntm keygen && ntm id > id.txt   # comment\nntm-dc --relay http://x \\\n    --hostname dc1 &\n```\n"
        "<!-- by-hand: begin -->\n```bash\nntm skipped\n```\n"
    )
    assert examples(text) == [
        ["ntm", "up"],
        ["ntm", "alias", "alice", NODE],
        ["ntm", "keygen"],
        ["ntm", "id"],
        ["ntm-dc", "--relay", "http://x", "--hostname", "dc1"],
    ]
    assert len(README_EXAMPLES) > 30
    assert {a[1] for a in README_EXAMPLES if a[0] == "ntm"} >= {"send", "group", "inbox", "status", "up"}


@pytest.fixture(scope="module")
def scratch(tmp_path_factory, key_file) -> Path:  # noqa: F811 (the imported fixture)
    """A home with a key and the README's aliases: not registered, no daemon."""
    base = tmp_path_factory.mktemp("readme") / "home"
    base.mkdir()
    shutil.copy(key_file, base / state.KEY_FILE)
    (base / "peers.json").write_text(json.dumps({"aliases": {name: NODE for name in ALIASES}}))
    return base


@pytest.mark.parametrize("argv", README_EXAMPLES, ids=" ".join)
def test_a_readme_example_parses_and_runs_with_the_tables_exit_code(argv, scratch, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(state.PASSPHRASE_ENV, "pw")
    prog, args = argv[0], argv[1:]
    try:
        parsed, rest = (cli.parser() if prog == "ntm" else SERVERS[prog][1]).parse_known_args(args)
        if prog == "ntm" and parsed.cmd == "devnet":
            rest = SERVERS["ntm devnet"][1].parse_known_args(rest)[1]
    except (CliError, SystemExit) as exc:  # ntm's parser raises CliError, the servers' exit 2
        pytest.fail(f"{' '.join(argv)}: the CLI refuses it: {exc} {capsys.readouterr().err}")
    assert not rest, f"{' '.join(argv)}: the CLI refuses {rest}"
    if prog != "ntm" or parsed.cmd in NOT_RUN:
        return
    home = tmp_path / "home"
    shutil.copytree(scratch, home)
    if parsed.cmd == "keygen":
        (home / state.KEY_FILE).unlink()  # the README makes the key in a new home
    code, out, err = run_main(cli.main, ["--home", str(home), *args], capsys)
    assert "Traceback" not in out + err, f"{' '.join(argv)}:\n{out}\n{err}"
    assert code == expected(args), f"{' '.join(argv)}: exit {code}, the README's table says {expected(args)}: {err}"
