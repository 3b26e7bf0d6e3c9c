"""The README's "Your own federation on several machines", run verbatim: every block in the
namespace of the machine it names (the server on the lab's public 198.18.0.10 and
2001:db8:0:1::10, alice behind an IPv4 NAT, bob IPv6 only), in order, each machine keeping its
shell's exported state between its blocks as a terminal would. What the guide promises is
asserted: both nodes register (one over IPv4, one over IPv6), `bob.ntm` resolves through the
system resolver, and alice fetches bob's page over TCP by name. Real anvil, DC, relay, Cache
Server and `ntm up` with TUN."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest

from labkit.lab.topology import NETNS_ETC

pytestmark = pytest.mark.lab

ROOT = Path(__file__).resolve().parents[2]
BLOCK = re.compile(r"<!-- several: (\w+) -->\n```bash\n(.*?)```\n", re.S)


def guide() -> list[tuple[str, str]]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Your own federation on several machines", 1)[1].split("\n## ", 1)[0]
    blocks = BLOCK.findall(section)
    assert blocks and {m for m, _ in blocks} == {"server", "alice", "bob"}, "README lost the guide's blocks"
    return blocks


def test_the_several_machines_guide_runs_verbatim(lab_env, lab, tmp_path):
    machines = {
        "server": lab.server,
        "alice": lab.add_site("gal", "eim").host,
        "bob": lab.add_site("gbob", "ipv6only").host,
    }
    assert lab.server.addr4 == "198.18.0.10" and lab.server.addr6 == "2001:db8:0:1::10"  # as the guide says
    dirs = {}
    for name, host in machines.items():
        d = dirs[name] = tmp_path / name
        d.mkdir()
        (d / ".venv").symlink_to(ROOT / ".venv")
        (NETNS_ETC / host.ns).mkdir(parents=True, exist_ok=True)  # its own /etc/resolv.conf, never the host's
        (NETNS_ETC / host.ns / "resolv.conf").write_text("nameserver 127.0.0.54\noptions timeout:2 attempts:1\n")
    ids: dict[str, str] = {}
    for name, block in guide():
        host, d = machines[name], dirs[name]
        if "$ALICE" in block or "$BOB" in block:  # the IDs the machines told each other (`ntm id`)
            for who in ("alice", "bob"):
                ids.setdefault(who.upper(), node_id(lab, machines[who], dirs[who] / ".ntm"))
        if "$DC1" in block and name != "server":  # the DC's chain address, told by the server's operator
            ids.setdefault("DC1", node_id(lab, machines["server"], dirs["server"] / "fed" / "dc1-key"))
        env = {k: v for k, v in os.environ.items() if not k.startswith("NTM_")}
        env.update(HOME=str(d), PYTHONPATH=str(ROOT), **ids)
        script = d / "block.sh"
        script.write_text(f"set -e\n[ -f {d}/.shell ] && . {d}/.shell\n{block}\nexport -p > {d}/.shell\n")
        proc = lab.run(host, ["bash", str(script)], cwd=str(d), env=env)
        out, err = proc.communicate(timeout=300)
        logs = {p.name: p.read_text()[-1200:] for p in d.rglob("*.log")}
        assert proc.returncode == 0, f"{name}: exit {proc.returncode}\n{block}\n{out}\n{err}\n{logs}"
        assert "Traceback" not in out + err, f"{name}\n{out}\n{err}"
        if "urlopen" in block:
            assert "fd6e:746d:" in out and "\n200\n" in out, out  # bob.ntm resolved, the page fetched by name
            print(f"\nalice → bob.ntm:\n{out}")


def node_id(lab, host, home: Path) -> str:
    r = lab.exec(host, [sys.executable, "-m", "node.cli", "--home", str(home), "--json", "id"], cwd=str(ROOT))
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["node"]
