"""Scenario: an attacker on the path between nodes and their DCs (issue 29 item 1, PROTOCOL §5
"Threat model per channel"), used by tests/lab/test_lab_onpath.py and bench/abuse.py.

Site A's NAT router is the attacker's: an iptables REDIRECT hands every TCP connection from A's
LAN to a DC port to a transparent proxy there (labkit/lab/mitm.py) that keeps what it relays,
injects bytes and rewrites a bit. A (at DC1: TLS bound to DC1's chain key, the default) and C
(at DC2, started with --insecure-plain-http: the control, showing that the attacker does read
what is sent in clear) both sit behind it; B sits at another site. A opens a relayed tunnel to B
(so the relay's side key crosses A's channel too); the attacker then:
  1. searches what it relayed for A's keepalive token and relay side key (and C's, the control);
  2. injects into A's (and C's) DC→node stream a WebSocket frame carrying a Route Direction that
     aims Tunnel Requests at its UDP lure;
  3. flips one bit of A's DC→node stream.
A's TLS refuses the injected and the rewritten records (its session ends and comes back), A never
sends to the lure, and A still opens a working tunnel to B through the same attacker.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

from ntm import envelope, keys, messages
from labkit.lab.topology import expect

from .fed import DC_BASE_PORT, ROOT, Federation, dc_address
from .roam_udp import wait_for

MITM_PORT = 9080  # the proxy's port in the router namespace
LURE_PORT = 9999  # where injected directions aim the node (UDP, in the router namespace)
SESSION_BACK_S = 20.0  # a dropped session reconnects after a back-off of a few seconds


def ws_text_frame(obj: dict) -> bytes:
    """A server→client WebSocket text frame (unmasked, RFC 6455 §5.2) carrying `obj`."""
    data = json.dumps(obj).encode()
    head = bytes([len(data)]) if len(data) < 126 else bytes([126]) + len(data).to_bytes(2, "big")
    return b"\x81" + head + data


def forged_direction(victim: str, peer: str, peer_pubkey: str, lure: str) -> dict:
    """A session frame with a Route Direction aiming `victim`'s Tunnel Requests at `lure`, signed
    by a key of the attacker's own (no DC key: that it cannot have)."""
    body = messages.encode(
        messages.RouteDirection(
            "ab" * 8, "direct", "lure", "initiate", victim, dc_address(0), peer, peer_pubkey, peer, [lure]
        )
    )  # type: ignore[arg-type]
    return {
        "type": "direction",
        "direction": envelope.seal(keys.generate(), messages.ROUTE_DIRECTION, body, int(time.time() * 1000)),
    }


class Attacker:
    """The proxy in `site`'s router, and what it is told."""

    def __init__(self, fed: Federation, site) -> None:
        self.lab, self.site = fed.lab, site
        for i in range(len(fed.dcs)):
            self.lab.redirect_port(site, DC_BASE_PORT + i, MITM_PORT)
        self.proc = self.lab.run(
            site,
            [sys.executable, "-m", "labkit.lab.mitm", "--port", str(MITM_PORT), "--lure-port", str(LURE_PORT)],
            stdin=subprocess.PIPE,
            cwd=str(ROOT),
            stderr=open(fed.workdir / "mitm.log", "ab"),
        )
        expect(self.proc, r'"event": "ready"', timeout=15)

    def call(self, **m) -> dict:
        self.proc.stdin.write(json.dumps(m) + "\n")
        self.proc.stdin.flush()
        return json.loads(expect(self.proc, r"^\{.*\}$", timeout=10).string)

    @property
    def lure(self) -> str:
        return f"{self.site.router.gw4}:{LURE_PORT}"

    def stop(self) -> None:
        self.lab.kill(self.proc)


def sessions(node) -> int:
    return node.call("status")["sessions"]


def on_path(fed: Federation, quick: bool = False) -> dict:
    """Run the scenario on `fed` (DC2 plain: Federation(plain=(1,))); returns what was measured.
    `quick`: no bit flip (the injection already shows a rewritten stream refused)."""
    lab = fed.lab
    site_a, site_b = lab.add_site("oa", "eim"), lab.add_site("ob", "eim")
    host_c = lab.add_host("oc", site_a)
    attacker = Attacker(fed, site_a)
    try:
        a, b, c = fed.node(site_a.host, dc=0), fed.node(site_b.host, dc=1), fed.node(host_c, dc=1)
        ta = a.call("connect", peer=b.id, relay=True)
        b.next_event("accepted", tunnel=ta["tunnel"])
        a.call("exchange", tunnel=ta["tunnel"], count=2)
        sa, sc = a.call("secrets"), c.call("secrets")
        secrets = [sa["token"], *sa["relay_keys"]]
        control = [sc["token"]]
        seen = attacker.call(cmd="search", secrets=secrets + control)
        r = {
            "relayed_bytes": seen["bytes"],
            "connections": seen["connections"],
            "relay_keys": len(sa["relay_keys"]),
            "secrets_in_clear": sum(seen["found"][s] for s in secrets),
            "plain_control_secrets_seen": sum(seen["found"][s] for s in control),
        }

        before = sessions(a)
        pub_b = keys.public_bytes(keys.generate()).hex()  # any key: the signer is what is refused first
        for port, victim in ((DC_BASE_PORT, a), (DC_BASE_PORT + 1, c)):
            frame = ws_text_frame(forged_direction(victim.id, b.id, pub_b, attacker.lure))
            r[f"injected_into_{victim.name}"] = attacker.call(cmd="inject", port=port, payload=frame.hex())[
                "injected_into"
            ]
        r["session_back_after_injection"] = bool(wait_for(lambda: sessions(a) > before, SESSION_BACK_S))
        if not quick:
            before = sessions(a)
            attacker.call(cmd="flip", port=DC_BASE_PORT)
            r["session_back_after_flip"] = bool(wait_for(lambda: sessions(a) > before, SESSION_BACK_S))
            r["flipped"] = attacker.call(cmd="search", secrets=[])["flipped"]

        t2 = a.call("connect", peer=b.id)  # the node still works, through the same attacker
        b.next_event("accepted", tunnel=t2["tunnel"])
        r["works_after"] = len(a.call("exchange", tunnel=t2["tunnel"], count=2)["rtt_ms"]) == 2
        time.sleep(0.5)  # anything sent because of the injection has reached the lure by now
        r["injected_directions_acted_on"] = attacker.call(cmd="search", secrets=[])["lured"]
        for n in (a, b, c):
            n.quit()
        return r
    finally:
        attacker.stop()
