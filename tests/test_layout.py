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
    bad = [
        f"{name} imports {d}"
        for name, deps in graph().items()
        if name.split(".")[0] == "ntm"
        for d in deps
        if d.split(".")[0] in IO_MODULES
    ]
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
                cycles.append(stack[stack.index(d) :] + [d])
            elif d not in state:
                visit(d, [*stack, d])
        state[n] = 2

    for n in sorted(g):
        if n not in state:
            visit(n, [n])
    assert not cycles, cycles


# Pure cores outside ntm/ (issue 26): they import only ntm/ and each other, never an I/O library.
PURE_CORES = {"cs.core", "cs.quota", "cs.errors"}


def test_pure_cores_import_only_ntm_and_each_other():
    bad = [
        f"{name} imports {d}"
        for name, deps in graph().items()
        if name in PURE_CORES
        for d in deps
        if d.split(".")[0] in PACKAGES
        and d.split(".")[0] != "ntm"
        and d not in PURE_CORES
        or d.split(".")[0] in IO_MODULES
    ]
    assert not bad, bad


def test_benches_and_labkit_import_no_test_module():
    """A bench that imports a test module breaks when the test is edited (bench/tunnel.py did):
    what benches share with tests lives in labkit/."""
    known = set(modules())
    bad = [
        f"{path.relative_to(ROOT)} imports {d}"
        for path in [*(ROOT / "bench").glob("*.py"), *(ROOT / "labkit").rglob("*.py")]
        for d in imports_of(path, ".".join(path.relative_to(ROOT).with_suffix("").parts), known)
        if d.split(".")[0] == "tests"
    ]
    assert not bad, bad


# --- one clock (issue 26 item 3) ---------------------------------------------------------------
# Time is read only through ntm/clock.py's Clock, injected, so every part runs on FakeClock. The
# product's packages are held to it (scripts/ is tooling; labkit/ the tests' harness).
CLOCK_PACKAGES = ("ntm", "chain", "daemon", "dc", "rs", "cs", "node")
REAL_CLOCK = "ntm/clock.py"  # the one place the system's clocks are read
# The entry points: each chooses the real clock (ntm.clock.SYSTEM) and hands it down.
ENTRY_POINTS = ("dc/__main__.py", "rs/__main__.py", "node/daemon.py", "node/commands.py")
# Reads of the event loop's own time where a library schedules on the loop with it.
LOOP_TIME = {"node/streams.py": "aioquic's protocol runs its timers on loop.time(): its `now` must be that"}
RAW_TIME = {"time", "monotonic", "time_ns", "monotonic_ns", "perf_counter", "perf_counter_ns"}
RAW_DATETIME = {"now", "utcnow", "today"}


def raw_clock_reads(source: str) -> list[str]:
    """Where `source` reads a clock itself: time.time/monotonic/… (called or passed), `from time
    import` of them, datetime/date .now/.utcnow/.today, and `.time()` (an event loop's clock)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute):
            base = node.value
            name = base.id if isinstance(base, ast.Name) else base.attr if isinstance(base, ast.Attribute) else ""
            if (name == "time" and node.attr in RAW_TIME) or (
                name in ("datetime", "date") and node.attr in RAW_DATETIME
            ):
                found.append(f"line {node.lineno}: {name}.{node.attr}")
        elif isinstance(node, ast.ImportFrom) and node.module in ("time", "datetime"):
            found += [
                f"line {node.lineno}: from {node.module} import {a.name}"
                for a in node.names
                if a.name in RAW_TIME | {"datetime", "date"}
            ]
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "time"
            and not node.args
            and not node.keywords
        ):
            found.append(f"line {node.lineno}: .time()")
    return found


def test_time_is_read_only_through_the_injected_clock():
    bad = []
    for pkg in CLOCK_PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel == REAL_CLOCK:
                continue
            reads = raw_clock_reads(path.read_text())
            if rel in LOOP_TIME:
                reads = [r for r in reads if not r.endswith(".time()")]
            bad += [f"{rel} {r}" for r in reads]
    assert not bad, bad
    assert raw_clock_reads((ROOT / REAL_CLOCK).read_text()), "the rule must see the real clock's own reads"
    assert all("SYSTEM" in (ROOT / e).read_text() for e in ENTRY_POINTS), "an entry point no longer builds the clock"


def test_the_clock_rule_sees_every_shape_of_read():
    """The rule above can fail: each shape of raw read is caught, the injected clock is not."""
    shapes = [
        "t = time.time()",
        "t = time.monotonic()",
        "f(now=time.monotonic)",
        "from time import monotonic",
        "t = loop.time()",
        "t = asyncio.get_running_loop().time()",
        "d = datetime.datetime.now(tz)",
        "d = datetime.utcnow()",
        "t = time.time_ns() // 1000",
    ]
    assert all(raw_clock_reads(s) for s in shapes)
    assert not raw_clock_reads("t = clock.now(); w = clock.wall_ms(); time.sleep(1); d = clock.utc()")
