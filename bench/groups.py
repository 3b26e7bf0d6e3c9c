"""Group keys (docs/PROTOCOL.md §13) (~90 s).

Prints one `metric: value` line per figure:
  group_rekey_ms_<n>            one removal in an n-member group (n = 10, 100, 1000), every party's
                                work in one process, end to end: the admin makes RN1 and asks the
                                GMS (real GroupService on a SQLite file); each remaining member asks
                                the GMS for its new RN2 (a signed request; the GMS checks it and wraps
                                RN2 to that member) and unwraps it; the admin wraps the new RN1 to each
                                member (as for a sealed Cache Server item) and each unwraps it and
                                derives the epoch's key. Median of 3.
  group_rekey_gms_ms_<n>        of which the GMS's part
  group_send_fanout_ms_p50      `group.send` on a member's daemon to 9 others, all daemons real
                                processes (`ntm up`) at one DC on loopback: GMS refresh, seal, sent
                                over 9 tunnels and acknowledged by all; p50 of 20 (tunnels warm)
  group_send_fanout_ms_p90
`--quick`: only n = 10, one rekey round, 3 members' daemons and 3 sends: the same code paths
(make test).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dc.groups import GroupService  # noqa: E402
from labkit import nodeproc  # noqa: E402
from node import control  # noqa: E402
from node.peers import PeerBook  # noqa: E402
from ntm import envelope, group, keys  # noqa: E402
from ntm.clock import SYSTEM  # noqa: E402
from labkit.dcnet import cs_federation  # noqa: E402

SIZES = (10, 100, 1000)
REKEY_ROUNDS = 3
FANOUT_MEMBERS = 10
FANOUT_SENDS = 20


def signed(key, kind: str, **body) -> dict:
    return envelope.seal(key, kind, body, SYSTEM.wall_ms())


def rekey_ms(n: int, workdir: Path, rounds: int = REKEY_ROUNDS) -> tuple[float, float]:
    """(total ms, GMS ms) of removing one member from an n-member group; median of `rounds`."""
    db = sqlite3.connect(workdir / f"gms-{n}.sqlite", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    svc = GroupService(db, lambda node: (1, False), SYSTEM)
    admin = keys.generate()
    gid = group.new_gid()
    svc.handle(signed(admin, "group.create", gid=gid.hex(), name="bench"))

    def join() -> keys.coincurve.PrivateKey:  # set-up, not timed
        m = keys.generate()
        svc.handle(signed(admin, "group.invite", gid=gid.hex(), node=keys.checksum(keys.node_id_of(m))))
        svc.handle(signed(m, "group.accept", gid=gid.hex()))
        return m

    members = [join() for _ in range(n - 1)]  # n with the admin
    gen, totals, gms_parts = 1, [], []
    for _ in range(rounds):
        leaving, members = members[0], members[1:]
        t0 = time.perf_counter()
        gen += 1
        rn1 = group.new_rn()
        view = svc.handle(
            signed(admin, "group.remove", gid=gid.hex(), node=keys.checksum(keys.node_id_of(leaving)), rn1_gen=gen)
        )
        epoch = view["epoch"]
        gms = 0.0
        for m in members:
            t = time.perf_counter()
            answer = svc.handle(signed(m, "group.state", gid=gid.hex(), since=epoch))
            gms += time.perf_counter() - t
            rn2 = group.unwrap_secret(m, bytes.fromhex(answer["epochs"][-1]["rn2"]), gid, epoch)
            wrapped = group.wrap_secret(rn1, keys.public_bytes(m), gid, epoch)  # the admin's RN1, end to end
            gk = group.group_key(group.unwrap_secret(m, wrapped, gid, epoch), rn2, gid, "bench", epoch)
            assert len(gk) == 32
        totals.append((time.perf_counter() - t0) * 1000)
        gms_parts.append(gms * 1000)
        members.append(join())
    db.close()
    return statistics.median(totals), statistics.median(gms_parts)


async def fanout(workdir: Path, members: int = FANOUT_MEMBERS, sends: int = FANOUT_SENDS) -> list[float]:
    async with cs_federation(workdir) as net:
        homes = [workdir / f"m{i}" for i in range(members)]

        async def member(home: Path) -> str:
            nid = (await asyncio.to_thread(nodeproc.ntm, home, "keygen", timeout=120))["node"]
            await asyncio.to_thread(nodeproc.ntm, home, "register", *net.dc_args(0), timeout=120)
            return nid

        ids = await asyncio.gather(*(member(h) for h in homes))
        for h in homes[1:]:  # the members consent to the admin's invitation (PROTOCOL §12.1): it is on their allow list
            book = PeerBook.load(h)
            book.allow.add(keys.parse_node_id(ids[0]))
            book.save(h)
        procs = [nodeproc.start_up(h, stderr=subprocess.DEVNULL) for h in homes]
        try:
            for p in procs:
                json.loads(await asyncio.to_thread(p.stdout.readline))
            admin = homes[0]
            gid = (await control.call(admin, "group.create", {"name": "fanout"}))["gid"]
            for nid in ids[1:]:
                await control.call(admin, "group.invite", {"group": gid, "node": nid})
            for h in homes[1:]:
                while not any(g["gid"] == gid for g in (await control.call(h, "group.members", {}))["groups"]):
                    await asyncio.sleep(0.2)
                await control.call(h, "group.accept", {"group": gid})
            sender = homes[1]
            await control.call(sender, "group.send", {"group": gid, "text": "warm-up"}, timeout=60)  # opens tunnels
            times = []
            for i in range(sends):
                t0 = time.perf_counter()
                res = await control.call(sender, "group.send", {"group": gid, "text": f"message {i}"}, timeout=60)
                times.append((time.perf_counter() - t0) * 1000)
                if len(res["tunnel"]) != members - 1:
                    raise SystemExit(f"not every member acknowledged over its tunnel: {res}")
            return times
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(15)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, same code paths (CI)")
    quick = ap.parse_args().quick
    sizes, rounds, members, sends = ((10,), 1, 3, 3) if quick else (SIZES, REKEY_ROUNDS, FANOUT_MEMBERS, FANOUT_SENDS)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for n in sizes:
            total, gms = rekey_ms(n, work, rounds)
            print(f"group_rekey_ms_{n}: {total:.1f}", flush=True)
            print(f"group_rekey_gms_ms_{n}: {gms:.1f}", flush=True)
        times = asyncio.run(fanout(work / "fanout", members, sends))
        q = statistics.quantiles(times, n=10)
        print(f"group_send_fanout_ms_p50: {statistics.median(times):.1f}")
        print(f"group_send_fanout_ms_p90: {q[8]:.1f}")


if __name__ == "__main__":
    os.environ.setdefault("NTM_PASSPHRASE", "")
    main()
