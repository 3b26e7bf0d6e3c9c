"""`make mutate`: mutation testing of the security core, and what survived.

Runs mutmut 3 (configuration: [tool.mutmut] in pyproject.toml: the modules, the fast unit tests
that must catch each change), then prints one `metric: value` line per figure and every mutant
that was not killed with its diff, read from mutmut's `mutants/` tree. Not part of `make test`:
it takes minutes (about 2,000 mutants).

    mutation_kill_rate      (killed + timed out) / all mutants; "no tests" counts as survived
    mutants_total, mutants_killed, mutants_survived, mutants_no_tests
"""

from __future__ import annotations

import argparse
import ast
import difflib
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MUTMUT = [sys.executable, "-m", "mutmut"]
KILLED = {"killed", "timeout"}  # a mutant that made the tests fail or hang was detected
RESULT = re.compile(r"^\s*(\S+): (.+?)\s*$")


def run_mutmut(children: int, log: Path) -> None:
    """mutmut run from scratch (its cache keeps a mutant's old verdict when only the tests
    changed); its progress spinner goes to `log`, not the terminal."""
    shutil.rmtree(ROOT / "mutants", ignore_errors=True)
    with open(log, "w") as fh:
        proc = subprocess.run(
            [*MUTMUT, "run", "--max-children", str(children)],
            cwd=ROOT,
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    if proc.returncode not in (0, 1):  # 1: some mutants survived, the normal case
        sys.exit(f"mutmut run failed (exit {proc.returncode}); see {log}")


def results() -> dict[str, str]:
    """Every mutant's status by name ("killed", "survived", "no tests", "timeout", ...)."""
    out = subprocess.run(
        [*MUTMUT, "results", "--all", "true"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    return {m.group(1): m.group(2) for line in out.splitlines() if (m := RESULT.match(line))}


def functions(path: Path) -> dict[str, str]:
    """Source of every top-level function and method in a mutmut-generated file, by name."""
    src = path.read_text()
    lines = src.splitlines()
    return {
        node.name: "\n".join(lines[node.lineno - 1 : node.end_lineno])
        for node in ast.walk(ast.parse(src))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
    }


def diff(name: str, cache: dict[Path, dict[str, str]]) -> list[str]:
    """The lines a mutant changes: its function against the `__mutmut_orig` one."""
    module, _, func = name.rpartition(".")
    path = ROOT / "mutants" / (module.replace(".", "/") + ".py")
    if path not in cache:
        cache[path] = functions(path) if path.exists() else {}
    funcs = cache[path]
    mutant = func  # x_function__mutmut_N, or xǁClassǁmethod__mutmut_N for a method
    orig = re.sub(r"__mutmut_\d+$", "__mutmut_orig", mutant)
    if mutant not in funcs or orig not in funcs:
        return ["    (source not found)"]
    a = funcs[orig].splitlines()[1:]
    b = funcs[mutant].splitlines()[1:]
    return [
        "    " + line
        for line in difflib.unified_diff(a, b, lineterm="", n=0)
        if line[:1] in "+-" and not line.startswith(("+++", "---"))
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.mutate", description=__doc__.splitlines()[0])
    p.add_argument("--report-only", action="store_true", help="report the last run instead of running mutmut")
    p.add_argument("--children", type=int, default=os.cpu_count() or 1, help="parallel mutants (default: CPUs)")
    args = p.parse_args(argv)
    if not args.report_only:
        run_mutmut(args.children, ROOT / "mutants.log")
    status = results()
    if not status:
        sys.exit("no mutmut results: run without --report-only first")
    counts = Counter(status.values())
    killed = sum(counts[s] for s in KILLED)
    print(f"mutants_total: {len(status)}")
    print(f"mutants_killed: {killed}")
    print(f"mutants_survived: {counts['survived']}")
    print(f"mutants_no_tests: {counts['no tests']}")
    print(f"mutation_kill_rate: {killed / len(status):.4f}")
    by_module = Counter(name.split(".x")[0] for name, s in status.items() if s not in KILLED)
    print("# not killed, by module: " + ", ".join(f"{m} {n}" for m, n in by_module.most_common()))
    cache: dict[Path, dict[str, str]] = {}
    for name, s in sorted(status.items()):
        if s not in KILLED:
            print(f"{name}: {s}")
            print("\n".join(diff(name, cache)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
