"""The node's files under $NTM_HOME (default ~/.ntm): its key, its registration state, and the
network config that `ntm devnet` writes so commands find a DC without flags."""

from __future__ import annotations

import json
import os
from pathlib import Path

from daemon import atomic_file

KEY_FILE = "key.json"
ID_FILE = "id.json"  # the node ID and public key (public; `ntm id` reads it without the passphrase)
STATE_FILE = "state.json"
NETWORK_FILE = "network.json"
PASSPHRASE_ENV = "NTM_PASSPHRASE"
TUNNEL_PORT = 4330  # the NTM port of the NTMobile papers: the tunnel socket's default
DC_TIMEOUT_S = 10.0  # a DC answers in milliseconds; this long means it is stuck (`ntm --timeout`)


# state.json's fields and the JSON types they must have (registration writes them; a hand edit or
# a disk fault may not): anything else is refused naming the file, never a crash deep in a command.
STATE_FIELDS: dict[str, tuple[type, ...]] = {
    "dc_url": (str,),
    "dc": (str,),
    "hostname": (str,),
    "chain_id": (int,),
    "registry": (str,),
    "timestamp": (int,),
    "revoked": (bool,),
    "status": (str,),
    "block": (int, type(None)),
    "tx": (str, type(None)),
}
STATE_REQUIRED = ("dc_url", "dc", "hostname", "chain_id", "registry")  # what every command reads from a registration


class BadFile(ValueError):
    """A node file that is not what it must be (the message names it): the user's to fix or remove."""


def home() -> Path:
    return Path(os.environ.get("NTM_HOME", Path.home() / ".ntm"))


def read_json(path: Path) -> dict:
    """A JSON object from `path` ({} if there is no file); ValueError naming the file if it is not one."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except IsADirectoryError:
        raise BadFile(f"{path} is a directory, not a JSON file") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadFile(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadFile(f"{path} holds a {type(data).__name__}, not a JSON object: fix or remove it")
    return data


def write_json(path: Path, data: dict) -> None:
    """Atomic replace, so a crash never leaves half a file and two commands may write at once."""
    atomic_file.replace_file(path, (json.dumps(data, indent=2) + "\n").encode())


def read_state(base: Path) -> dict:
    """The registration state ({} if not registered); BadFile naming state.json if a field is
    missing or of the wrong type."""
    path = base / STATE_FILE
    st = read_json(path)
    wrong = [
        k
        for k, types in STATE_FIELDS.items()
        if k in st and (not isinstance(st[k], types) or (isinstance(st[k], bool) and bool not in types))
    ]
    missing = [k for k in STATE_REQUIRED if k not in st] if st else []
    if wrong or missing:
        what = "; ".join(
            filter(None, [wrong and "wrong type: " + ", ".join(wrong), missing and "missing: " + ", ".join(missing)])
        )
        raise BadFile(f"{path} is not a registration state ({what}): fix it, or remove it and `ntm register` again")
    return st


def default_dc(base: Path) -> str | None:
    """First DC of the network config (written by `ntm devnet`), if any."""
    path = base / NETWORK_FILE
    dcs = read_json(path).get("dcs", [])
    if not (isinstance(dcs, list) and all(isinstance(d, str) for d in dcs)):
        raise BadFile(f'{path}: "dcs" must be a list of DC URLs: fix it, or remove it (`ntm devnet` writes it)')
    return dcs[0] if dcs else None


def devnet_dc_address(base: Path, url: str) -> str | None:
    """The chain address `ntm devnet` wrote for its DC at `url` (it admitted that key itself)."""
    return read_json(base / NETWORK_FILE).get("dc_addresses", {}).get(url.rstrip("/"))
