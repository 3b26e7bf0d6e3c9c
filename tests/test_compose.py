"""docker-compose.yml, Dockerfile and .dockerignore, validated statically (no Docker engine here).

What is checked: the YAML parses; the services exist; depends_on uses the health / completion
conditions; the chain has a JSON-RPC healthcheck; every command runs a console script or module
of this project AND parses with that program's real argument parser; files the DCs read are the
ones the deploy job writes; DC endpoints admitted on chain match the DC services and ports;
ports and volumes are well-formed and declared; the relay advertises its fixed address; the
Dockerfile's COPY sources exist and are not excluded, its CMD is a console script, anvil is on
its PATH; the README says compose was not run here.
"""

from __future__ import annotations

import ipaddress
import json
import re
import shlex
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}


def command(name: str) -> list[str]:
    cmd = SERVICES[name].get("command")
    return shlex.split(cmd) if isinstance(cmd, str) else list(cmd)


def flag(cmd: list[str], name: str, many: bool = False):
    values = [cmd[i + 1] for i, a in enumerate(cmd) if a == name]
    return values if many else (values[-1] if values else None)


def module_exists(module: str) -> bool:
    path = ROOT.joinpath(*module.split("."))
    return (path / "__main__.py").exists() or path.with_suffix(".py").exists()


def parse_with_real_parser(cmd: list[str]):
    """Run the program's own argparse on the arguments (SystemExit = a bad flag)."""
    prog, args = cmd[0], cmd[1:]
    if prog == "python":
        assert args[0] == "-m" and module_exists(args[1]), cmd
        prog, args = {"scripts.devnet": "ntm-devnet"}.get(args[1], args[1]), args[2:]
    if prog == "ntm-dc":
        from dc import config
        return config.load(config.parser().parse_args(args))
    if prog == "ntm-rs":
        from rs.__main__ import parser
        return parser().parse_args(args)
    if prog == "ntm":
        from node.cli import parser
        return None if args == ["--help"] else parser().parse_args(args)
    if prog == "ntm-devnet":
        from scripts.devnet import parser
        return parser().parse_args(args)
    if prog == "anvil":
        return None
    raise AssertionError(f"no parser known for {cmd}")


def test_services_and_dependencies():
    assert {"chain", "deploy", "dc1", "dc2", "rs", "node"} <= set(SERVICES)
    for name, svc in SERVICES.items():
        deps = svc.get("depends_on", {})
        assert isinstance(deps, dict), f"{name}: depends_on must use conditions"
        for dep, spec in deps.items():
            assert dep in SERVICES and spec["condition"] in CONDITIONS, (name, dep, spec)
    assert SERVICES["deploy"]["depends_on"]["chain"]["condition"] == "service_healthy"
    for name in ("dc1", "dc2", "rs"):
        deps = SERVICES[name]["depends_on"]
        assert deps["chain"]["condition"] == "service_healthy"
        assert deps["deploy"]["condition"] == "service_completed_successfully"
    assert SERVICES["node"]["profiles"] == ["node"]
    assert SERVICES["deploy"].get("restart") in (None, "no")


def test_chain_healthcheck_is_a_json_rpc_call():
    hc = SERVICES["chain"]["healthcheck"]
    test = hc["test"]
    assert test[0] == "CMD" and test[1] == "python" and test[2] == "-c"
    compile(test[3], "healthcheck", "exec")  # valid Python
    assert "eth_chainId" in test[3] and "127.0.0.1:8545" in test[3] and "31337" in test[3]
    for key in ("interval", "timeout", "retries"):
        assert key in hc
    for name in ("dc1", "dc2", "rs"):  # depended on as healthy
        code = SERVICES[name]["healthcheck"]["test"][3]
        compile(code, "healthcheck", "exec")
        assert "/healthz" in code


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_command_is_ours_and_parses(name):
    cmd = command(name)
    assert cmd[0] in SCRIPTS or cmd[0] in ("python", "anvil"), cmd
    if cmd[0] in SCRIPTS:
        module, func = SCRIPTS[cmd[0]].split(":")
        assert module_exists(module) or (ROOT / (module.replace(".", "/") + ".py")).exists()
        assert f"def {func}(" in (ROOT / (module.replace(".", "/") + ".py")).read_text()
    if cmd[0] == "anvil":
        lock = json.loads((ROOT / "package-lock.json").read_text())
        assert "node_modules/@foundry-rs/anvil-linux-amd64" in lock["packages"]
        assert flag(cmd, "--host") == "0.0.0.0" and flag(cmd, "--chain-id") == "31337"
        assert flag(cmd, "--state").startswith("/chain/")
    parse_with_real_parser(cmd)
    assert "entrypoint" not in SERVICES[name]


def test_files_and_endpoints_wire_up():
    deploy = command("deploy")
    shared = flag(deploy, "--data-dir")
    endpoints = flag(deploy, "--dc-endpoint", many=True)
    assert flag(deploy, "--chain") == "http://chain:8545" and "--deploy-only" in deploy
    assert SERVICES["deploy"]["environment"]["NTM_DEPLOYER_KEY"]
    chain_port = flag(command("chain"), "--port")
    for i, name in enumerate(("dc1", "dc2")):
        cmd = command(name)
        assert flag(cmd, "--key-file") == f"{shared}/{name}.key.json"  # what devnet.dc_key writes
        assert flag(cmd, "--deployment") == f"{shared}/deployment.json"
        assert flag(cmd, "--hostname") == name
        url = urlsplit(endpoints[i])
        assert url.hostname == name and str(url.port) == flag(cmd, "--http-port")
        assert flag(cmd, "--http-host") == "0.0.0.0"
        for relay in flag(cmd, "--relay", many=True):
            r = urlsplit(relay)
            assert r.hostname in SERVICES and str(r.port) == flag(command(r.hostname), "--http-port")
    for name in ("dc1", "dc2", "rs"):
        rpc = urlsplit(flag(command(name), "--rpc-url"))
        assert rpc.hostname == "chain" and str(rpc.port) == chain_port
    rs = command("rs")
    ip, port = flag(rs, "--advertise").rsplit(":", 1)
    assert SERVICES["rs"]["networks"]["ntm"]["ipv4_address"] == ip and port == flag(rs, "--udp-port")
    subnet = ipaddress.ip_network(COMPOSE["networks"]["ntm"]["ipam"]["config"][0]["subnet"])
    assert ipaddress.ip_address(ip) in subnet


def test_ports_and_volumes_well_formed():
    host_ports = []
    for name, svc in SERVICES.items():
        cmd = command(name)
        listening = {flag(cmd, f) for f in ("--port", "--http-port", "--udp-port") if flag(cmd, f)}
        for spec in svc.get("ports", []):
            m = re.fullmatch(r"(\d+):(\d+)(/udp|/tcp)?", spec)
            assert m, f"{name}: bad port mapping {spec!r}"
            assert all(0 < int(p) < 65536 for p in m.group(1, 2))
            assert m.group(2) in listening, f"{name}: publishes {spec} but listens on {listening}"
            host_ports.append((m.group(1), m.group(3) or "/tcp"))
        for spec in svc.get("volumes", []):
            parts = spec.split(":")
            assert len(parts) in (2, 3) and parts[1].startswith("/"), spec
            assert parts[0] in COMPOSE["volumes"], f"{name}: volume {parts[0]} not declared"
            assert len(parts) == 2 or parts[2] in ("ro", "rw")
    assert len(host_ports) == len(set(host_ports)), "two services publish the same host port"
    assert "4340/udp" in " ".join(SERVICES["rs"]["ports"])
    # the chain's state and each DC's SQLite file live in volumes
    assert any(v.endswith(":/chain") for v in SERVICES["chain"]["volumes"])
    for name in ("dc1", "dc2"):
        db = flag(command(name), "--db")
        assert any(db.startswith(v.split(":")[1] + "/") for v in SERVICES[name]["volumes"])


def _dockerignore() -> list[str]:
    return [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
            if line.strip() and not line.startswith("#")]


def test_dockerfile():
    lines = [l.strip() for l in (ROOT / "Dockerfile").read_text().replace("\\\n", " ").splitlines()
             if l.strip() and not l.strip().startswith("#")]
    assert lines[0] == "FROM python:3.11-slim"
    ignored = _dockerignore()
    copies = [l.split()[1:] for l in lines if l.startswith("COPY ")]
    assert copies
    for args in copies:
        for src in args[:-1]:
            assert (ROOT / src).exists(), f"COPY source {src} missing"
            assert not any(src == pat or src.startswith(pat + "/") for pat in ignored), f"{src} is in .dockerignore"
    copied = {src for args in copies for src in args[:-1]}
    # what `pip install .` needs: pyproject (+ its readme), every package it lists, the contract artifact
    assert {"pyproject.toml", "README.md", "package.json", "package-lock.json", "ntm", "dc", "rs", "node",
            "scripts"} <= copied
    run = " ".join(l for l in lines if l.startswith("RUN "))
    assert "npm ci" in run and "pip install --no-cache-dir ." in run and "nodejs" in run
    cmd = json.loads(next(l for l in lines if l.startswith("CMD "))[4:])
    assert cmd[0] in SCRIPTS
    assert any(l.startswith("USER ") and l.split()[1] not in ("root", "0") for l in lines)
    env = " ".join(l for l in lines if l.startswith("ENV "))
    from scripts.anvil import ANVIL_BIN
    assert str(ANVIL_BIN.parent.relative_to(ROOT)) in env  # `anvil` (chain service) is on PATH
    for v in ("/chain", "/shared", "/data", "/home/ntm/.ntm"):  # volume mount points owned by the user
        assert v in run


def test_readme_is_honest_about_compose():
    text = (ROOT / "README.md").read_text()
    assert "docker compose" in text and "not run" in text and "statically" in text
