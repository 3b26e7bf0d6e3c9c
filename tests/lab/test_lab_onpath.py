"""An attacker on the path between a node and its DC (issue 29 item 1, PROTOCOL §5): a transparent
proxy in the node's NAT router (real namespaces, DCs, relay and node processes) that reads every
byte, injects a Route Direction into the node's session and flips a bit of it. The control is a
node at a DC served in clear (--insecure-plain-http) behind the same attacker: its keepalive
token is read, so the search would find A's secrets if they crossed in clear.
"""

from __future__ import annotations

import pytest

from labkit.lab.fed import Federation
from labkit.lab.onpath import on_path

pytestmark = pytest.mark.lab


def test_an_on_path_attacker_reads_nothing_and_injects_nothing(lab_shared, tmp_path_factory):
    with Federation(lab_shared, tmp_path_factory.mktemp("onpath"), n_dcs=2, plain=(1,)) as fed:
        r = on_path(fed)
    print(f"\non-path attacker: {r}")
    assert r["connections"] >= 2 and r["relayed_bytes"] > 10_000  # it really was on the path
    assert r["relay_keys"] >= 1  # a relay side key did cross A's channel
    assert r["plain_control_secrets_seen"] >= 1  # in clear it reads the token: the search works
    assert r["secrets_in_clear"] == 0
    assert r["injected_into_oa"] >= 1 and r["injected_into_oc"] >= 1
    assert r["session_back_after_injection"] and r["session_back_after_flip"] and r["flipped"] == 1
    assert r["injected_directions_acted_on"] == 0
    assert r["works_after"]
