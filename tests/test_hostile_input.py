"""Issue 29 item 7: what an outsider's malformed JSON gets from the DC, the RS and the Cache Server
(real processes on loopback): a 400 before any work, and no traceback in their logs."""

from __future__ import annotations

import time


from ntm import envelope, keys, messages
from labkit.dcnet import cs_federation, raw_http, register

DEEP = "[" * 5000 + "]" * 5000  # 10 kB, within the body caps; Python's parser gives up near 1,000 levels
HUGE = 2**64  # one past uint64: the record timestamp that gave a 500


def register_body(timestamp: int) -> str:
    """A Registration Request shaped like a real one, with `timestamp` as given (JSON text:
    the integer is written out whatever its size)."""
    node = keys.checksum(keys.node_id_of(keys.generate()))
    return (
        '{"record": {"node": "%s", "dc": "%s", "timestamp": %d, "revoked": false}, "signature": "%s", '
        '"pubkey": "%s", "local_addrs": []}' % (node, node, timestamp, "00" * 65, "04" + "00" * 64)
    )


async def test_out_of_range_integers_and_deep_json_are_refused_with_400_and_no_traceback(tmp_path):
    """Outsider: record.timestamp = 2^64, 2^63−1 and −1, deep JSON bodies, a deep JSON auth
    header, an envelope with ts = 2^64, and a deep first session frame, to the DC, the RS and
    the CS. Each gets a 400 (or a session refusal) and a one-line JSON error; no log holds a
    traceback; a genuine registration right after still succeeds."""
    async with cs_federation(tmp_path) as net:
        rs = net.start_rs()
        dc, cs, rs_url = net.urls[0], net.cs_url(0), rs.ready["http"]
        stale_env = envelope.seal(keys.generate(), "cs.list", {}, int(time.time() * 1000))
        big_ts = envelope.canonical(stale_env).decode().replace(f'"ts":{stale_env["ts"]}', f'"ts":{HUGE}')
        cases = [
            ("POST", dc + "/v1/register", register_body(HUGE), {}),
            ("POST", dc + "/v1/register", register_body(2**63 - 1), {}),  # fits 64 bits, far future
            ("POST", dc + "/v1/register", register_body(-1), {}),
            ("POST", dc + "/v1/register", DEEP, {}),
            ("POST", dc + "/v1/federation/ntm-info", DEEP, {}),
            ("POST", dc + "/v1/federation/route-direction", '{"ts": %d}' % HUGE, {}),
            ("POST", dc + "/v1/exit-bookings", DEEP, {}),
            ("POST", dc + "/v1/exit-bookings", big_ts, {}),
            ("POST", rs_url + "/v1/relay-directions", DEEP, {}),
            ("POST", rs_url + "/v1/relay-directions", big_ts, {}),
            ("POST", rs_url + messages.RELAY_BATCH_PATH, DEEP, {}),
            ("POST", rs_url + messages.RELAY_BATCH_PATH, big_ts, {}),
            ("POST", cs + "/v1/inbox", DEEP, {}),
            ("POST", cs + "/v1/inbox", big_ts, {}),
            ("PUT", cs + "/v1/items", "x", {"X-NTM-Auth": "[" * 4000 + "]" * 4000}),
        ]
        got = []
        async with raw_http() as http:
            for method, url, body, headers in cases:
                async with http.request(
                    method, url, data=body.encode(), headers={"Content-Type": "application/json", **headers}
                ) as r:
                    answer = await r.json()
                    got.append((r.status, answer["error"]))
            async with http.ws_connect(dc + "/v1/session") as ws:
                await ws.receive_json()  # the challenge
                await ws.send_str("[" * 2000 + "]" * 2000)  # within the frame size cap
                refusal = await ws.receive_json()
        print("\n" + "\n".join(f"{m} {u.split('/', 3)[3]}: {s} {e}" for (m, u, _, _), (s, e) in zip(cases, got)))
        assert all(s == 400 for s, _ in got), got
        assert refusal["type"] == "error" and refusal["error"] == "auth_failed"
        await register(dc, keys.generate())  # the legitimate party is still served
        logs = {p.name: p.read_text() for p in (tmp_path / "dc1.log", tmp_path / "dc1-cs.log", tmp_path / "rs.log")}
        assert not [name for name, text in logs.items() if "Traceback" in text]
