"""ntm-dc configuration: TOML file, flags win, clear errors for unknown or missing keys."""

from pathlib import Path

import pytest

from dc import config

PIN = "sha256=" + "ab" * 32


def load(argv):
    return config.load(config.parser().parse_args(argv))


def test_file_and_flags(tmp_path):
    f = tmp_path / "dc.toml"
    f.write_text(
        'key_file = "k.json"\nrpc_url = "http://chain:8545"\ndeployment = "d.json"\n'
        f'hostname = "dc1"\nhttp_port = 9000\nrelays = ["https://rs:8340#{PIN}"]\n'
    )
    cfg = load(["--config", str(f), "--http-port", "9100", "--relay", f"https://rs2:8340#{PIN}"])
    assert cfg.key_file == Path("k.json") and cfg.hostname == "dc1"
    assert cfg.http_port == 9100 and cfg.relays == [f"https://rs2:8340#{PIN}"]
    assert cfg.udp_port == config.DEFAULT_UDP_PORT and cfg.db == Path("dc.sqlite")


def test_relay_urls_are_pinned_or_plain_only_for_development(tmp_path, capsys):
    """The DC → RS channel carries Relay Directions' path tokens (both nodes' relay keys): an
    operator naming a relay without its pin, or by plain http:// without the development flag,
    is refused at start in one line (exit 2), before anything listens."""
    base = ["--key-file", "k", "--rpc-url", "http://c:8545", "--deployment", "d"]
    assert load([*base, "--relay", f"https://[2001:db8::1]:8340#{PIN}"]).relays == [f"https://[2001:db8::1]:8340#{PIN}"]
    assert load([*base, "--relay", "https://rs:8340#cert=/rs/rs-tls-cert.pem"])  # a file read at start, not here
    assert load([*base, "--relay", "http://rs:8340", "--insecure-plain-http"]).relays == ["http://rs:8340"]
    for url, why in (
        ("http://rs:8340", "plain http:// would carry relay path tokens in clear"),
        ("https://rs:8340", "expected its pin"),
        ("https://rs:8340#sha256=abcd", "expected its pin"),
        (f"https://rs:8340#sha1={'0' * 64}", "expected its pin"),
        (f"http://rs:8340#{PIN}", "needs https"),
    ):
        with pytest.raises(ValueError, match=why):
            load([*base, "--relay", url])
    from dc.__main__ import main

    for name in ("k", "d"):
        (tmp_path / name).write_text("{}")
    argv = ["--key-file", str(tmp_path / "k"), "--rpc-url", "http://c:8545", "--deployment", str(tmp_path / "d")]
    assert main([*argv, "--relay", "http://rs:8340"]) == 2
    assert main([*argv, "--relay", f"https://rs:8340#cert={tmp_path / 'none.pem'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "--insecure-plain-http" in err[0] and "cannot read the relay certificate" in err[1]


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="missing: --key-file, --rpc-url, --deployment"):
        load([])
    f = tmp_path / "dc.toml"
    f.write_text('key_file = "k"\nrpc_url = "u"\ndeployment = "d"\nhttp_prot = 1\n')
    with pytest.raises(ValueError, match="unknown config keys: http_prot"):
        load(["--config", str(f)])
    f.write_text("not toml [")
    with pytest.raises(ValueError, match="config file"):
        load(["--config", str(f)])
    base = 'key_file = "k"\nrpc_url = "u"\ndeployment = "d"\n'
    for line, why in (
        ('http_port = "abc"', "http_port must be an integer, got 'abc'"),
        ("udp_port = 70000", "udp_port must be in 0..65535"),
        ("hostname = 5", "hostname must be a string"),
        ("max_block_age = true", "max_block_age must be a number"),
        ("confirmations = 1.5", "an integer"),
    ):
        f.write_text(base + line + "\n")
        with pytest.raises(ValueError, match=why):
            load(["--config", str(f)])


def test_cli_exits_2_with_a_readable_line(capsys):
    from dc.__main__ import main

    assert main([]) == 2
    assert "ntm-dc: missing: --key-file" in capsys.readouterr().err


def test_several_rpc_urls_own_node_first(tmp_path):
    f = tmp_path / "dc.toml"
    f.write_text('key_file = "k"\nrpc_url = ["http://v1:8545", "http://v2:8545"]\ndeployment = "d"\n')
    assert load(["--config", str(f)]).rpc_url == ["http://v1:8545", "http://v2:8545"]
    f.write_text('key_file = "k"\nrpc_url = "http://v1:8545"\ndeployment = "d"\n')
    assert load(["--config", str(f)]).rpc_url == ["http://v1:8545"]
    cfg = load(["--config", str(f), "--rpc-url", "http://a:1", "--rpc-url", "http://b:2", "--confirmations", "3"])
    assert cfg.rpc_url == ["http://a:1", "http://b:2"] and cfg.confirmations == 3  # flags win, in order
    with pytest.raises(SystemExit):  # the flag is refused as it is parsed (one line, exit 2)
        load(["--config", str(f), "--confirmations", "0"])
    f.write_text('key_file = "k"\nrpc_url = "http://v1:8545"\ndeployment = "d"\nconfirmations = 0\n')
    with pytest.raises(ValueError, match="confirmations must be at least 1"):
        load(["--config", str(f)])


def test_passphrase_from_a_file_or_the_environment(tmp_path, monkeypatch):
    from daemon import keystore
    from ntm.errors import KeystoreError

    secret = tmp_path / "passphrase"
    secret.write_text("correct horse\n")
    monkeypatch.setenv("NTM_DC_PASSPHRASE", "from env")
    assert keystore.passphrase("NTM_DC_PASSPHRASE", secret) == "correct horse"  # the file wins, newline dropped
    assert keystore.passphrase("NTM_DC_PASSPHRASE") == "from env"
    with pytest.raises(KeystoreError, match="passphrase file .* is unreadable"):
        keystore.passphrase("NTM_DC_PASSPHRASE", tmp_path / "missing")


def test_every_address_is_dual_stack_so_ipv6_only_nodes_reach_the_dc():
    """`--http-host 0.0.0.0` (the README's "for other machines"): an IPv6-only node must reach it
    too (it used to get exit 4 from `ntm register --dc [2001:db8::10]:8330`)."""
    import socket

    from dc.__main__ import http_listener
    from scripts.procs import has_ipv6_loopback

    families = [socket.AF_INET] + ([socket.AF_INET6] if has_ipv6_loopback() else [])
    for host in ("0.0.0.0", "::"):
        with http_listener(host, 0) as listener:
            port = listener.getsockname()[1]
            for family in families:
                with socket.socket(family) as client:
                    client.connect(("127.0.0.1" if family == socket.AF_INET else "::1", port))
                    listener.accept()[0].close()
    with http_listener("127.0.0.1", 0) as listener:  # one address asked for: that one only
        assert listener.family == socket.AF_INET and listener.getsockname()[0] == "127.0.0.1"
