"""The flags of a server process (ntm-dc, ntm-rs, ntm-cs, ntm-deploy, ntm devnet), checked before
anything starts, each refusal one line and exit 2 (daemon/ctrl_c.py makes Ctrl-C during its
imports one line and exit 130). Standard library only.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable, NoReturn
from urllib.parse import urlsplit

USAGE, INTERRUPTED = 2, 130  # the exit codes of the README's table
# Plain HTTP is for development only; every process that allows it says so with this flag.
INSECURE_FLAG = "--insecure-plain-http"


class Refused(ValueError):
    """A value refused for a reason worth printing beside what was expected."""


def insecure_arg(p: argparse.ArgumentParser, allows: str, exposed: str, default: bool | None = False) -> None:
    """The flag that allows plain HTTP, said alike by every program: what it `allows`, and what is
    then `exposed` in clear. `default` None: a config file may set it (ntm-dc)."""
    p.add_argument(
        INSECURE_FLAG,
        action="store_true",
        default=default,
        help=f"{allows} (development only: {exposed} cross in clear)",
    )


class OneLineParser(argparse.ArgumentParser):
    """A bad flag is one line naming it and `--help`, exit 2 (argparse prints the whole usage)."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: {message} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(USAGE)


def checked(kind: Callable[[str], object], what: str) -> Callable[[str], object]:
    """An argparse type from `kind` (raises ValueError): the refusal says what was expected."""

    def parse(text: str) -> object:
        try:
            return kind(text)
        except Refused as exc:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r} ({exc})") from None
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None

    parse.__name__ = what  # argparse names the type in some messages
    return parse


def _http_url(text: str) -> str:
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError
    parts.port  # noqa: B018 (raises ValueError on a bad port)
    return text


def _ws_or_http_url(text: str) -> str:
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https", "ws", "wss") or not parts.hostname:
        raise ValueError
    parts.port  # noqa: B018
    return text


def _port(text: str) -> int:
    port = int(text)
    if not 0 <= port <= 65535:
        raise ValueError
    return port


def _positive_int(text: str) -> int:
    n = int(text)
    if n < 1:
        raise ValueError
    return n


def _positive(text: str) -> float:
    x = float(text)
    if not 0 < x < float("inf"):
        raise ValueError
    return x


def _not_negative(text: str) -> float:
    x = float(text)
    if not 0 <= x < float("inf"):
        raise ValueError
    return x


def _file(text: str) -> Path:
    path = Path(text)
    if not path.is_file() or not os.access(path, os.R_OK):
        raise ValueError
    return path


def _in_a_directory(text: str) -> Path:
    """A file to create or reuse: its directory must exist."""
    path = Path(text)
    if not path.parent.is_dir():
        raise Refused(f"{path.parent} is not a directory")
    return path


http_url = checked(_http_url, "an http:// or https:// URL")
ws_or_http_url = checked(_ws_or_http_url, "an http(s):// or ws(s):// URL")
port = checked(_port, "a port in 0..65535")
positive_int = checked(_positive_int, "an integer >= 1")
positive = checked(_positive, "a number > 0")
not_negative = checked(_not_negative, "a number >= 0")


def readable_file(text: str) -> Path:
    """A file flag (argparse type): parsing only converts; check_paths, at start, checks it exists.
    Parsing stays free of the file system (tests parse docker-compose.yml's commands)."""
    return Path(text)


def creatable_path(text: str) -> Path:
    """A file or directory to create or reuse (argparse type; check_paths checks its directory)."""
    return Path(text)


PATH_CHECKS = {
    readable_file: (_file, "a readable file"),
    creatable_path: (_in_a_directory, "a path in an existing directory"),
}


def check_paths(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """At start, before anything opens: every path flag names a readable file, or a path whose
    directory exists; else parser.error (one line, exit 2)."""
    for action in parser._actions:
        check = PATH_CHECKS.get(action.type)
        value = getattr(args, action.dest, None)
        if check is None or value is None:
            continue
        for v in value if isinstance(value, list) else [value]:
            try:
                check[0](str(v))
            except Refused as exc:
                parser.error(f"argument {'/'.join(action.option_strings)}: expected {check[1]}, got {str(v)!r} ({exc})")
            except ValueError:
                parser.error(f"argument {'/'.join(action.option_strings)}: expected {check[1]}, got {str(v)!r}")
