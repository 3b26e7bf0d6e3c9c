"""Tiny UDP probe programs run inside lab namespaces (stdlib only, every loop bounded).

    probe.py echo --port P                      reflect: "Q tag [d1,d2..]" -> "SEEN tag ip port",
                                                 then "LATE tag i ip port" after each delay d_i
    probe.py query --to IP:PORT [--to ...] [--port P] [--listen S] [--requery S] [--later d,..]
                                                 one socket; prints "MAPPED dest ip port" per server,
                                                 then "RECV ip port data" for S seconds, then "DONE"
    probe.py send --to IP:PORT [--count N] [--data X]
    probe.py rendezvous --port P                 introduce two "REG name peer" clients to each other
    probe.py punch --name A --peer B --rdv IP:PORT [--port P] [--wait S]
                                                 "PUNCH OK ip port" (exit 0) or "PUNCH FAIL" (exit 1)
    probe.py relay --port P                      dual-stack [::] relay pairing "HELLO session" clients
    probe.py relay-client --session S --relay IP:PORT [--count N]
    probe.py stream --to IP:PORT [--secs S]      one wildcard-bound socket sending every 50 ms to an
                                                 echo server; prints "SEEN t ip port" on each change

Addresses: "1.2.3.4:5" or "[2001:db8::1]:5".  Sockets are dual-stack AF_INET6 when any
destination is IPv6 (or for servers), else AF_INET; IPv4-mapped addresses are printed as IPv4.
"""

from __future__ import annotations

import argparse
import heapq
import select
import socket
import sys
import time


def parse_ep(s: str) -> tuple[str, int]:
    host, _, port = s.rpartition(":")
    return host.strip("[]"), int(port)


def norm(addr) -> tuple[str, int]:
    ip = addr[0]
    if ip.startswith("::ffff:"):
        ip = ip[7:]
    return ip, addr[1]


def out(*a) -> None:
    print(*a, flush=True)


def server_socket(port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("::", port))
    return s


def client_socket(dests, port: int = 0) -> socket.socket:
    if any(":" in d[0] for d in dests):
        s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.bind(("::", port))
    else:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("0.0.0.0", port))
    return s


def dest(s: socket.socket, ep: tuple[str, int]):
    if s.family == socket.AF_INET6 and ":" not in ep[0]:
        return ("::ffff:" + ep[0], ep[1])
    return ep


def readable(s: socket.socket, timeout: float) -> bool:
    return bool(select.select([s], [], [], max(0.0, timeout))[0])


# ---------------------------------------------------------------------------- echo / query
def echo(a) -> int:
    s = server_socket(a.port)
    out(f"ECHO listening {a.port}")
    timers: list = []
    end = time.monotonic() + a.secs
    while time.monotonic() < end:
        now = time.monotonic()
        while timers and timers[0][0] <= now:
            _, i, tag, addr = heapq.heappop(timers)
            ip, port = norm(addr)
            s.sendto(f"LATE {tag} {i} {ip} {port}".encode(), addr)
        wait = timers[0][0] - now if timers else 1.0
        if not readable(s, min(wait, 1.0)):
            continue
        data, addr = s.recvfrom(2048)
        f = data.decode(errors="replace").split()
        if len(f) < 2 or f[0] != "Q":
            continue
        ip, port = norm(addr)
        s.sendto(f"SEEN {f[1]} {ip} {port}".encode(), addr)
        if len(f) > 2:
            for i, d in enumerate(f[2].split(",")):
                heapq.heappush(timers, (time.monotonic() + float(d), i, f[1], addr))
    return 0


def query(a) -> int:
    dests = [parse_ep(t) for t in a.to]
    s = client_socket(dests, a.port)
    mapped: dict = {}
    later = f" {a.later}" if a.later else ""
    t0 = time.monotonic()
    try:
        while len(mapped) < len(dests) and time.monotonic() - t0 < a.timeout:
            for i, d in enumerate(dests):
                if i not in mapped:
                    s.sendto(f"Q {i}{later}".encode(), dest(s, d))
            end = time.monotonic() + 0.3
            while readable(s, end - time.monotonic()):
                data, _ = s.recvfrom(2048)
                f = data.decode().split()
                if f[0] == "SEEN" and int(f[1]) not in mapped:
                    mapped[int(f[1])] = (f[2], int(f[3]))
                    out(f"MAPPED {a.to[int(f[1])]} {f[2]} {f[3]}")
    except OSError as e:
        out(f"ERROR {e.strerror or e}")
        return 1
    if len(mapped) < len(dests):
        out("TIMEOUT")
        return 1
    out(f"LOCAL {s.getsockname()[1]}")
    end = time.monotonic() + a.listen
    next_q = time.monotonic() + (a.requery or 1e9)
    while time.monotonic() < end:
        if time.monotonic() >= next_q:
            for i, d in enumerate(dests):
                s.sendto(f"Q {i}".encode(), dest(s, d))
            next_q = time.monotonic() + a.requery
        if readable(s, min(end, next_q) - time.monotonic()):
            data, addr = s.recvfrom(2048)
            ip, port = norm(addr)
            out(f"RECV {ip} {port} {data.decode(errors='replace')}")
    out("DONE")
    return 0


def send(a) -> int:
    d = parse_ep(a.to)
    s = client_socket([d], a.port)
    for _ in range(a.count):
        s.sendto(a.data.encode(), dest(s, d))
        time.sleep(a.gap)
    return 0


# ---------------------------------------------------------------------------- hole punching
def rendezvous(a) -> int:
    s = server_socket(a.port)
    out(f"RDV listening {a.port}")
    waiting: dict = {}  # name -> (addr, peer)
    end = time.monotonic() + a.secs
    while time.monotonic() < end:
        if not readable(s, 1.0):
            continue
        data, addr = s.recvfrom(2048)
        f = data.decode(errors="replace").split()
        if len(f) != 3 or f[0] != "REG":
            continue
        name, peer = f[1], f[2]
        waiting[name] = (addr, peer)
        if peer in waiting and waiting[peer][1] == name:
            pa = waiting.pop(peer)[0]
            waiting.pop(name)
            ip1, p1 = norm(addr)
            ip2, p2 = norm(pa)
            s.sendto(f"PEER {ip2} {p2}".encode(), addr)  # tell both at the same moment
            s.sendto(f"PEER {ip1} {p1}".encode(), pa)
            out(f"INTRO {name} {ip1}:{p1} <-> {peer} {ip2}:{p2}")
    return 0


def punch(a) -> int:
    rdv = parse_ep(a.rdv)
    s = client_socket([rdv], a.port)
    peer = None
    t0 = time.monotonic()
    while peer is None and time.monotonic() - t0 < a.timeout:
        s.sendto(f"REG {a.name} {a.peer}".encode(), dest(s, rdv))
        if readable(s, 0.2):
            data, addr = s.recvfrom(2048)
            f = data.decode(errors="replace").split()
            if f and f[0] == "PEER":
                peer = (f[1], int(f[2]))
    if peer is None:
        out("PUNCH FAIL no introduction")
        return 1
    out(f"INTRO {peer[0]} {peer[1]}")
    got, acked, seq = None, False, 0
    t0 = time.monotonic()
    while time.monotonic() - t0 < a.wait:
        s.sendto(f"PUNCH {a.name} {seq} {'ACK' if got else '-'}".encode(), dest(s, peer))
        seq += 1
        end = time.monotonic() + 0.05
        while readable(s, end - time.monotonic()):
            data, addr = s.recvfrom(2048)
            if data.startswith(b"PUNCH"):
                got = norm(addr)
                acked = acked or data.endswith(b"ACK")
        if got and acked:
            for _ in range(3):
                s.sendto(f"PUNCH {a.name} {seq} ACK".encode(), dest(s, got))
            out(f"PUNCH OK {got[0]} {got[1]}")
            return 0
    out(f"PUNCH FAIL got={got}")
    return 1


# ---------------------------------------------------------------------------- relay
def relay(a) -> int:
    s = server_socket(a.port)
    out(f"RELAY listening {a.port}")
    sessions: dict = {}
    peer_of: dict = {}
    end = time.monotonic() + a.secs
    while time.monotonic() < end:
        if not readable(s, 1.0):
            continue
        data, addr = s.recvfrom(4096)
        addr = addr[:2]
        if data.startswith(b"HELLO "):
            members = sessions.setdefault(data.split()[1], [])
            if addr not in members:
                members.append(addr)
                out(f"MEMBER {data.split()[1].decode()} {norm(addr)[0]} {addr[1]}")
            if len(members) == 2:
                peer_of[members[0]], peer_of[members[1]] = members[1], members[0]
                for m in members:
                    s.sendto(b"READY", m)
        elif addr in peer_of:
            s.sendto(data, peer_of[addr])
    return 0


def relay_client(a) -> int:
    r = parse_ep(a.relay)
    s = client_socket([r])
    ready = False
    t0 = time.monotonic()
    while not ready and time.monotonic() - t0 < a.timeout:
        s.sendto(f"HELLO {a.session}".encode(), dest(s, r))
        if readable(s, 0.2):
            ready = s.recvfrom(4096)[0] == b"READY"
    if not ready:
        out("RELAY FAIL not paired")
        return 1
    got: set = set()
    t0 = time.monotonic()
    i = 0
    while time.monotonic() - t0 < a.timeout and len(got) < a.count:
        # keep sending (bounded) until the peer confirms; READY may still arrive late
        s.sendto(f"DATA {a.name} {i % a.count}".encode(), dest(s, r))
        i += 1
        end = time.monotonic() + 0.05
        while readable(s, end - time.monotonic()):
            d = s.recvfrom(4096)[0].decode(errors="replace")
            if d.startswith("DATA") and not d.startswith(f"DATA {a.name} "):
                got.add(d)
    # linger so the peer can finish too
    end = time.monotonic() + 0.5
    while time.monotonic() < end:
        s.sendto(f"DATA {a.name} {i % a.count}".encode(), dest(s, r))
        i += 1
        time.sleep(0.05)
    out(f"RELAY {'OK' if len(got) == a.count else 'FAIL'} {len(got)}/{a.count}")
    return 0 if len(got) == a.count else 1


# ---------------------------------------------------------------------------- mobility
def stream(a) -> int:
    d = parse_ep(a.to)
    s = client_socket([d])  # wildcard-bound, never connect()ed
    out(f"LOCAL {s.getsockname()[1]}")
    t0 = time.monotonic()
    seq = sent = recv = 0
    last = None
    while time.monotonic() - t0 < a.secs:
        try:
            s.sendto(f"Q {seq}".encode(), dest(s, d))
            sent += 1
        except OSError as e:
            out(f"ERR {time.monotonic() - t0:.2f} {e.strerror}")
        seq += 1
        end = time.monotonic() + a.interval
        while readable(s, end - time.monotonic()):
            try:
                f = s.recv(2048).decode().split()
            except OSError:
                continue
            recv += 1
            if f[0] == "SEEN" and (f[2], f[3]) != last:
                last = (f[2], f[3])
                out(f"SEEN {time.monotonic() - t0:.2f} {f[2]} {f[3]}")
    out(f"END {sent} {recv}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("echo")
    e.add_argument("--port", type=int, required=True)
    e.add_argument("--secs", type=float, default=300)
    q = sub.add_parser("query")
    q.add_argument("--to", action="append", required=True)
    q.add_argument("--port", type=int, default=0)
    q.add_argument("--listen", type=float, default=0)
    q.add_argument("--requery", type=float, default=0)
    q.add_argument("--later", default="")
    q.add_argument("--timeout", type=float, default=5)
    sd = sub.add_parser("send")
    sd.add_argument("--to", required=True)
    sd.add_argument("--port", type=int, default=0)
    sd.add_argument("--count", type=int, default=5)
    sd.add_argument("--data", default="HELLO")
    sd.add_argument("--gap", type=float, default=0.05)
    r = sub.add_parser("rendezvous")
    r.add_argument("--port", type=int, required=True)
    r.add_argument("--secs", type=float, default=300)
    pu = sub.add_parser("punch")
    pu.add_argument("--name", required=True)
    pu.add_argument("--peer", required=True)
    pu.add_argument("--rdv", required=True)
    pu.add_argument("--port", type=int, default=0)
    pu.add_argument("--wait", type=float, default=3)
    pu.add_argument("--timeout", type=float, default=5)
    rl = sub.add_parser("relay")
    rl.add_argument("--port", type=int, required=True)
    rl.add_argument("--secs", type=float, default=300)
    rc = sub.add_parser("relay-client")
    rc.add_argument("--name", required=True)
    rc.add_argument("--session", required=True)
    rc.add_argument("--relay", required=True)
    rc.add_argument("--count", type=int, default=5)
    rc.add_argument("--timeout", type=float, default=5)
    st = sub.add_parser("stream")
    st.add_argument("--to", required=True)
    st.add_argument("--secs", type=float, default=5)
    st.add_argument("--interval", type=float, default=0.05)
    a = p.parse_args(argv)
    fn = {
        "echo": echo,
        "query": query,
        "send": send,
        "rendezvous": rendezvous,
        "punch": punch,
        "relay": relay,
        "relay-client": relay_client,
        "stream": stream,
    }[a.cmd]
    return fn(a)


if __name__ == "__main__":
    sys.exit(main())
