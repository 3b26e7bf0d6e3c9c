"""The committed contract artifact is what contracts/NodeRegistry.sol compiles to (recompiles, ~3.5 s)."""

import json

import pytest

from scripts import compile as solc

pytestmark = pytest.mark.skipif(not solc.SOLCJS.exists() and solc._native_solc() is None,
                                reason="no solc: run `make setup`")


def test_artifact_is_fresh():
    problems = solc.check()
    assert not problems, f"stale chain/artifacts/NodeRegistry.json: {problems}; run `python -m scripts.compile`"


def test_artifact_contents():
    art = json.loads(solc.ARTIFACT.read_text())
    assert art["compiler"]["version"].startswith(solc.SOLC_VERSION + "+")
    assert art["settings"]["optimizer"] == {"enabled": True, "runs": 10000}
    assert art["bytecode"].startswith("0x60") and len(art["deployedBytecode"]) > 1000
    names = {i.get("name") for i in art["abi"]}
    assert {"register", "registerBatch", "lookup", "digest", "domainSeparator", "admitDC", "updateDC", "removeDC",
            "dcList", "getDC", "transferOwnership", "NodeRegistered", "NodeRevoked", "RecordRejected"} <= names


def test_check_detects_stale_source(tmp_path, monkeypatch):
    art = json.loads(solc.ARTIFACT.read_text())
    art["sourceSha256"] = "0" * 64
    stale = tmp_path / "NodeRegistry.json"
    stale.write_text(solc.render(art))
    monkeypatch.setattr(solc, "compile_artifact", lambda *a, **k: art)  # skip a second compile
    assert any("source changed" in p for p in solc.check(stale))
    assert solc.check(tmp_path / "missing.json") == [f"{tmp_path / 'missing.json'} is missing"]
