"""labkit's sweep of stale lab namespaces: what a killed test or bench left (its lab's namespaces,
or the availability probe's) is removed at the next lab start; a live process's are kept."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from labkit.lab.topology import NS_PREFIX, sweep_stale

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None, reason="network namespaces need root and iproute2"
)


def test_a_killed_processs_probe_namespace_is_swept_and_a_live_ones_kept():
    """Hostile condition: a process killed between creating the lab probe's namespace and deleting
    it (seen: one left for a day, as the sweep matched only lab namespaces)."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale, live = f"{NS_PREFIX}{dead.pid}-probe7", f"{NS_PREFIX}{os.getpid()}-probe7"
    for ns in (stale, live):
        subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        removed = sweep_stale()
        names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert stale in removed and live not in removed
        assert stale not in names and live in names
    finally:
        for ns in (stale, live):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
