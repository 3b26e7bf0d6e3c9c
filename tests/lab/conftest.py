"""Fixtures for the NAT lab (tests/lab).

* Every test collected under tests/lab gets ``pytest.mark.lab``.
* ``lab_env`` (session): skips with a clear reason when not root, when ``ip netns`` does not
  work, or when iptables / conntrack are missing; sweeps namespaces left by dead runs.
* ``lab`` (function): a fresh ``topology.Lab`` (internet bridge + ``lab.server``), always torn
  down after the test, pass or fail.  Building takes ~0.1 s plus ~0.05 s per site.
* ``lab_shared`` (module): one Lab for a whole test module (for expensive setups such as a
  chain + DCs); tests must then not depend on each other's sites.
* ``probe``: a function ``probe(ns, *args, **popen_kw)`` starting ``labkit/lab/probe.py`` in a
  namespace with the venv interpreter.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

import pytest

import labkit.lab
from labkit.lab.topology import Lab, lab_available, sweep_stale

PROBE = os.path.join(os.path.dirname(labkit.lab.__file__), "probe.py")
_HERE = os.path.dirname(os.path.abspath(__file__))


def pytest_collection_modifyitems(config, items):
    for item in items:
        if str(item.fspath).startswith(_HERE + os.sep):
            item.add_marker(pytest.mark.lab)


@pytest.fixture(scope="session")
def lab_env():
    reason = lab_available()
    if reason:
        pytest.skip(reason)
    sweep_stale()
    # SIGTERM (CI timeout, kill PID) would skip atexit: turn it into KeyboardInterrupt so the
    # fixtures' finally blocks tear the namespaces down.
    old = None
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:

        def _term(signum, frame):
            raise KeyboardInterrupt("SIGTERM")

        old = signal.signal(signal.SIGTERM, _term)
    yield True
    if old is not None:
        signal.signal(signal.SIGTERM, old)


@pytest.fixture
def lab(lab_env):
    lab = Lab()
    try:
        yield lab
    finally:
        lab.teardown()


@pytest.fixture(scope="module")
def lab_shared(lab_env):
    lab = Lab()
    try:
        yield lab
    finally:
        lab.teardown()


@pytest.fixture
def probe(lab):
    def start(ns, *args, **popen_kw):
        return lab.run(ns, [sys.executable, PROBE, *map(str, args)], **popen_kw)

    return start
