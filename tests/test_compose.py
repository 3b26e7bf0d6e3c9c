"""docker-compose.yml, Dockerfile and the generated Besu network, validated statically (there is
no Docker engine here).

What is checked: the Compose Specification JSON schema (check-jsonschema) and Debian's
docker-compose parser accept the file; the services exist and depend on each other by health or
completion; every command is one of ours AND parses with that program's real argument parser;
every file a service reads exists once scripts/besu_network.py has run, or is written by the
deploy job; each DC uses its own validator first; the generated genesis is consistent with the
compose file (validator set = the DCs' validators, chain id, block period, funded accounts,
bootnodes); no JSON-RPC port is published beyond 127.0.0.1; ports and volumes are well-formed;
the relay advertises the host's address, not the container's; every `docker compose run node`
can have its own identity; the Dockerfile is multi-stage with pinned bases and no nodejs at run
time; the README says compose was not run here.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from scripts import besu_network
from ntm import keys

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}
VALIDATORS = sorted(n for n in SERVICES if re.fullmatch(r"v\d+", n))
BESU_DCS = sorted(n for n in SERVICES if re.fullmatch(r"dc\d+", n))
BESU_CSS = sorted(n for n in SERVICES if re.fullmatch(r"cs\d+", n))
BESU = [*VALIDATORS, "deploy", "rs", *BESU_DCS, *BESU_CSS]  # the default stack
ANVIL = sorted(n for n, s in SERVICES.items() if s.get("profiles") == ["anvil"])


def command(name: str, raw: bool = False) -> list[str]:
    """A service's command, with ${VAR:-default} replaced by its default as compose would (unless raw)."""
    cmd = SERVICES[name].get("command")
    cmd = shlex.split(cmd) if isinstance(cmd, str) else list(cmd)
    return cmd if raw else [re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", a) for a in cmd]


def flag(cmd: list[str], name: str, many: bool = False):
    values = [cmd[i + 1] for i, a in enumerate(cmd) if a == name]
    return values if many else (values[-1] if values else None)


def parse_with_real_parser(cmd: list[str]):
    """Run the program's own argparse on the arguments (SystemExit = a bad flag)."""
    prog, args = cmd[0], cmd[1:]
    if prog == "python":
        assert args[0] == "-m" and args[1] == "scripts.devnet", cmd
        prog, args = "ntm-devnet", args[2:]
    if prog == "ntm-dc":
        from dc import config

        return config.load(config.parser().parse_args(args))
    if prog == "ntm-rs":
        from rs.__main__ import parser

        return parser().parse_args(args)
    if prog == "ntm-cs":
        from cs.__main__ import parser

        return parser().parse_args(args)
    if prog == "ntm" and args == ["--help"]:
        return None
    if prog == "ntm-devnet":
        from scripts.devnet import parser

        return parser().parse_args(args)
    if prog == "ntm-deploy":
        from scripts.deploy import parser

        return parser().parse_args(args)
    if prog == "anvil":
        return None
    raise AssertionError(f"no parser known for {cmd}")


@pytest.fixture(scope="module")
def network(tmp_path_factory) -> tuple[Path, dict]:
    """A generated Besu network, as an operator would make it before `docker compose up`."""
    out = tmp_path_factory.mktemp("compose") / "network"
    return out, besu_network.generate(out, len(VALIDATORS))


# --- the file as a whole ---------------------------------------------------------------------


def test_compose_spec_schema():
    exe = shutil.which("check-jsonschema", path=str(Path(sys.executable).parent))
    assert exe, "check-jsonschema is a dev dependency: run `make setup`"
    proc = subprocess.run(
        [exe, "--builtin-schema", "vendor.compose-spec", str(ROOT / "docker-compose.yml")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.skipif(
    shutil.which("docker-compose") is None,
    reason="Debian's docker-compose is not installed (make setup installs it as root)",
)
@pytest.mark.parametrize("profile", [None, "anvil", "node"])
def test_debian_docker_compose_parses_it(profile, tmp_path):
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "NTM_PUBLIC_IP": "203.0.113.7",
        **({"COMPOSE_PROFILES": profile} if profile else {}),
    }
    proc = subprocess.run(
        ["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "config"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    resolved = yaml.safe_load(proc.stdout)
    assert "203.0.113.7:4340" in resolved["services"]["rs"]["command"]  # the variable is substituted
    assert set(BESU) <= set(resolved["services"])


def test_no_top_level_name_key():
    assert "name" not in COMPOSE  # docker-compose 1.29 (Debian) refuses it


def test_services_and_dependencies():
    assert len(VALIDATORS) >= 4 and len(BESU_DCS) == len(VALIDATORS), "one validator per DC, at least 4 (f=1)"
    assert {"anvil", "anvil-deploy", "anvil-rs", "anvil-dc1", "anvil-dc2", "anvil-cs1", "anvil-cs2"} == set(ANVIL)
    assert len(BESU_CSS) == len(BESU_DCS), "a Cache Server beside each DC"
    for name, svc in SERVICES.items():
        deps = svc.get("depends_on", {})
        assert isinstance(deps, dict), f"{name}: depends_on must use conditions"
        for dep, spec in deps.items():
            assert dep in SERVICES and spec["condition"] in CONDITIONS, (name, dep, spec)
            assert (dep in ANVIL) == (name in ANVIL), f"{name} crosses between the anvil profile and the default"
    assert set(SERVICES["deploy"]["depends_on"]) == set(VALIDATORS)
    for name in [*BESU_DCS, "anvil-dc1", "anvil-dc2"]:
        deps = SERVICES[name]["depends_on"]
        assert any(d.endswith("deploy") and s["condition"] == "service_completed_successfully" for d, s in deps.items())
        code = SERVICES[name]["healthcheck"]["test"][3]
        compile(code, "healthcheck", "exec")
        assert "/healthz" in code
    assert SERVICES["node"]["profiles"] == ["node"]
    for v in VALIDATORS:
        assert re.fullmatch(r"hyperledger/besu:\d+\.\d+\.\d+", SERVICES[v]["image"]), "pin the Besu version"


@pytest.mark.parametrize("name", sorted(n for n in SERVICES if n not in VALIDATORS))
def test_command_is_ours_and_parses(name):
    cmd = command(name)
    assert cmd[0] in SCRIPTS or cmd[0] in ("python", "anvil"), cmd
    if cmd[0] == "anvil":
        lock = json.loads((ROOT / "package-lock.json").read_text())
        assert "node_modules/@foundry-rs/anvil-linux-amd64" in lock["packages"]
    parse_with_real_parser(cmd)
    assert "entrypoint" not in SERVICES[name]


# --- the Besu network ------------------------------------------------------------------------


def network_paths(name: str) -> list[str]:
    """Every /network/... path in a service's command, and in its Besu config file."""
    return [a.split("=", 1)[-1] for a in command(name) if "/network/" in a]


def test_every_file_a_service_reads_exists_once_the_network_is_generated(network):
    out, _ = network
    for name in BESU:
        vols = SERVICES[name].get("volumes", [])
        for path in network_paths(name):
            assert "./network:/network:ro" in vols, f"{name} reads {path} without the network mount"
            assert (out / path.removeprefix("/network/")).is_file(), f"{name}: {path} is not generated"
    for v in VALIDATORS:
        cfg = tomllib.loads((out / v / "config.toml").read_text())
        for key in ("genesis-file", "node-private-key-file"):
            assert (out / cfg[key].removeprefix("/network/")).is_file(), (v, key)
        assert any(vol.endswith(":" + cfg["data-path"]) for vol in SERVICES[v]["volumes"]), f"{v}: data not in a volume"
    deploy = command("deploy")
    for name in [*BESU_DCS, "rs"]:  # they read what the deploy job writes
        assert flag(command(name), "--deployment") == flag(deploy, "--out")
        assert any(v.startswith("shared:") for v in SERVICES[name]["volumes"])


def test_generated_genesis_matches_the_compose_file(network):
    out, net = network
    genesis = json.loads((out / "genesis.json").read_text())
    validators = besu_network.validators_of(genesis["extraData"])
    # the validator set is the DC list: one validator per DC service, its key the one in v<i>/key
    assert len(validators) == len(BESU_DCS) == len(net["dcs"])
    for i, v in enumerate(VALIDATORS):
        secret = bytes.fromhex((out / v / "key").read_text().strip().removeprefix("0x"))
        assert (
            keys.checksum(keys.node_id_of(keys.private_key(secret))) == validators[i] == net["validators"][i]["address"]
        )
        assert (out / v / "key").stat().st_mode & 0o077 == 0, "node keys are secret"
    assert genesis["config"]["chainId"] == net["chain_id"] == besu_network.CHAIN_ID
    assert genesis["config"]["qbft"]["blockperiodseconds"] == net["block_period_s"] == besu_network.BLOCK_PERIOD_S
    assert "londonBlock" in genesis["config"] and "shanghaiTime" not in genesis["config"]  # the artifact's EVM
    funded = {a.lower() for a in genesis["alloc"]}
    for dc in net["dcs"]:
        assert dc["address"][2:].lower() in funded
        assert dc["endpoint"] == f"https://{dc['name']}:8330" and dc["name"] in BESU_DCS
    assert net["deployer"][2:].lower() in funded
    # nothing well known: no anvil dev key among the generated accounts
    from scripts.anvil import DEV_KEYS

    dev = {keys.checksum(keys.node_id_of(keys.private_key(k))) for k in DEV_KEYS}
    assert not dev & {*validators, net["deployer"], *(d["address"] for d in net["dcs"])}


def test_validators_find_each_other_and_serve_no_unlocked_accounts(network):
    out, net = network
    ips = {v: SERVICES[v]["networks"]["ntm"]["ipv4_address"] for v in VALIDATORS}
    for i, v in enumerate(VALIDATORS):
        cfg = tomllib.loads((out / v / "config.toml").read_text())
        assert cfg["p2p-host"] == ips[v] == net["validators"][i]["ip"]
        assert cfg["bootnodes"] == [x["enode"] for x in net["validators"]]
        secret = bytes.fromhex((out / v / "key").read_text().strip().removeprefix("0x"))
        pub = keys.public_bytes(keys.private_key(secret))[1:].hex()
        assert cfg["bootnodes"][i] == f"enode://{pub}@{ips[v]}:30303"
        assert set(cfg["rpc-http-api"]) <= {"ETH", "NET", "WEB3", "QBFT"}  # no ADMIN, PERSONAL, DEBUG
        assert command(v) == [f"--config-file=/network/{v}/config.toml"]


def test_each_dc_uses_its_own_validator_first_and_others_as_fallback(network):
    _, net = network
    for i, name in enumerate(BESU_DCS):
        urls = [urlsplit(u) for u in flag(command(name), "--rpc-url", many=True)]
        assert urls[0].hostname == VALIDATORS[i], f"{name} must use its own validator first"
        assert len({u.hostname for u in urls}) >= 2 and all(u.hostname in VALIDATORS and u.port == 8545 for u in urls)
        assert flag(command(name), "--key-file") == f"/network/{name}/key.json"
        assert net["dcs"][i]["name"] == name and net["dcs"][i]["validator"] == VALIDATORS[i]
        assert flag(command(name), "--hostname") == name


def test_the_generator_refuses_too_few_validators_and_an_existing_network(tmp_path):
    with pytest.raises(ValueError, match="at least 4"):
        besu_network.generate(tmp_path / "n", 3)
    besu_network.generate(tmp_path / "n", 4)
    with pytest.raises(FileExistsError):
        besu_network.generate(tmp_path / "n", 4)
    added = besu_network.add(tmp_path / "n")
    net = json.loads((tmp_path / "n" / "network.json").read_text())
    assert (
        added["validator"]["name"] == "v5" and len(net["dcs"]) == 5 and (tmp_path / "n" / "dc5" / "key.json").exists()
    )


# --- ports, addresses, identities ------------------------------------------------------------


def published(svc: dict) -> list[tuple[str | None, str, str, str]]:
    """(host ip, host port, container port, proto) of each port mapping."""
    out = []
    for spec in svc.get("ports", []):
        m = re.fullmatch(r"(?:(\d+\.\d+\.\d+\.\d+):)?(\d+):(\d+)(/udp|/tcp)?", spec)
        assert m, f"bad port mapping {spec!r}"
        out.append((m.group(1), m.group(2), m.group(3), m.group(4) or "/tcp"))
    return out


def test_no_json_rpc_port_is_published_beyond_loopback():
    for name, svc in SERVICES.items():
        for ip, _, container, _ in published(svc):
            if container == "8545" or name in ("anvil", *VALIDATORS):
                assert ip == "127.0.0.1", f"{name} publishes chain RPC on {ip or 'every interface'}"


def test_ports_and_volumes_well_formed():
    host_ports = []
    for name, svc in SERVICES.items():
        cmd = command(name)
        listening = {
            flag(cmd, f)
            for f in ("--port", "--http-port", "--udp-port", "--udp-alt-port", "--stream-port")
            if flag(cmd, f)
        }
        if name in VALIDATORS:
            listening = {"8545"}
        for ip, host, container, proto in published(svc):
            assert container in listening, f"{name}: publishes {container} but listens on {listening}"
            host_ports.append((host, proto))
        for spec in svc.get("volumes", []):
            parts = spec.split(":")
            assert len(parts) in (2, 3) and parts[1].startswith("/"), spec
            assert parts[0] == "./network" or parts[0] in COMPOSE["volumes"], f"{name}: volume {parts[0]} not declared"
    assert len(host_ports) == len(set(host_ports)), "two services publish the same host port"
    for name in [*BESU_DCS, "anvil-dc1", "anvil-dc2"]:  # both keepalive ports fixed and published
        cmd = command(name)
        ports = {(c, p) for _, _, c, p in published(SERVICES[name])}
        assert {(flag(cmd, "--udp-port"), "/udp"), (flag(cmd, "--udp-alt-port"), "/udp")} <= ports
        db = flag(cmd, "--db")
        assert any(db.startswith(v.split(":")[1] + "/") for v in SERVICES[name]["volumes"])


def test_the_relay_advertises_the_hosts_address_not_the_containers():
    for name in ("rs", "anvil-rs"):
        advertise = flag(command(name, raw=True), "--advertise")
        assert advertise.startswith("${NTM_PUBLIC_IP"), advertise
        port = advertise.rsplit(":", 1)[1]
        assert any(host == port and proto == "/udp" for _, host, _, proto in published(SERVICES[name]))


def test_every_compose_run_node_can_be_its_own_identity():
    home = SERVICES["node"]["environment"]["NTM_HOME"]
    assert "${NTM_NODE" in home  # NTM_NODE=alice docker compose run node ... -> its own key


# --- the image -------------------------------------------------------------------------------


def _dockerignore() -> list[str]:
    return [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]


def test_dockerfile_is_multi_stage_pinned_and_without_nodejs_at_run_time():
    lines = [
        ln.strip()
        for ln in (ROOT / "Dockerfile").read_text().replace("\\\n", " ").splitlines()
        if ln.strip() and not ln.strip().startswith("#")
    ]
    froms = [i for i, ln in enumerate(lines) if ln.startswith("FROM ")]
    assert len(froms) == 2, "build stage (npm) + runtime stage"
    for i in froms:
        image = lines[i].split()[1]
        assert re.fullmatch(r"[a-z0-9./-]+:\d+\.\d+\.\d+[-a-z0-9.]*", image), f"floating base image {image}"
    runtime = lines[froms[1] :]
    run = " ".join(ln for ln in runtime if ln.startswith("RUN "))
    assert "nodejs" not in run and "npm" not in run and "apt-get" not in run
    assert "npm ci" in " ".join(lines[: froms[1]])
    assert any(ln.startswith("COPY --from=") and ln.endswith("/usr/local/bin/anvil") for ln in runtime)
    ignored = _dockerignore()
    copies = [ln.split()[1:] for ln in runtime if ln.startswith("COPY ") and not ln.startswith("COPY --from")]
    for args in copies:
        for src in args[:-1]:
            assert (ROOT / src).exists(), f"COPY source {src} missing"
            assert not any(src == pat or src.startswith(pat + "/") for pat in ignored), f"{src} is in .dockerignore"
    copied = {src for args in copies for src in args[:-1]}
    assert {"pyproject.toml", "README.md", "ntm", "chain", "daemon", "dc", "rs", "cs", "node", "scripts"} <= copied
    assert "pip install --no-cache-dir -c constraints.txt ." in run  # the versions the tests ran, not the newest
    assert "constraints.txt" in copied
    cmd = json.loads(next(ln for ln in runtime if ln.startswith("CMD "))[4:])
    assert cmd[0] in SCRIPTS
    assert any(ln.startswith("USER ") and ln.split()[1] not in ("root", "0") for ln in runtime)
    for v in ("/chain", "/shared", "/data", "/home/ntm/nodes"):  # volume mount points owned by the user
        assert v in run


def test_readme_is_honest_about_compose():
    text = (ROOT / "README.md").read_text()
    assert "docker compose" in text and "not run" in text and "statically" in text
    assert "besu_network" in text and "qbft_proposeValidatorVote" in text


def test_each_dc_announces_its_cache_server_and_the_cs_signs_with_that_dcs_key():
    for dc, cs in [*zip(BESU_DCS, BESU_CSS), ("anvil-dc1", "anvil-cs1"), ("anvil-dc2", "anvil-cs2")]:
        announced = flag(command(dc, raw=True), "--cs")
        assert announced.startswith("http://${NTM_PUBLIC_IP")  # as nodes reach it, not the container
        assert flag(command(cs, raw=True), "--public-url") == announced
        port = urlsplit(command(dc)[command(dc).index("--cs") + 1]).port
        assert any(
            host == str(port) and container == flag(command(cs), "--http-port")
            for _, host, container, _ in published(SERVICES[cs])
        )
        assert urlsplit(flag(command(cs), "--dc")).hostname == dc
        assert flag(command(cs), "--key-file") == flag(command(dc), "--key-file")
