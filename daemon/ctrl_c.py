"""Imported first by each program's main module (ntm, ntm-dc, ntm-rs, ntm-cs, ntm-deploy): when
this process is one of them (its console script, or `python -m`), Ctrl-C during the imports that
follow is one line and exit 130, not a 16-65-line traceback. A process that merely imports the
module (a test) keeps its own SIGINT handling. Only modules the interpreter has loaded already:
the sooner this runs, the smaller the window it leaves."""

from __future__ import annotations

import os
import signal
import sys

INTERRUPTED = 130  # the README's exit code for Ctrl-C
PROGRAMS = {
    "node/cli.py": "ntm",
    "dc/__main__.py": "ntm-dc",
    "rs/__main__.py": "ntm-rs",
    "cs/__main__.py": "ntm-cs",
    "scripts/deploy.py": "ntm-deploy",
}  # main module → console script


def program(argv0: str) -> str | None:
    """Which of our programs `argv0` (sys.argv[0]) starts, if any."""
    if os.path.basename(argv0) in PROGRAMS.values():
        return os.path.basename(argv0)
    return next((prog for tail, prog in PROGRAMS.items() if argv0.replace(os.sep, "/").endswith("/" + tail)), None)


def exit_on_interrupt(prog: str) -> None:
    """Until the program installs its own SIGINT handling (service.run's event loop, ntm's main):
    Ctrl-C ends the process at once with one line and exit 130. Nothing is open yet."""

    def interrupted(signum: int, frame: object) -> None:
        os.write(2, f"{prog}: interrupted\n".encode())
        os._exit(INTERRUPTED)

    signal.signal(signal.SIGINT, interrupted)


_prog = program(sys.argv[0] if sys.argv else "")
if _prog is not None:
    exit_on_interrupt(_prog)
