"""Lab scenario: a stream between two embedded nodes (no daemon, no TUN, no root in the
program) while the sender moves to another NAT; bench/roam.py can reuse `stream_move`."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from .fed import Federation
from .topology import Host, expect
from .upnode import DC_NAME, ROOT

APPXFER = Path(__file__).with_name("appxfer.py")
STREAM_PORT = 7000
#: Sender's pace: steady traffic across the move, as a call or a download would be.
RATE_BYTES_S = 2e6
MOVE_AFTER_S = 1.5


def app_home(fed: Federation, host: Host, dc: int) -> tuple[Path, str]:
    """A node directory made and registered from inside `host` (`ntm keygen`, `ntm register`)."""
    fed.lab.set_hosts(host, {DC_NAME.format(i + 1): [fed.srv.addr4, fed.srv.addr6] for i in range(len(fed.dcs))})
    home = fed.workdir / f"apphome-{host.name}"

    def cli(*args: str) -> dict:
        r = fed.lab.exec(
            host, [sys.executable, "-m", "node.cli", "--home", str(home), "--json", *args], cwd=str(ROOT), timeout=60
        )
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    node = cli("keygen")["node"]
    cli("register", "--dc", f"{fed.scheme(dc)}://{DC_NAME.format(dc + 1)}:{fed.dc_port(dc)}", *fed.dc_flags(dc))
    return home, node


def stream_move(fed: Federation, mover: Host, peer: Host, to_site: str, nbytes: int) -> dict:
    """`nbytes` over one stream from `mover` to `peer` at RATE_BYTES_S; `mover` moves to `to_site`
    MOVE_AFTER_S into the stream (counted from when it is open: a loaded machine may take seconds
    to start the sender, and a move before its first DC session is not this scenario).
    Returns {"intact", "bytes", "max_stall_s", "elapsed_s"}."""
    lab = fed.lab
    m_home, m_id = app_home(fed, mover, 0)
    p_home, p_id = app_home(fed, peer, 1)
    srv = lab.run(
        peer,
        [sys.executable, str(APPXFER), "serve", "--home", str(p_home), "--port", str(STREAM_PORT), "--allow", m_id],
        cwd=str(ROOT),
    )
    expect(srv, "listening", timeout=60)
    cli = lab.run(
        mover,
        [
            sys.executable,
            str(APPXFER),
            "send",
            "--home",
            str(m_home),
            "--to",
            p_id,
            "--port",
            str(STREAM_PORT),
            "--bytes",
            str(nbytes),
            "--rate",
            str(RATE_BYTES_S),
        ],
        cwd=str(ROOT),
    )
    expect(cli, r'"streaming"', timeout=60)
    time.sleep(MOVE_AFTER_S)
    lab.move(mover, to_site)
    sent = json.loads(expect(cli, r'"sha256"', timeout=180).string)
    got = json.loads(expect(srv, r'"sha256"', timeout=30).string)
    return {
        "intact": sent["sha256"] == got["sha256"] and sent["bytes"] == got["bytes"] == nbytes,
        "bytes": got["bytes"],
        "max_stall_s": got["max_stall_s"],
        "elapsed_s": got["elapsed_s"],
    }
