"""The committed contract artifact is what contracts/NodeRegistry.sol compiles to (recompiles, ~3.5 s)."""

import json

import pytest

from scripts import compile as solc

pytestmark = pytest.mark.skipif(
    not solc.SOLCJS.exists() and solc._native_solc() is None, reason="no solc: run `make setup`"
)


def opcodes(code: bytes) -> set[int]:
    """The opcodes of EVM code (PUSH data skipped)."""
    ops, i = set(), 0
    while i < len(code):
        op = code[i]
        ops.add(op)
        i += 1 + (op - 0x5F if 0x60 <= op <= 0x7F else 0)
    return ops


def test_artifact_is_fresh():
    problems = solc.check()
    assert not problems, f"stale chain/artifacts/NodeRegistry.json: {problems}; run `python -m scripts.compile`"


def test_artifact_contents():
    art = json.loads(solc.ARTIFACT.read_text())
    assert art["compiler"]["version"].startswith(solc.SOLC_VERSION + "+")
    assert art["settings"]["optimizer"] == {"enabled": True, "runs": 10000}
    assert art["bytecode"].startswith("0x60") and len(art["deployedBytecode"]) > 1000
    # london: runs on every private-network client; no Shanghai+ opcode in the code
    assert art["settings"]["evmVersion"] == solc.EVM_VERSION == "london"
    assert not {0x5F, 0x5C, 0x5D, 0x5E} & opcodes(
        bytes.fromhex(art["deployedBytecode"][2:])
    )  # PUSH0, TLOAD/TSTORE, MCOPY
    names = {i.get("name") for i in art["abi"]}
    assert {
        "register",
        "registerBatch",
        "lookup",
        "digest",
        "domainSeparator",
        "admitDC",
        "updateDC",
        "removeDC",
        "dcList",
        "getDC",
        "transferOwnership",
        "NodeRegistered",
        "NodeRevoked",
        "RecordRejected",
    } <= names


def test_check_detects_stale_source(tmp_path, monkeypatch):
    art = json.loads(solc.ARTIFACT.read_text())
    art["sourceSha256"] = "0" * 64
    stale = tmp_path / "NodeRegistry.json"
    stale.write_text(solc.render(art))
    monkeypatch.setattr(solc, "compile_artifact", lambda *a, **k: art)  # skip a second compile
    assert any("source changed" in p for p in solc.check(stale))
    assert solc.check(tmp_path / "missing.json") == [f"{tmp_path / 'missing.json'} is missing"]
