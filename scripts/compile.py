"""Compile contracts/NodeRegistry.sol into the committed artifact chain/artifacts/NodeRegistry.json.

    python -m scripts.compile           # (re)write the artifact
    python -m scripts.compile --check   # exit 1 if the committed artifact is stale

Uses py-solc-x `compile_standard` (standard JSON in/out). The compiler is a native `solc` on PATH
if it is the pinned version, else the npm solcjs (node_modules/solc/solc.js) behind a tiny shim
executable: solcjs prints ">>> Cannot retry compilation with SMT..." lines on stdout, which would
break the JSON that py-solc-x parses; the shim drops them. (`compile_source`/`compile_files` pass
solc CLI flags that solcjs does not implement; `compile_standard` only needs `--standard-json`.)
A compile takes a few seconds, so the artifact is committed and `--check` guards it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from daemon import atomic_file

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "contracts" / "NodeRegistry.sol"
ARTIFACT = ROOT / "chain" / "artifacts" / "NodeRegistry.json"
SOLCJS = ROOT / "node_modules" / "solc" / "solc.js"
SOLC_VERSION = "0.8.28"
CONTRACT = "NodeRegistry"

# London: the newest EVM that every private-network client runs (Besu QBFT/IBFT with any
# milestone, GoQuorum, geth Clique, anvil). Shanghai's PUSH0 and Cancun's MCOPY/TSTORE are not on
# all of them; the cost of doing without (PUSH1 0 instead of PUSH0) is measured by bench/gas.py.
EVM_VERSION = "london"

SETTINGS = {
    "optimizer": {"enabled": True, "runs": 10000},
    "evmVersion": EVM_VERSION,
    "viaIR": True,
    "metadata": {"bytecodeHash": "none"},
    "outputSelection": {"*": {"*": ["abi", "evm.bytecode.object", "evm.deployedBytecode.object"]}},
}

_SHIM = """#!{python}
# solcjs behind a solc-like CLI: drop solcjs's '>>>' stdout lines so the JSON output parses.
import subprocess, sys
proc = subprocess.run(["node", {solcjs!r}, *sys.argv[1:]], stdin=sys.stdin, capture_output=True, text=True)
sys.stdout.write("".join(l for l in proc.stdout.splitlines(keepends=True) if not l.startswith(">>>")))
sys.stderr.write(proc.stderr)
sys.exit(proc.returncode)
"""


class CompileError(Exception):
    pass


def _native_solc() -> str | None:
    path = shutil.which("solc")
    if not path:
        return None
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return path if f"Version: {SOLC_VERSION}+" in out else None


def _solcjs_shim(tmpdir: Path) -> Path:
    if not SOLCJS.exists():
        raise CompileError(f"no native solc {SOLC_VERSION} on PATH and no {SOLCJS}: run `make setup`")
    if not shutil.which("node"):
        raise CompileError("solcjs needs `node` on PATH")
    shim = tmpdir / "solc"
    shim.write_text(_SHIM.format(python=sys.executable, solcjs=str(SOLCJS)))
    shim.chmod(0o755)
    return shim


def source_sha256(source: Path = SOURCE) -> str:
    return hashlib.sha256(source.read_bytes()).hexdigest()


def compile_artifact(source: Path = SOURCE, evm_version: str = EVM_VERSION) -> dict:
    """Compile and return the artifact dict (not written); `evm_version` for comparisons."""
    import solcx

    text = source.read_text()
    settings = {**SETTINGS, "evmVersion": evm_version}
    input_data = {
        "language": "Solidity",
        "sources": {source.name: {"content": text}},
        "settings": settings,
    }
    with tempfile.TemporaryDirectory(prefix="ntm-solc-") as tmp:
        solc = _native_solc() or _solcjs_shim(Path(tmp))
        try:
            out = solcx.compile_standard(input_data, solc_binary=solc)
        except solcx.exceptions.SolcError as exc:
            raise CompileError(str(exc).split("\n> command")[0].strip()) from None
        version = solcx.wrapper.get_version_str_from_solc_binary(solc)
    contract = out["contracts"][source.name][CONTRACT]
    return {
        "contractName": CONTRACT,
        "sourcePath": str(source.relative_to(ROOT)) if source.is_relative_to(ROOT) else str(source),
        "sourceSha256": hashlib.sha256(text.encode()).hexdigest(),
        "compiler": {"name": "solc", "version": version},
        "settings": {k: v for k, v in settings.items() if k != "outputSelection"},
        "abi": contract["abi"],
        "bytecode": "0x" + contract["evm"]["bytecode"]["object"],
        "deployedBytecode": "0x" + contract["evm"]["deployedBytecode"]["object"],
    }


def render(artifact: dict) -> str:
    return json.dumps(artifact, indent=2, sort_keys=True) + "\n"


def write_artifact(artifact: dict, path: Path = ARTIFACT) -> None:
    atomic_file.replace_file(path, render(artifact).encode())


def check(path: Path = ARTIFACT) -> list[str]:
    """Problems with the committed artifact (empty list = up to date). Recompiles."""
    if not path.exists():
        return [f"{path} is missing"]
    committed = json.loads(path.read_text())
    problems = []
    if committed.get("sourceSha256") != source_sha256():
        problems.append("source changed since the artifact was built")
    fresh = compile_artifact()
    for key in ("abi", "bytecode", "deployedBytecode", "settings", "compiler"):
        if committed.get(key) != fresh[key]:
            problems.append(f"{key} differs from a fresh compile")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m scripts.compile", description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if the committed artifact is stale")
    args = ap.parse_args(argv)
    try:
        if args.check:
            problems = check()
            if problems:
                for p in problems:
                    print(f"stale artifact: {p} (run `python -m scripts.compile`)", file=sys.stderr)
                return 1
            print(f"{ARTIFACT.relative_to(ROOT)} is up to date")
            return 0
        artifact = compile_artifact()
        write_artifact(artifact)
    except CompileError as exc:
        print(f"compile failed: {exc}", file=sys.stderr)
        return 2
    size = (len(artifact["deployedBytecode"]) - 2) // 2
    print(f"wrote {ARTIFACT.relative_to(ROOT)} (solc {artifact['compiler']['version']}, runtime {size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
