"""The node's files under $NTM_HOME (default ~/.ntm): its key, its registration state, and the
network config that `ntm devnet` writes so commands find a DC without flags."""

from __future__ import annotations

import json
import os
from pathlib import Path

KEY_FILE = "key.json"
STATE_FILE = "state.json"
NETWORK_FILE = "network.json"
PASSPHRASE_ENV = "NTM_PASSPHRASE"


def home() -> Path:
    return Path(os.environ.get("NTM_HOME", Path.home() / ".ntm"))


def passphrase() -> str:
    return os.environ.get(PASSPHRASE_ENV, "")


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except ValueError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None


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
