"""What `ntm` prints: results as text or JSON, errors as one line (or one JSON object) on stderr,
and the exit codes the README documents. Imports nothing heavy: `ntm --help` and `ntm id` use it.

Exit codes:
  0    ok
  1    refused or failed (a DC, the daemon, a peer or the chain said no; the message says why)
  2    usage: bad arguments or input, or local files (key, passphrase, --home, state) in the way
  3    no daemon running (`ntm up` starts one)
  4    the DC could not be reached or did not answer in time
  70   internal error (a bug: one line; `-v` shows the traceback)
  130  interrupted (Ctrl-C)
"""

from __future__ import annotations

import json
import sys

OK, FAILED, USAGE, NO_DAEMON, UNREACHABLE, INTERNAL, INTERRUPTED = 0, 1, 2, 3, 4, 70, 130


class CliError(Exception):
    """A failure to report as one line and exit code `code`; `error` is its machine-readable name."""

    def __init__(self, message: str, code: int = FAILED, error: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.error = error or {
            FAILED: "failed",
            USAGE: "usage",
            NO_DAEMON: "no_daemon",
            UNREACHABLE: "unreachable",
            INTERNAL: "internal",
            INTERRUPTED: "interrupted",
        }.get(code, "failed")


def out(args, data: dict, text: str) -> None:
    print(json.dumps(data, indent=2) if args.json else text)


def event(args, data: dict, text: str) -> None:
    """A line of a long-running command: with --json one JSON object per line."""
    print(json.dumps(data) if args.json else text, flush=True)


def show_id(args, ident: dict) -> None:
    """`ntm id`: {"node", "pubkey"}, from id.json or from the opened key."""
    out(args, ident, f"node ID {ident['node']}\npublic key {ident['pubkey']}")


def fail(exc: CliError, as_json: bool) -> int:
    """Report `exc` on stderr (one line, or one JSON object) and return its exit code."""
    message = " ".join(str(exc).split()) or exc.error
    if as_json:
        print(json.dumps({"error": exc.error, "message": message, "exit": exc.code}), file=sys.stderr)
    else:
        print(f"ntm: {message}", file=sys.stderr)
    return exc.code
