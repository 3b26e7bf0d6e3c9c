"""`ntm nc` and `ntm serve` through real daemons (`ntm up` without TUN, no root needed by the
commands) on a real federation: a web server one node exposes, fetched by a peer."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys

from ntm import keys
from tests.test_cli_tunnel import daemons, read_json_line, registered, start_up  # noqa: F401 (fixture)
from tests.test_dc import ntm


def nc(home, peer: str, port: int, data: bytes) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "node.cli", "--home", str(home), "nc", peer, str(port)],
        input=data,
        capture_output=True,
        timeout=60,
    )


def web_server(root) -> tuple[subprocess.Popen, int]:
    """A plain HTTP server on loopback that knows nothing of NTMobile."""
    proc = subprocess.Popen(
        [sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1", "--directory", str(root)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    port = int(re.search(r"port (\d+)", proc.stdout.readline()).group(1))
    return proc, port


async def test_nc_fetches_a_page_that_serve_exposes_and_refusals_say_why(net, tmp_path, daemons):  # noqa: F811
    """A peer fetches 3 MB from an HTTP server another node exposes with `ntm serve` (sha256
    compared). Refused with the reason, exit 1: a port nothing serves, a stranger the serving
    node's allow list does not name, a second `ntm serve` of the same port, and the port again
    once its `ntm serve` was stopped; a non-loopback --to is a usage error (exit 2)."""
    a, a_id = registered(tmp_path, net, "a", 0)
    b, b_id = registered(tmp_path, net, "b", 1)
    stranger, _ = registered(tmp_path, net, "stranger", 0)
    ntm(b, "allow", a_id)
    site = tmp_path / "site"
    site.mkdir()
    page = os.urandom(3_000_000)
    (site / "big.bin").write_bytes(page)
    http, http_port = web_server(site)
    serve = None
    try:
        for home in (a, b, stranger):
            start_up(daemons, home)
        serve = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "node.cli",
                "--home",
                str(b),
                "--json",
                "serve",
                "8080",
                "--to",
                f"127.0.0.1:{http_port}",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        assert read_json_line(serve) == {"ok": True, "port": 8080, "to": f"127.0.0.1:{http_port}"}

        got = nc(a, b_id, 8080, b"GET /big.bin HTTP/1.0\r\n\r\n")
        assert got.returncode == 0, got.stderr
        head, _, body = got.stdout.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 200") and hashlib.sha256(body).digest() == hashlib.sha256(page).digest()
        assert json.loads(serve.stdout.readline()) == {"stream": keys.checksum(keys.parse_node_id(a_id))}

        unserved = nc(a, b_id, 8081, b"")
        assert unserved.returncode == 1 and b"no_service" in unserved.stderr
        refused = nc(stranger, b_id, 8080, b"GET / HTTP/1.0\r\n\r\n")
        assert refused.returncode == 1 and refused.stdout == b"" and b"allow" in refused.stderr, refused.stderr
        twice = ntm(b, "serve", "8080", "--to", f"127.0.0.1:{http_port}", check=False)
        assert twice.returncode == 1 and "already served" in twice.stderr
        lan = ntm(b, "serve", "8082", "--to", "198.18.0.7:80", check=False)
        assert lan.returncode == 2 and "loopback" in lan.stderr

        serve.send_signal(signal.SIGINT)
        assert serve.wait(timeout=15) == 130
        gone = nc(a, b_id, 8080, b"GET / HTTP/1.0\r\n\r\n")
        assert gone.returncode == 1 and b"no_service" in gone.stderr
    finally:
        for proc in (serve, http):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
