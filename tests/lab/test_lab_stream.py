"""Streams of embedded nodes (node/api.py: no daemon, no TUN) through real NATs in namespaces."""

from __future__ import annotations

import pytest

from labkit.lab.fed import Federation
from labkit.lab.roam_stream import stream_move

KEEPALIVE_S = 2.0
MOVE_BYTES = 8_000_000
#: A move NAT→NAT is repaired in about a second here (PROTOCOL §8.3); generous on a loaded box.
STALL_BOUND_S = 10.0


@pytest.fixture(scope="module")
def fed(lab_shared, tmp_path_factory):
    with Federation(lab_shared, tmp_path_factory.mktemp("streamfed"), n_dcs=2, keepalive_s=KEEPALIVE_S) as f:
        yield f


def test_a_stream_survives_a_move_nat_to_nat(fed):
    """Hostile network change: the sender's host leaves its NAT for another one mid-stream (new
    address, new NAT mapping; the old path goes dead without a word). The same QUIC stream, inside
    the tunnel that roams or is re-directed under it, delivers every byte in order."""
    lab = fed.lab
    lab.add_site("sm2", "eim")
    r = stream_move(fed, lab.add_site("sm1", "eim").host, lab.add_site("smp", "eim").host, "sm2", MOVE_BYTES)
    print(
        f"\nstream across a move NAT → NAT: intact {r['intact']}, stall {r['max_stall_s']:.2f} s, "
        f"{r['bytes']} bytes in {r['elapsed_s']:.1f} s"
    )
    assert r["intact"]
    assert r["max_stall_s"] < STALL_BOUND_S
