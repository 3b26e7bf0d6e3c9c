"""Split DNS without systemd-resolved, for real (node/splitdns.py, README "Names"): the system
resolver (glibc, `getent`) in a namespace whose /etc/resolv.conf is the README's fallback, the
daemon's own DNS responder on the loopback address, a previous nameserver after it.

The hostile conditions: a daemon that is down or was killed without a word (its resolver gone
while resolv.conf still names it) must neither break other names nor make lookups wait for a
timeout; the control case (the old advice, a TUN address that the default route sends out into
nothing) shows the wait the loopback address avoids.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from node.splitdns import LOOPBACK_DNS

import labkit.lab
from labkit.lab.topology import NETNS_ETC

LAB_DIR = os.path.dirname(labkit.lab.__file__)
UPSTREAM = "127.0.0.54"
TIMEOUT_S = 3  # resolv.conf `timeout:` for every case: a lookup that waits for it is a hang
FAST_S = 1.5  # a lookup answered or refused at once, with headroom for a loaded machine


def lookup(host, name: str) -> tuple[int, str, float]:
    t0 = time.monotonic()
    proc = host.exec(["getent", "ahosts", name], timeout=60)
    return proc.returncode, proc.stdout, time.monotonic() - t0


def ready(proc) -> None:
    line = proc.stdout.readline()
    assert line.strip() == "READY", (line, proc.stderr.read() if proc.poll() is not None else "")


@pytest.fixture
def host(lab_env, lab):
    h = lab.add_public_host("dns", v6=False)
    yield h
    (NETNS_ETC / h.ns / "resolv.conf").unlink(missing_ok=True)


def resolv_conf(host, *nameservers: str) -> None:
    d = NETNS_ETC / host.ns
    d.mkdir(parents=True, exist_ok=True)
    (d / "resolv.conf").write_text(
        "".join(f"nameserver {n}\n" for n in nameservers) + f"options timeout:{TIMEOUT_S} attempts:1\n"
    )


def test_other_names_resolve_while_the_daemon_runs_and_after_it_dies(lab, host):
    resolv_conf(host, LOOPBACK_DNS[0], UPSTREAM)  # the README's fallback, before the previous nameserver
    upstream = lab.python(host, os.path.join(LAB_DIR, "dnsfallback.py"), "upstream", "--listen", UPSTREAM)
    ready(upstream)
    daemon = lab.python(host, os.path.join(LAB_DIR, "dnsfallback.py"), "daemon")
    ready(daemon)

    code, out, took = lookup(host, "bob.ntm")
    assert code == 0 and "100.64.0.2" in out and "fd6e:746d::b0b" in out, out
    code, out, took = lookup(host, "example.test")  # refused by the daemon: glibc asks the next one
    assert code == 0 and "192.0.2.7" in out and took < FAST_S, (out, took)

    os.killpg(daemon.pid, signal.SIGKILL)  # down without a word: resolv.conf still names it
    daemon.wait(10)
    code, out, took = lookup(host, "example.test")
    assert code == 0 and "192.0.2.7" in out and took < FAST_S, (out, took)
    code, out, took = lookup(host, "bob.ntm")
    assert code != 0 and took < FAST_S, (out, took)  # not found, at once


def test_control_a_tun_address_as_nameserver_makes_lookups_wait(lab, host):
    """The old advice (`nameserver 100.64.0.1`) with no daemon: the query is routed out and lost."""
    resolv_conf(host, "100.64.0.1", UPSTREAM)
    upstream = lab.python(host, os.path.join(LAB_DIR, "dnsfallback.py"), "upstream", "--listen", UPSTREAM)
    ready(upstream)
    code, out, took = lookup(host, "example.test")
    assert code == 0 and "192.0.2.7" in out and took >= TIMEOUT_S * 0.9, (out, took)
