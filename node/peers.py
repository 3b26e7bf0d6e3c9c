"""The node's peer book in $NTM_HOME/peers.json: aliases, the inbound allow list, and the IPv4
addresses this node gave its peers (ntm/vaddr.py's V4Book), kept across restarts.

`ntm alias` and `ntm allow` edit the file; a running daemon re-reads it when told to (control
socket) and writes the IPv4 assignments back when it makes a new one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from node import state
from ntm import keys

PEERS_FILE = "peers.json"
#: An alias is one DNS label (it is also `<alias>.ntm`), lower case, not a node ID.
ALIAS_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


class PeerBookError(ValueError):
    """A bad alias, an unknown name, or a peers.json that is not what it should be."""


@dataclass
class PeerBook:
    aliases: dict[str, bytes] = field(default_factory=dict)
    allow: set[bytes] = field(default_factory=set)
    v4: dict[str, str] = field(default_factory=dict)  # V4Book.dump()

    @classmethod
    def load(cls, base: Path) -> PeerBook:
        try:
            raw = state.read_json(base / PEERS_FILE)
            return cls(
                {name: keys.parse_node_id(nid) for name, nid in raw.get("aliases", {}).items()},
                {keys.parse_node_id(nid) for nid in raw.get("allow", [])},
                {str(p): str(a) for p, a in raw.get("v4", {}).items()},
            )
        except (ValueError, TypeError, AttributeError) as exc:
            raise PeerBookError(f"{base / PEERS_FILE} is damaged: {exc}") from None

    def save(self, base: Path) -> None:
        state.write_json(
            base / PEERS_FILE,
            {
                "aliases": {n: keys.checksum(i) for n, i in sorted(self.aliases.items())},
                "allow": sorted(keys.checksum(i) for i in self.allow),
                "v4": self.v4,
            },
        )

    def resolve(self, name: str) -> bytes:
        """A node ID (0x…, checksummed or not) or an alias → node ID; PeerBookError if neither."""
        name = name.strip()
        if name.lower() in self.aliases:
            return self.aliases[name.lower()]
        try:
            return keys.parse_node_id(name)
        except ValueError:
            raise PeerBookError(f"{name!r} is neither a node ID nor an alias (see `ntm alias`)") from None

    def set_alias(self, name: str, node: bytes) -> None:
        name = name.lower()
        if not ALIAS_RE.match(name) or name.startswith("0x"):
            raise PeerBookError(f"bad alias {name!r}: letters, digits and '-' (one DNS label), not starting with 0x")
        self.aliases[name] = node

    def names_of(self, node: bytes) -> list[str]:
        return sorted(n for n, i in self.aliases.items() if i == node)
