"""The node's files under $NTM_HOME (default ~/.ntm): its key, its registration state, and the
network config that `ntm devnet` writes so commands find a DC without flags."""

from __future__ import annotations

import json
import os
from pathlib import Path

KEY_FILE = "key.json"
ID_FILE = "id.json"  # the node ID and public key (public; `ntm id` reads it without the passphrase)
STATE_FILE = "state.json"
NETWORK_FILE = "network.json"
PASSPHRASE_ENV = "NTM_PASSPHRASE"
TUNNEL_PORT = 4330  # the NTM port of the NTMobile papers: the tunnel socket's default
DC_TIMEOUT_S = 10.0  # a DC answers in milliseconds; this long means it is stuck (`ntm --timeout`)


def home() -> Path:
    return Path(os.environ.get("NTM_HOME", Path.home() / ".ntm"))


def read_json(path: Path) -> dict:
    """A JSON object from `path` ({} if there is no file); ValueError naming the file if it is not one."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except IsADirectoryError:
        raise ValueError(f"{path} is a directory, not a JSON file") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a {type(data).__name__}, not a JSON object: fix or remove it")
    return data


def write_json(path: Path, data: dict) -> None:
    """Atomic replace, so a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def default_dc(base: Path) -> str | None:
    """First DC of the network config (written by `ntm devnet`), if any."""
    dcs = read_json(base / NETWORK_FILE).get("dcs", [])
    return dcs[0] if dcs else None


def devnet_dc_address(base: Path, url: str) -> str | None:
    """The chain address `ntm devnet` wrote for its DC at `url` (it admitted that key itself)."""
    return read_json(base / NETWORK_FILE).get("dc_addresses", {}).get(url.rstrip("/"))
