"""docs/ARCHITECTURE.md's module list matches the tree: a newcomer reading it finds every module of
the product, and no module that was renamed or removed (the list had drifted by six modules)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("ntm", "chain", "daemon", "dc", "rs", "cs", "node", "scripts", "labkit")
ENTRY = {"__init__", "__main__"}  # named by their package's row, not as modules


def rows() -> dict[str, str]:
    """The Modules section's code block, one text per top-level folder row (`pkg/   ...`)."""
    block = (ROOT / "docs/ARCHITECTURE.md").read_text().split("## Modules", 1)[1].split("```")[1]
    out: dict[str, str] = {}
    folder = None
    for line in block.splitlines():
        m = re.match(r"(\w+)/\s", line)
        if m:
            folder = m.group(1)
            out[folder] = ""
        if folder:
            out[folder] += line[m.end() if m else 0 :] + "\n"
    return out


def named(text: str) -> set[str]:
    """Module names written as `name.py` (not `other/name.py`: a reference to another package)."""
    return set(re.findall(r"(?<![\w/.])(\w+)\.py\b", text))


def modules(folder: Path) -> set[str]:
    return {p.stem for p in folder.glob("*.py")} - ENTRY


def test_every_product_module_is_listed_and_every_listed_module_exists():
    listed = rows()
    for pkg in PACKAGES:
        text = listed[pkg]
        have = modules(ROOT / pkg)
        subs = {d.name: modules(d) for d in (ROOT / pkg).iterdir() if (d / "__init__.py").exists()}
        globbed = {
            m for sub in subs.values() for m in sub for g in re.findall(r"(\w+)_\*\.py", text) if m.startswith(g)
        }
        assert have - named(text) == set(), f"{pkg}/ modules missing from docs/ARCHITECTURE.md"
        for sub, mods in subs.items():
            assert f"{sub}/" in text, f"{pkg}/{sub}/ missing from docs/ARCHITECTURE.md"
            assert mods - named(text) - globbed == set(), f"{pkg}/{sub}/ modules missing from docs/ARCHITECTURE.md"
        gone = named(text) - have - {m for mods in subs.values() for m in mods} - ENTRY
        assert gone == set(), f"docs/ARCHITECTURE.md lists {pkg}/ modules not in the tree"
    benches = set(re.findall(r"\w+", listed["bench"].split("—")[0]))
    assert benches == modules(ROOT / "bench"), "docs/ARCHITECTURE.md's bench/ row differs from bench/*.py"
