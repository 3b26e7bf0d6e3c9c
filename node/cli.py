"""`ntm`: the node's command line. Human-readable output by default, `--json` for scripts.

This module parses arguments and reports errors (node/output.py has the exit codes); it imports
nothing heavy, so `ntm --help` and `ntm id` start at once. The commands themselves are in
node/commands.py, imported only when one runs.
"""

from __future__ import annotations

import daemon.ctrl_c  # noqa: F401 (first: Ctrl-C during the imports below is one line, exit 130)
import argparse
import ipaddress
import os
import signal
import sys
import threading
from pathlib import Path

from daemon import startup
from node import state
from node.output import INTERNAL, INTERRUPTED, USAGE, CliError, fail, show_id

LOG_LEVELS = ("debug", "info", "warning", "error")


class Parser(argparse.ArgumentParser):
    """Usage errors as one line (and exit code 2) like every other error, JSON with --json."""

    def error(self, message: str):
        raise CliError(f"{message} (see `{self.prog} --help`)", USAGE)

    def parse_known_args(self, args=None, namespace=None):
        """Options anywhere on a subcommand's line (`ntm send bob --offline "text"`): a parser
        without subcommands of its own reads its options first, then its positionals
        (argparse's intermixed mode, which refuses parsers that have subcommands)."""
        if self._subparsers is not None or getattr(self, "_intermixing", False):
            return super().parse_known_args(args, namespace)
        self._intermixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


def version() -> str:
    from importlib.metadata import PackageNotFoundError, version as dist_version

    try:
        return dist_version("ntmobile")
    except PackageNotFoundError:
        return "unknown"


def positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"expected seconds in (0, 3600], got {text!r}")
    return value


def dns_bind(text: str) -> tuple[str, int]:
    """--dns HOST:PORT (argparse type)."""
    host, _, port = text.rpartition(":")
    try:
        ipaddress.ip_address(host.strip("[]"))
        p = int(port)
        if not 0 < p < 65536:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected IP:PORT, got {text!r}") from None
    return host.strip("[]"), p


def dc_channel_arguments(s: argparse.ArgumentParser) -> None:
    """How a DC given by --dc is authenticated (docs/PROTOCOL.md §5)."""
    s.add_argument(
        "--dc-address",
        metavar="ADDRESS",
        help="the DC's chain address, which its TLS certificate must be bound to (needed for a DC this "
        "node does not know yet; ask its operator)",
    )
    startup.insecure_arg(s, "allow a plain http:// DC", "tokens and keys")


class LazyVersion(argparse._VersionAction):
    """--version, looked up only when asked: importlib.metadata costs every other command ~20 ms."""

    def __call__(self, parser, namespace, values, option_string=None):
        self.version = f"%(prog)s {version()}"
        super().__call__(parser, namespace, values, option_string)


def global_options(p: Parser) -> None:
    """The options before the command (parser() and status_args() alike)."""
    p.add_argument("--home", type=Path, help="node directory (default $NTM_HOME or ~/.ntm)")
    p.add_argument("--json", action="store_true", help="machine-readable output (anywhere on the line; errors too)")
    p.add_argument("-v", "--verbose", action="store_true", help="log what happens (debug level) on stderr")
    p.add_argument("--log-level", choices=LOG_LEVELS, help="log level on stderr (default: warning; `ntm up`: info)")
    p.add_argument(
        "--timeout",
        type=positive,
        default=state.DC_TIMEOUT_S,
        metavar="S",
        help=f"how long to wait for a DC's answer (default {state.DC_TIMEOUT_S:.0f})",
    )
    p.add_argument(
        "--password-file",
        type=Path,
        metavar="PATH",
        help=f"read the key's passphrase from this file (else ${state.PASSPHRASE_ENV}, else a prompt on a terminal)",
    )


def status_args(argv: list[str]) -> argparse.Namespace | None:
    """A plain `ntm [OPTIONS] status` line, read without building every subcommand (parser() costs
    the status fast path most of its time: argparse's gettext look-ups, the defaults' imports);
    None for any other line, which parser() then reads. The same options without abbreviations or
    --help/--version, so whatever this accepts parser() reads the same way."""
    p = Parser(prog="ntm", add_help=False, allow_abbrev=False)
    global_options(p)
    p.add_subparsers(dest="command", required=True).add_parser("status", add_help=False).set_defaults(cmd="status")
    try:
        args, rest = p.parse_known_args(argv)
    except CliError:
        return None
    return None if rest else args


def parser() -> Parser:
    """Every command. The subcommands' defaults are imported here: `ntm status` never builds this."""
    from daemon import startup
    from ntm.keepalive import KEEPALIVE_INTERVAL_S
    from ntm.vaddr import PATH_MTU, V4_NET

    p = Parser(
        prog="ntm",
        description="NTMobile node: identity, registration, tunnels, groups.",
        epilog="--json may go anywhere on the line. Exit codes: 0 ok, 1 refused or failed, 2 usage or local "
        "files, 3 no daemon, 4 DC unreachable or silent, 70 internal error, 130 interrupted.",
    )
    global_options(p)
    p.add_argument("--version", action=LazyVersion)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser(
        "keygen", help="create this node's key (passphrase: --password-file, $NTM_PASSPHRASE or a prompt)"
    )
    s.add_argument("--force", action="store_true", help="replace an existing key")
    s.set_defaults(cmd="keygen")
    sub.add_parser("id", help="print this node's ID and public key").set_defaults(cmd="id")
    for name, func, hlp in (
        ("register", "register", "register (or move) this node at a DC"),
        ("revoke", "revoke", "revoke this node ID network-wide (permanent)"),
    ):
        s = sub.add_parser(name, help=hlp)
        s.add_argument("--dc", help="DC as HOST[:PORT] or URL (default: the current DC or the devnet's)")
        dc_channel_arguments(s)
        s.add_argument("--addr", action="append", help="local tunnel endpoint ip:port to announce (repeatable)")
        s.add_argument(
            "--no-wait", action="store_true", help="return once durable at the DC, before the chain confirms"
        )
        if name == "revoke":
            s.add_argument("--yes", action="store_true", help="confirm the permanent revocation")
        s.set_defaults(cmd=func)
    sub.add_parser("status", help="registration state, and the daemon's peers if it runs").set_defaults(cmd="status")
    sub.add_parser(
        "netcheck",
        help="what the network gives this node: UDP, NAT kind, IPv4/IPv6, DC and relay "
        "reachability and latency, why peers are relayed (asks the running daemon)",
    ).set_defaults(cmd="netcheck")
    s = sub.add_parser("up", help="run the node daemon (DC session, tunnels, TUN, DNS) until Ctrl-C or `ntm down`")
    s.add_argument("--tun", metavar="NAME", help="TUN interface name (default ntm0; given: fail if no TUN)")
    s.add_argument("--no-tun", action="store_true", help="no TUN interface: datagram mode (no root needed)")
    s.add_argument(
        "--offload",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="TUN offloads where the kernel has them (default): 64 KB super-packets cut and joined here, "
        "checksums left to the kernels; --no-offload forces one packet per TUN read and write "
        "(docs/PROTOCOL.md §10.11)",
    )
    s.add_argument(
        "--v4-net",
        type=ipaddress.IPv4Network,
        default=V4_NET,
        metavar="CIDR",
        help=f"virtual IPv4 network; this node is its first address (default {V4_NET})",
    )
    s.add_argument(
        "--path-mtu",
        type=int,
        default=PATH_MTU,
        metavar="BYTES",
        help=f"outer path MTU; the TUN MTU is this minus the tunnel overhead (default {PATH_MTU})",
    )
    s.add_argument(
        "--dns",
        type=dns_bind,
        action="append",
        metavar="IP:PORT",
        help="where to answer DNS for .ntm names (repeatable; default: the TUN addresses, port 53)",
    )
    s.add_argument(
        "--accept-any", action="store_true", help="accept tunnels from any node (demos; default: `ntm allow` list)"
    )
    s.add_argument("--echo", action="store_true", help="send every application datagram back (tests, demos)")
    s.add_argument("--host", help="local address for the tunnel socket (default: all, dual-stack)")
    s.add_argument("--port", type=int, default=state.TUNNEL_PORT, help=f"tunnel UDP port (default {state.TUNNEL_PORT})")
    s.add_argument(
        "--keepalive",
        type=float,
        default=KEEPALIVE_INTERVAL_S,
        metavar="S",
        help=f"keepalive period; below the shortest NAT UDP timeout on the way (default {KEEPALIVE_INTERVAL_S:.0f})",
    )
    s.add_argument(
        "--advertise-routes",
        metavar="CIDR,...",
        default="",
        help="offer to forward for these subnets behind this node (a subnet router; needs TUN)",
    )
    s.add_argument("--advertise-exit", action="store_true", help="offer to forward to anywhere (an exit node)")
    s.add_argument(
        "--use-routes",
        action="append",
        default=[],
        metavar="PEER[:CIDR],...",
        help="use the routes PEER offers (all, or only CIDR); never automatic (repeatable)",
    )
    s.add_argument(
        "--exit-node",
        metavar="PEER",
        help="use PEER's exit: its default routes go to routing table 4330 (node/subnet.py), for your `ip rule`s",
    )
    s.add_argument(
        "--exit-relay",
        action="store_true",
        help="use a relay's exit, booked by your DC (servers see the relay's address while you move); "
        "its default routes go to routing table 4330, for your `ip rule`s",
    )
    s.set_defaults(cmd="up")
    sub.add_parser("down", help="stop the running daemon").set_defaults(cmd="down")

    def peer_cmd(name: str, func: str, hlp: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=hlp)
        sp.add_argument("node", help="peer node ID (0x…) or alias")
        sp.add_argument("--relay", action="store_true", help="ask for the relay instead of a direct path")
        sp.set_defaults(cmd=func)
        return sp

    s = peer_cmd("ping", "ping", "measure round trips over a tunnel to a node (through the daemon)")
    s.add_argument("-c", "--count", type=int, default=4, help="pings to send (default 4)")
    s.add_argument("-i", "--interval", type=float, default=0.2, help="seconds between pings (default 0.2)")
    s = peer_cmd(
        "send",
        "send",
        "send one datagram over a tunnel and print the reply (through the daemon); "
        "--offline: leave it, sealed, at a Cache Server for peers that are offline",
    )
    s.add_argument("message", nargs="?", help="text to send")
    s.add_argument("--wait-reply", type=float, default=2.0, help="seconds to wait for a reply (0: none)")
    s.add_argument(
        "--offline",
        action="store_true",
        help="store-and-forward: seal for NODE (comma-separated: several) and upload to our DC's Cache Server",
    )
    s.add_argument("--file", metavar="PATH", help="with --offline: send this file instead of MESSAGE")
    s.add_argument("--app", default="ntm", help="with --offline: the application ID the item is for (default ntm)")
    s.add_argument("--notice", help="with --offline: the notification text (default: the message or file name)")
    s = sub.add_parser(
        "nc",
        help="a netcat over the overlay: stdin and stdout to a stream to PORT on a node, "
        "until the node ends it (through the daemon)",
    )
    s.add_argument("node", help="peer node ID (0x…) or alias")
    s.add_argument("port", type=startup.port, help="a port the node serves (`ntm serve` there)")
    s.set_defaults(cmd="nc")
    s = sub.add_parser(
        "serve",
        help="let allowed nodes reach a TCP service on this machine at PORT, until Ctrl-C "
        "(through the daemon; no root needed)",
    )
    s.add_argument("port", type=startup.port, help="the port nodes ask for (`ntm nc NODE PORT`)")
    s.add_argument(
        "--to", required=True, metavar="HOST:PORT", help="the local service, on loopback only (e.g. 127.0.0.1:8080)"
    )
    s.set_defaults(cmd="serve")
    s = sub.add_parser(
        "inbox",
        help="items waiting for this node at the federation's Cache Servers, and those fetched; "
        "`inbox fetch ITEM...` fetches waiting ones (strangers' wait for that)",
    )
    s.add_argument("action", nargs="?", choices=["fetch"], help="fetch the items named")
    s.add_argument("items", nargs="*", metavar="ITEM", help="with fetch: item IDs")
    s.set_defaults(cmd="inbox")
    s = sub.add_parser("fetch", help="download, open and confirm waiting Cache Server items")
    s.add_argument("items", nargs="*", metavar="ITEM", help="item IDs (default: all waiting)")
    s.add_argument("--out", metavar="DIR", help="where to write them (default $NTM_HOME/inbox)")
    s.set_defaults(cmd="fetch")
    s = sub.add_parser("recv", help="datagrams peers sent to this node (through the daemon)")
    s.add_argument("--wait", type=float, default=0.0, help="seconds to wait for the first one")
    s.set_defaults(cmd="recv")
    s = sub.add_parser(
        "alias", help="name a node: NAME.ntm in DNS and NAME in commands (no NODE: remove; no args: list)"
    )
    s.add_argument("name", nargs="?", help="alias (one DNS label)")
    s.add_argument("node", nargs="?", help="node ID (0x…)")
    s.set_defaults(cmd="alias")
    s = sub.add_parser("allow", help="let a node open tunnels to this one (no args: list)")
    s.add_argument("node", nargs="?", help="node ID (0x…) or alias")
    s.add_argument("--remove", action="store_true", help="take the node off the list")
    s.set_defaults(cmd="allow")
    s = sub.add_parser("whois", help="look a node up through the DC federation")
    s.add_argument("node", help="node ID (0x…)")
    s.add_argument("--dc", help="DC to ask (default: this node's DC)")
    dc_channel_arguments(s)
    s.set_defaults(cmd="whois")
    s = sub.add_parser("group", help="group messaging with keys no server knows (through the daemon)")
    gsub = s.add_subparsers(
        dest="group_cmd",
        required=True,
        metavar="{create,invite,invitations,accept,decline,leave,remove,members,send,recv}",
    )
    s.set_defaults(cmd="group")

    def group_cmd(name: str, hlp: str, *positional: tuple[str, str]) -> argparse.ArgumentParser:
        gp = gsub.add_parser(name, help=hlp)
        for arg, arg_help in positional:
            gp.add_argument(arg, help=arg_help)
        return gp

    GROUP = ("group", "group ID or name")
    group_cmd("create", "create a group; you are its admin", ("name", "group name (letters, digits, . _ -)"))
    group_cmd("invite", "invite a node (admin)", GROUP, ("node", "node ID (0x…) or alias"))
    group_cmd("invitations", "invitations waiting for your answer (an invitation admits nobody until accepted)")
    group_cmd("accept", "accept an invitation", GROUP)
    group_cmd("decline", "decline an invitation (forgotten here; the admin is not told)", GROUP)
    group_cmd("leave", "leave a group", GROUP)
    group_cmd(
        "remove",
        "remove a member or withdraw an invitation (admin); the others get new keys",
        GROUP,
        ("node", "node ID (0x…) or alias"),
    )
    gp = group_cmd("members", "a group's members and epoch (no GROUP: every group here)")
    gp.add_argument("group", nargs="?", help="group ID or name")
    group_cmd("send", "send a message to every member", GROUP, ("text", "the message (at most 1024 bytes)"))
    gp = group_cmd("recv", "group messages received since the last recv")
    gp.add_argument("group", nargs="?", help="group ID or name (default: all)")
    gp.add_argument("--wait", type=float, default=0.0, help="seconds to wait for the first one")
    s = sub.add_parser("completion", help='print a shell completion script: eval "$(ntm completion bash)"')
    s.add_argument("shell", choices=("bash", "zsh", "tcsh"))
    s.set_defaults(cmd="completion")
    sub.add_parser(
        "devnet",
        add_help=False,
        help="run a local federation (anvil chain, 2 DCs, 1 relay) until Ctrl-C (--help: its flags)",
    ).set_defaults(cmd="devnet")
    return p


def exec_devnet(args, base: Path, devnet_args: list[str]) -> None:
    """`ntm devnet ...` is scripts/devnet.py, a separate program (the node's CLI does not import
    the developer scripts): replace this process with it, so signals and output are its own."""
    argv = ["--home", str(base), *(["--json"] if args.json else []), *devnet_args]
    code = (
        "import sys; from daemon.ctrl_c import exit_on_interrupt; exit_on_interrupt('ntm devnet'); "
        "from scripts.devnet import main; sys.exit(main(sys.argv[1:], prog='ntm devnet'))"
    )
    os.execv(sys.executable, [sys.executable, "-c", code, *argv])


def split_json_flag(argv: list[str]) -> tuple[list[str], bool]:
    """--json anywhere on the line (before a `--`): taken out here, so every subcommand has it."""
    cut = argv.index("--") if "--" in argv else len(argv)
    head = [a for a in argv[:cut] if a != "--json"]
    return head + argv[cut:], len(head) < cut


def fast_id(args, base: Path) -> bool:
    """`ntm id` from id.json (public: written when the key is made or first opened), if it still
    belongs to the key file: no passphrase, no decryption."""
    try:
        ident = state.read_json(base / state.ID_FILE)
        address = state.read_json(base / state.KEY_FILE).get("address", "")
    except (OSError, ValueError):
        return False
    node, pub = ident.get("node"), ident.get("pubkey")
    if not (isinstance(node, str) and isinstance(pub, str) and node.lower().removeprefix("0x") == str(address).lower()):
        return False
    show_id(args, {"node": node, "pubkey": pub})
    return True


def load_commands():
    """Import node/commands.py with Ctrl-C held back: a KeyboardInterrupt raised inside the import
    machinery can be swallowed ("Exception ignored in ... _get_module_lock"), and the command would
    then run on as if nothing was pressed. A Ctrl-C during the import is acted on right after it."""
    pressed: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pressed.append(signum))
    try:
        from node import commands
    finally:
        signal.signal(signal.SIGINT, previous)
    if pressed:
        raise KeyboardInterrupt
    return commands


def main(argv: list[str] | None = None) -> int:
    argv, as_json = split_json_flag(list(sys.argv[1:] if argv is None else argv))
    try:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.default_int_handler)  # from here on, Ctrl-C is a KeyboardInterrupt
        fast = status_args(argv)
        if fast is not None:
            from node import status_view  # only here: `ntm --help` and `ntm id` stay lean

            fast.json = as_json
            if status_view.from_daemon(fast, fast.home or state.home()):
                return 0
        p = parser()
        args, rest = p.parse_known_args(argv)
        args.json = as_json
        base = args.home or state.home()
        if args.cmd == "devnet":
            exec_devnet(args, base, rest)
        if rest:
            p.error(f"unrecognized arguments: {' '.join(rest)}")
        if args.cmd == "completion":
            import shtab

            print(shtab.complete(p, args.shell))
            return 0
        if args.cmd == "id" and fast_id(args, base):
            return 0
        return load_commands().run(args, base)
    except CliError as exc:
        return fail(exc, as_json)
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # we are leaving: a second Ctrl-C changes nothing
        return fail(CliError("interrupted", INTERRUPTED), as_json)
    except Exception as exc:  # a bug: still one line, unless asked for the traceback
        if "-v" in argv or "--verbose" in argv:
            raise
        return fail(
            CliError(f"internal error: {type(exc).__name__}: {exc} (run with -v for the traceback)", INTERNAL), as_json
        )


def entry() -> None:
    """The `ntm` console script."""
    code = main()
    if code == INTERRUPTED:  # after a Ctrl-C, Python may re-kill itself with SIGINT at exit: leave now
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
