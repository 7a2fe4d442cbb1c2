"""WAN discovery: who serves what, over py-libp2p's Kademlia DHT, called from asyncio.

Layout of the DHT, and why. Kademlia's PUT_VALUE keeps ONE value per key, but many peers serve
the same model (key "layerswarm/<model_hash>") or block ("layerswarm/<model_hash>/block/<k>").
A merged list under one key would need read-modify-write across peers (lost updates) and would
keep a dead peer's entry until someone removed it. So each peer says it for itself:

- provider key: `digest = SHA-256("layerswarm/dht/v1\\0" + key)`, or HMAC-SHA-256 with the
  swarm key in a private swarm (32 bytes). The peer announces itself as a *provider* of `digest`
  (ADD_PROVIDER to the k closest nodes).
- value: the peer stores its value in its OWN value store under `/layerswarm/<digest hex>`, and
  serves it there; it is never copied to other nodes (their validator for the `layerswarm`
  namespace refuses every PUT_VALUE). The value of peer P for a key is therefore
  "GET_VALUE(/layerswarm/<digest hex>) asked of P itself", so the key needs no `/peer/<id>`
  part (which would also break GET_VALUE's 128-byte key limit in 0.8.1).

A read finds the providers (asking the k closest nodes over the network every time, never only
the local provider cache, which `find_providers` returns alone whenever it is non-empty),
dedupes them by peer ID, and asks each one directly for its value, all at once, each within
`fetch_timeout`. A provider that does not answer, or no longer has a value, is dropped: so
`get_records` NEVER returns a value from a provider that no longer answers, and a value it
returns is the provider's current one (no 24 h cache is involved: the answer comes from its
author over an authenticated noise channel). Values are opaque bytes here; the caller signs and
time-stamps them, and checks them on reading.

Records have no TTL in py-libp2p 0.8.1, so: our own value is stored locally with a validity of
`record_ttl` and re-put, with a re-announce, every `republish_interval` (`republish()` does it
now); provider entries older than `provider_ttl` are pruned from this node's provider store
(otherwise a dead peer would hold one of the 20 slots per key for 48 h). Limits: a node keeps at
most 20 providers per key and ignores the 21st, so keep fewer live peers than that per key (the
per-block keys help); a node accepts at most 10 announcements per peer in 10 s, so announcing
is paced (`provides_per_window`), and many keys take a while to announce; a peer whose dial
failed is not dialled again for 60 s (py-libp2p's negative cache), so a peer restarted under
the same ID can stay invisible to that reader for that long.

Private swarm: with a swarm key, every connection is wrapped in py-libp2p's pnet (Salsa20 keyed
with the swarm key, under noise), so a node without the key cannot complete a handshake with
any member: it can neither read nor inject anything. Limits: everyone holding the key is in
(members cannot be expelled without changing the key everywhere); the dial of an outsider fails
only at `connect_timeout`; py-libp2p's pnet (8-byte nonce) does not interoperate with
go-libp2p's (XSalsa20, 24-byte nonce). The HMAC'd key digests keep swarms with different keys
from ever sharing a DHT key.

Security of every connection: noise only (py-libp2p's default also accepts plaintext, where a
dialer could claim another peer's ID); one connection per peer (the default of three makes every
dial wait 250 ms); no mDNS, no UPnP, no observed-address discovery, no public bootstrap nodes;
the connection manager does not dial on its own.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import socket
from dataclasses import dataclass
from typing import Any

from multiaddr import Multiaddr

from layerswarm.errors import LayerswarmError
from layerswarm.swarm.identity import Identity
from layerswarm.swarm.kad_service import KadService, check_bootstrap
from layerswarm.swarm.trio_bridge import TrioThread

log = logging.getLogger(__name__)

SWARM_KEY_BYTES = 32  # bytes: a private swarm's pre-shared key
_DIGEST_PREFIX = b"layerswarm/dht/v1\0"
_BOOKKEEPING = 0.5  # s: a read's own work after its last network wait (lookup, then fetch)


@dataclass(frozen=True)
class DhtConfig:
    """Timeouts and periods of one DHT node; every network wait is bounded by one of them."""

    connect_timeout: float = 5.0  # s: one dial (TCP, pnet, noise, yamux); an outsider fails here
    lookup_timeout: float = 5.0  # s: finding the closest nodes and asking them for providers
    fetch_timeout: float = 2.0  # s: one provider's answer; silent this long counts as gone
    put_timeout: float = 30.0  # s: put_record (local store, announce, pacing waits included)
    start_timeout: float = 15.0  # s: listen, dial the bootstrap peers, first self-lookup
    close_timeout: float = 5.0  # s: stop the host and the trio thread
    republish_timeout: float = 120.0  # s: one republish() of every record this node holds
    republish_interval: float = 600.0  # s: re-put and re-announce own records; 0 = never
    record_ttl: float = 1800.0  # s: own value is served this long after its last (re)put
    provider_ttl: float = 1800.0  # s: drop provider entries this old (> every peer's republish)
    max_providers: int = 64  # providers asked for their value on one read
    max_value_bytes: int = 65536  # bytes: largest value put_record accepts
    provides_per_window: int = 9  # announcements per `provide_window`: 0.8.1 drops >10 / 10 s
    provide_window: float = 10.5  # s: the window of `provides_per_window`
    bridge_grace: float = 1.0  # s: asyncio waits this long past a trio deadline, then gives up

    def __post_init__(self) -> None:
        ttls = (self.record_ttl, self.provider_ttl)
        if self.republish_interval and min(ttls) <= self.republish_interval:
            raise ValueError("record_ttl and provider_ttl must exceed republish_interval")
        if self.provides_per_window < 1 or self.max_providers < 1:
            raise ValueError("provides_per_window and max_providers must be positive")


def local_ip_towards(multiaddr: str) -> str:
    """The local IPv4 address this machine reaches `multiaddr`'s host from (for a DHT node to
    listen on and advertise); 127.0.0.1 if it has no /ip4/ host or no route. Sends nothing."""
    parts = multiaddr.split("/")
    target = parts[2] if len(parts) > 2 and parts[1] == "ip4" else "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((target, 9))  # UDP: picks the route and source address, sends no packet
            return str(s.getsockname()[0])
        except OSError:
            return "127.0.0.1"


def key_digest(key: str, swarm_key: bytes | None = None) -> bytes:
    """The 32-byte DHT key of a record key: SHA-256, or HMAC-SHA-256 keyed by the swarm key."""
    data = _DIGEST_PREFIX + key.encode("utf-8")
    if swarm_key is None:
        return hashlib.sha256(data).digest()
    return hmac.new(swarm_key, data, hashlib.sha256).digest()


class DhtNode:
    """One node of the Kademlia DHT, with an asyncio API; py-libp2p runs in a trio thread.

    Create it with `await DhtNode.start(...)`, or `async with await DhtNode.start(...)`.
    """

    def __init__(
        self, bridge: TrioThread, service: KadService, config: DhtConfig, multiaddr: str
    ) -> None:
        """Use `DhtNode.start`; this only binds the parts it made."""
        self._bridge = bridge
        self._service = service
        self._config = config
        self._multiaddr = multiaddr
        self._closed = False

    @classmethod
    async def start(
        cls,
        identity: Identity,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        bootstrap: list[str] | None = None,
        swarm_key: bytes | None = None,
        config: DhtConfig | None = None,
    ) -> DhtNode:
        """Start a DHT node: its trio thread, its libp2p host, and its join of the swarm.

        Args:
            identity: the peer's key; the node's peer ID is `identity.peer_id`.
            listen_host: the IPv4 address to listen on (and advertise: no address discovery).
            listen_port: TCP port; 0 picks a free one.
            bootstrap: full multiaddrs "/ip4/A/tcp/P/p2p/ID" of members to join through; empty
                or None starts a new swarm.
            swarm_key: 32-byte pre-shared key of a private swarm, or None for an open one.
            config: timeouts and periods; `DhtConfig()` if None.

        Raises:
            ValueError: a bad bootstrap multiaddr, swarm key or port.
            PeerUnavailable: there were bootstrap peers, and none could be reached.
            TimeoutError: start-up took longer than `config.start_timeout`.
        """
        config = config or DhtConfig()
        if swarm_key is not None and len(swarm_key) != SWARM_KEY_BYTES:
            raise ValueError(f"swarm key has {len(swarm_key)} bytes, expected {SWARM_KEY_BYTES}")
        if not 0 <= listen_port < 65536:
            raise ValueError(f"listen port {listen_port} out of range")
        listen = Multiaddr(f"/ip4/{listen_host}/tcp/{listen_port}")  # raises on a bad host
        peers = check_bootstrap(bootstrap or [])
        bridge = TrioThread(name=f"dht-{identity.peer_id[-8:]}", grace=config.bridge_grace)
        bridge.start(timeout=config.start_timeout)
        service = KadService(identity.key_pair(), config, swarm_key, key_digest)
        try:
            multiaddr = await bridge.start_task(
                service.serve, listen, peers, timeout=config.start_timeout
            )
        except BaseException:
            await bridge.stop(config.close_timeout)
            raise
        log.info("DHT node %s listening at %s", identity.peer_id, multiaddr)
        return cls(bridge, service, config, str(multiaddr))

    @property
    def multiaddr(self) -> str:
        """This node's full multiaddr, "/ip4/A/tcp/P/p2p/ID", for others to bootstrap from."""
        return self._multiaddr

    @property
    def peer_id(self) -> str:
        """This node's base58 peer ID (the same as its identity's)."""
        return self._multiaddr.rsplit("/p2p/", 1)[1]

    async def put_record(self, key: str, value: bytes) -> None:
        """Publish this peer's `value` under `key`, replacing its previous one.

        The value is kept by this node only and served from here; the node announces itself
        as a provider of `key` (paced: at most `provides_per_window` announcements per
        `provide_window`, so that other nodes do not drop them).

        Raises:
            ValueError: `key` is empty, or `value` is empty or over `max_value_bytes`.
            TimeoutError: the announcement took longer than `put_timeout`; the value is stored
                and will be announced again at the next republish.
        """
        if not key:
            raise ValueError("empty DHT key")
        limit = self._config.max_value_bytes
        if not 0 < len(value) <= limit:
            raise ValueError(f"value of {len(value)} bytes; allowed 1..{limit}")
        await self._call(self._service.put, key, bytes(value), timeout=self._config.put_timeout)

    async def get_records(self, key: str) -> list[bytes]:
        """The current values of every live provider of `key` (this node's own included).

        Providers that do not answer within `fetch_timeout`, or hold no value, are left out;
        so are duplicates. Order is unspecified.

        Raises:
            TimeoutError: only if the trio thread itself stopped answering.
        """
        return list((await self.get_records_by_peer(key)).values())

    async def get_records_by_peer(self, key: str) -> dict[str, bytes]:
        """Like `get_records`, keyed by the base58 peer ID of the provider that answered."""
        if not key:
            raise ValueError("empty DHT key")
        budget = self._config.lookup_timeout + self._config.fetch_timeout + _BOOKKEEPING
        result: dict[str, bytes] = await self._call(self._service.get, key, timeout=budget)
        return result

    async def remove_record(self, key: str) -> None:
        """Stop serving this peer's value under `key`; readers drop this peer at once."""
        await self._call(self._service.remove, key, timeout=self._config.fetch_timeout)

    async def republish(self) -> None:
        """Re-put and re-announce every record this node holds, now (also done periodically).

        Raises:
            TimeoutError: it took longer than `republish_timeout`.
        """
        await self._call(self._service.republish, timeout=self._config.republish_timeout)

    async def close(self) -> None:
        """Stop the host and the trio thread, within `close_timeout`; idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            await self._bridge.call(self._service.stop, timeout=self._config.close_timeout)
        except (TimeoutError, LayerswarmError) as exc:
            log.warning("DHT node did not stop cleanly: %r", exc)
        await self._bridge.stop(self._config.close_timeout)

    async def __aenter__(self) -> DhtNode:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _call(self, fn: Any, *args: Any, timeout: float) -> Any:
        if self._closed:
            raise LayerswarmError("DHT node is closed")
        return await self._bridge.call(fn, *args, timeout=timeout)
