"""The Direction Coordinator's logic, free of HTTP: registration, lookups, federation answers.

dc/server.py turns HTTP/WebSocket/UDP into calls on this object.
"""

from __future__ import annotations

import asyncio
import logging

import coincurve

from dc.cache import RegistryCache
from dc.federation import INFO_REQUEST, INFO_RESPONSE, FederationClient, now_ms
from dc.presence import Presence
from dc.signaling import Signaling
from dc.store import Store
from dc.submitter import Submitter
from ntm import envelope, keys
from ntm.errors import NtmError
from ntm.registration import RegistrationError, RegistrationRequest, check_request
from ntm.registry import Registry

log = logging.getLogger("ntm.dc")

# How long a Registration Request may wait for chain confirmation before the DC answers
# "durable, not yet confirmed": a few anvil blocks or one slow public-chain block.
CONFIRM_WAIT_S = 15.0


class NodeLookupError(NtmError):
    """A node the registry does not know, or that cannot be reached; `code` says which."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class Coordinator:
    def __init__(
        self,
        key: coincurve.PrivateKey,
        registry: Registry,
        store: Store,
        cache: RegistryCache,
        hostname: str,
        relays: list[str],
        keepalive_ports: tuple[int, int],
    ) -> None:
        self.key = key
        self.address = keys.node_id_of(key)
        self.registry = registry
        self.store = store
        self.cache = cache
        self.hostname = hostname
        self.relays = relays
        self.keepalive_ports = keepalive_ports
        self.presence = Presence()
        self.submitter = Submitter(store, registry)
        self.guard = envelope.ReplayGuard()
        self.federation = FederationClient(key, cache.is_active_dc, self.guard)
        self.signaling = Signaling(self)
        self.counters = {"registrations_accepted": 0, "registrations_refused": 0,
                         "federation_requests_served": 0, "federation_requests_refused": 0}

    def info(self) -> dict:
        return {
            "dc": keys.checksum(self.address),
            "hostname": self.hostname,
            "chain_id": self.registry.chain_id,
            "registry": keys.checksum(self.registry.address),
            "keepalive_ports": list(self.keepalive_ports),
            "relays": self.relays,
            "active": self.cache.is_active_dc(self.address),
        }

    def latest(self, node: bytes) -> tuple[int, bool]:
        """Newest timestamp and revoked flag of `node` known here, on chain or still pending."""
        onchain = self.cache.home_of(node)
        stored = self.store.node(node)
        ts = max(onchain.timestamp if onchain else 0, stored.timestamp if stored else 0)
        revoked = bool((onchain and onchain.revoked) or (stored and stored.revoked))
        return ts, revoked

    async def register(self, req: RegistrationRequest, wait_confirmed: bool) -> dict:
        """Validate, store durably, queue for the chain; optionally wait for confirmation."""
        if not self.cache.is_active_dc(self.address):
            raise RegistrationError("dc_inactive", "this DC is not an active member of the registry")
        latest, revoked = self.latest(req.record.node)
        try:
            check_request(req, self.address, self.registry.domain, now_ms(), latest, revoked)
        except RegistrationError:
            self.counters["registrations_refused"] += 1
            raise
        await self.store.add(req)
        self.counters["registrations_accepted"] += 1
        self.submitter.wake()
        rec = req.record
        log.info("%s %s (ts %d): durable", "revocation" if rec.revoked else "registration",
                 keys.checksum(rec.node), rec.timestamp)
        result = {"node": keys.checksum(rec.node), "dc": keys.checksum(self.address),
                  "timestamp": rec.timestamp, "status": "durable"}
        if wait_confirmed:
            try:
                state, tx, block, reason = await asyncio.wait_for(
                    self.submitter.confirmed(rec.node, rec.timestamp), CONFIRM_WAIT_S)
            except asyncio.TimeoutError:
                return result
            result.update(status=state, tx=tx, block=block)
            if reason:
                result["reason"] = reason
        return result

    def local_info(self, node: bytes) -> dict | None:
        """What this DC knows of a node it is home to (for federation answers and whois)."""
        stored = self.store.node(node)
        if stored is None:
            return None
        session = self.presence.sessions.get(node)
        return {
            "node": keys.checksum(node),
            "home_dc": keys.checksum(self.address),
            "pubkey": stored.pubkey.hex(),
            "timestamp": stored.timestamp,
            "revoked": stored.revoked,
            "local_addrs": list(session.local_addrs if session and session.local_addrs else stored.local_addrs),
            "observed": self.presence.observed(node)[0],
            "observed_alt": self.presence.observed(node)[1],
            "online": self.presence.online(node),
        }

    def answer_ntm_info(self, request: dict) -> dict:
        """Serve a signed NTM Information Request from a peer DC; returns the signed response."""
        try:
            env = envelope.open_envelope(request, INFO_REQUEST, now_ms(), self.cache.is_active_dc, self.guard)
            node = keys.parse_node_id(str(env.body.get("node")))
            if env.body.get("to") != keys.checksum(self.address):
                raise NodeLookupError("wrong_dc", "request is addressed to another DC")
        except (NtmError, ValueError):
            self.counters["federation_requests_refused"] += 1
            raise
        info = self.local_info(node)
        if info is None:
            raise NodeLookupError("unknown_node", f"{keys.checksum(node)} is not registered at this DC")
        self.counters["federation_requests_served"] += 1
        return envelope.seal(self.key, INFO_RESPONSE, info, now_ms())

    async def whois(self, node: bytes) -> dict:
        """Where `node` lives and its key and addresses: locally, or from its home DC (federation)."""
        onchain = await self.cache.resolve(node)
        stored = self.store.node(node)
        if stored and (onchain is None or stored.timestamp >= onchain.timestamp):
            info = self.local_info(node)
            info["confirmed"] = bool(onchain and onchain.timestamp == stored.timestamp)
            return info
        if onchain is None:
            raise NodeLookupError("unknown_node", f"{keys.checksum(node)} is not registered on chain")
        home = self.cache.dcs.get(onchain.dc)
        if onchain.revoked:
            return {"node": keys.checksum(node), "home_dc": keys.checksum(onchain.dc),
                    "timestamp": onchain.timestamp, "revoked": True, "online": False, "confirmed": True}
        if home is None or not home.active:
            raise NodeLookupError("home_dc_inactive", f"home DC {keys.checksum(onchain.dc)} is not active")
        info = await self.federation.ntm_info(home.endpoint, onchain.dc, node)
        if keys.node_id(bytes.fromhex(info["pubkey"])) != node:
            raise NodeLookupError("bad_pubkey", "home DC returned a public key that is not the node's")
        info["confirmed"] = True
        return info
