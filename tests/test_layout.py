"""The layout is the architecture: who may import whom, no import cycles, and ntm/ free of I/O.

Every import statement counts, including those inside functions (a function-local import that
dodges a cycle is still a cycle)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("ntm", "chain", "daemon", "dc", "rs", "cs", "node", "scripts", "labkit")
# package → packages of this project it may import (besides itself)
ALLOWED = {
    "ntm": set(),
    "chain": {"ntm"},
    "daemon": {"ntm"},
    "dc": {"ntm", "chain", "daemon"},
    "rs": {"ntm", "chain", "daemon"},
    "cs": {"ntm", "daemon"},  # the registry through its DC, not the chain
    "node": {"ntm", "daemon"},
    "scripts": {"ntm", "chain", "daemon", "dc", "rs", "cs", "node"},
    # real parts for tests and benches (a loopback federation, the NAT lab); nothing imports it but
    # tests/ and bench/
    "labkit": {"ntm", "chain", "daemon", "dc", "rs", "cs", "node", "scripts"},
}
# ntm/ is the sans-I/O core: bytes in, events/bytes out. These would bring I/O into it.
IO_MODULES = {"asyncio", "aiohttp", "web3", "sqlite3", "subprocess", "pathlib", "eth_account", "selectors"}


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            rel = path.relative_to(ROOT).with_suffix("")
            name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
            out[name] = path
    return out


def imports_of(path: Path, name: str, known: set[str]) -> set[str]:
    """Modules imported by `path`: project modules resolved to the longest known name, others by
    their top-level name."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = name.split(".")[: -node.level] if not path.name == "__init__.py" else name.split(".")
                base = ".".join([*pkg, base] if base else pkg)
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for t in targets:
            parts = t.split(".")
            for i in range(len(parts), 0, -1):
                cand = ".".join(parts[:i])
                if cand in known:
                    found.add(cand)
                    break
            else:
                found.add(parts[0])
    found.discard(name)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(path, name, set(mods)) for name, path in mods.items()}


def test_packages_import_only_their_layers():
    bad = []
    for name, deps in graph().items():
        pkg = name.split(".")[0]
        for d in deps:
            top = d.split(".")[0]
            if top in PACKAGES and top != pkg and top not in ALLOWED[pkg]:
                bad.append(f"{name} imports {d}")
    assert not bad, bad


def test_ntm_is_free_of_io():
    bad = [f"{name} imports {d}" for name, deps in graph().items() if name.split(".")[0] == "ntm"
           for d in deps if d.split(".")[0] in IO_MODULES]
    assert not bad, bad


def test_no_import_cycles():
    full = graph()
    g = {n: {d for d in deps if d in full} for n, deps in full.items()}
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    cycles: list[list[str]] = []

    def visit(n: str, stack: list[str]) -> None:
        state[n] = 1
        for d in sorted(g[n]):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d, [*stack, d])
        state[n] = 2

    for n in sorted(g):
        if n not in state:
            visit(n, [n])
    assert not cycles, cycles


def test_benches_and_labkit_import_no_test_module():
    """A bench that imports a test module breaks when the test is edited (bench/tunnel.py did):
    what benches share with tests lives in labkit/."""
    known = set(modules())
    bad = [f"{path.relative_to(ROOT)} imports {d}"
           for path in [*(ROOT / "bench").glob("*.py"), *(ROOT / "labkit").rglob("*.py")]
           for d in imports_of(path, ".".join(path.relative_to(ROOT).with_suffix("").parts), known)
           if d.split(".")[0] == "tests"]
    assert not bad, bad
