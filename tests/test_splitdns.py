"""Split DNS with systemd-resolved (node/splitdns.py), on a fake runner: `ntm up` registers its
resolver for `~ntm` only on its TUN link, undoes it on stop, and a resolvectl that refuses (no
D-Bus, a stuck resolved) leaves the daemon running on the documented fallback, never half set up.
tests/lab/test_lab_dns.py runs the fallback for real."""

from __future__ import annotations

import pytest

from node import splitdns
from node.splitdns import SplitDns, SplitDnsError

SERVERS = ["100.64.0.1", "fd6e:746d::1"]


class FakeRunner:
    def __init__(self, fail_on: str | None = None) -> None:
        self.calls: list[list[str]] = []
        self.fail_on = fail_on

    def __call__(self, argv: list[str]) -> None:
        self.calls.append(argv)
        if argv[1] == self.fail_on:
            raise SplitDnsError(f"{' '.join(argv)}: Failed to set DNS configuration: Access denied")


def test_registers_only_ntm_on_the_tun_link_and_reverts_on_stop():
    run = FakeRunner()
    split = SplitDns("ntm0", SERVERS, run, resolved=True)
    assert split.register() == "systemd-resolved (~ntm on ntm0)"
    assert run.calls == [["resolvectl", "dns", "ntm0", *SERVERS], ["resolvectl", "domain", "ntm0", "~ntm"]]
    split.revert()
    split.revert()  # a second stop changes nothing
    assert run.calls[2:] == [["resolvectl", "revert", "ntm0"]]


def test_a_refusing_resolvectl_leaves_nothing_behind_and_falls_back(caplog):
    run = FakeRunner(fail_on="domain")
    split = SplitDns("ntm0", SERVERS, run, resolved=True)
    assert "fallback" in split.register()
    assert run.calls[-1] == ["resolvectl", "revert", "ntm0"]  # the half-done `dns` undone at once
    assert "could not register" in caplog.text and "Traceback" not in caplog.text
    split.revert()
    assert len(run.calls) == 3  # nothing registered: nothing more to undo


def test_without_resolved_nothing_of_the_system_is_touched(caplog):
    run = FakeRunner()
    caplog.set_level("INFO")
    assert SplitDns("ntm0", SERVERS, run, resolved=False).register() == "127.0.0.153 (resolv.conf fallback)"
    assert run.calls == [] and f"nameserver {splitdns.LOOPBACK_DNS[0]}" in caplog.text


def test_the_real_runner_reports_a_missing_resolvectl_as_one_error():
    with pytest.raises(SplitDnsError, match="/nonexistent/resolvectl"):
        splitdns.resolvectl(["/nonexistent/resolvectl", "status"])
