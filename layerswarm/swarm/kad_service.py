"""The trio side of the DHT node: a py-libp2p host and its Kademlia service, and our layout.

Every method here runs in the trio thread of `trio_bridge.TrioThread`; `dht.DhtNode` is the
asyncio face, and its module docstring explains the layout of keys, providers and values.
Private py-libp2p 0.8.1 API used on purpose (pinned version): `ValueStore._get_from_peer`
(one GET_VALUE to one peer) and `ProviderStore._get_providers_from_peer_with_closers` (one
GET_PROVIDERS to one peer), because the public `get_value` / `find_providers` answer from local
caches when they can.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio
from libp2p import new_host
from libp2p.abc import IHost
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as new_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.kad_dht.common import BUCKET_SIZE
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.kad_dht.pb.kademlia_pb2 import Record
from libp2p.network.config import ConnectionConfig, RetryConfig
from libp2p.network.swarm import Swarm
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.records.utils import verify_record
from libp2p.records.validator import Validator
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.tools.anyio_service import background_trio_service
from multiaddr import Multiaddr

from layerswarm.errors import PeerUnavailable

if TYPE_CHECKING:
    from layerswarm.swarm.dht import DhtConfig

log = logging.getLogger(__name__)

NAMESPACE = "layerswarm"  # DHT value keys are /layerswarm/<digest hex>
MAX_FETCHES = 16  # providers asked for their value at the same time
ADDR_TTL = 600  # s: how long a provider's advertised addresses stay in the peerstore


def check_bootstrap(addrs: list[str]) -> list[PeerInfo]:
    """Parse bootstrap multiaddrs; each must end in /p2p/<peer ID>.

    Raises:
        ValueError: an address is not a multiaddr with a peer ID.
    """
    peers = []
    for addr in addrs:
        try:
            peers.append(info_from_p2p_addr(Multiaddr(addr)))
        except Exception as exc:  # multiaddr raises several types of its own
            raise ValueError(f"bad bootstrap multiaddr {addr!r}: {exc}") from exc
    return peers


def value_key(digest: bytes) -> bytes:
    """Where a provider keeps its own value for `digest` (76 bytes, under GET_VALUE's 128)."""
    return f"/{NAMESPACE}/{digest.hex()}".encode()


class OwnValuesOnly(Validator):
    """Refuses every PUT_VALUE into our namespace: a value is served by its author only."""

    def validate(self, key: str, value: bytes) -> None:
        raise ValueError(f"values under /{NAMESPACE}/ are served by their author only")

    def select(self, key: str, values: list[bytes]) -> int:
        return 0


class ProvidePacer:
    """At most `count` announcements in any `window` seconds (0.8.1 resets the 11th in 10 s)."""

    def __init__(self, count: int, window: float) -> None:
        self._count = count
        self._window = window
        self._sent: deque[float] = deque()

    async def wait(self) -> None:
        """Wait until one more announcement fits in the window, and count it."""
        now = trio.current_time()
        if len(self._sent) >= self._count:
            wake = self._sent[0] + self._window
            if wake > now:
                await trio.sleep(wake - now)
            self._sent.popleft()
        self._sent.append(trio.current_time())


class KadService:
    """A libp2p host with Kademlia in server mode, and the record layout on top of it."""

    def __init__(
        self,
        key_pair: KeyPair,
        config: DhtConfig,
        swarm_key: bytes | None,
        digest_fn: Callable[[str, bytes | None], bytes],
    ) -> None:
        self._key_pair = key_pair
        self._config = config
        self._swarm_key = swarm_key
        self._digest_fn = digest_fn
        self._pacer = ProvidePacer(config.provides_per_window, config.provide_window)
        self._published: dict[bytes, bytes] = {}  # digest -> own value
        self._host: IHost | None = None
        self._dht: KadDHT | None = None
        self._closing: trio.Event | None = None
        self._stopped: trio.Event | None = None

    # --- lifecycle ------------------------------------------------------------------------

    def _make_host(self) -> IHost:
        cfg = self._config
        noise = NoiseTransport(self._key_pair, noise_privkey=new_x25519_key_pair().private_key)
        connections = ConnectionConfig(
            max_connections_per_peer=1,  # the default of 3 makes every dial wait 250 ms
            min_connections=0,  # no connection count to keep up: we dial only when asked
            low_watermark=0,
            dial_timeout=cfg.connect_timeout,
            inbound_upgrade_timeout=cfg.connect_timeout,
            outbound_upgrade_timeout=cfg.connect_timeout,
            outbound_stream_protocol_negotiation_timeout=cfg.fetch_timeout,
            inbound_stream_protocol_negotiation_timeout=cfg.fetch_timeout,
        )
        host = new_host(
            key_pair=self._key_pair,
            sec_opt={TProtocol(NOISE_PROTOCOL_ID): noise},  # never plaintext, secio or TLS
            connection_config=connections,
            psk=self._swarm_key.hex() if self._swarm_key is not None else None,
            enable_mDNS=False,
            enable_upnp=False,
            disable_identify_address_discovery=True,
        )
        # new_host() takes no RetryConfig; the default retries a failed dial 3 times over
        # 0.7 s, which every read then spends on each dead provider. Callers retry, not us.
        network = host.get_network()
        if isinstance(network, Swarm):
            network.retry_config = RetryConfig(max_retries=0)
            # The auto-connector dials every peer in the peerstore, dead ones included, while
            # we have fewer than 150 connections (the midpoint of the default watermarks),
            # every 30 s and at each disconnect; no config turns it off without also making
            # the pruner close connections. A DHT node dials only when asked to.
            setattr(network.auto_connector, "maybe_connect", _never_dial)  # noqa: B010
        return host

    async def serve(
        self,
        listen: Multiaddr,
        bootstrap: list[PeerInfo],
        *,
        task_status: Any = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen, join through `bootstrap`, report our multiaddr, and serve until `stop`."""
        self._closing, self._stopped = trio.Event(), trio.Event()
        host = self._host = self._make_host()
        dht = self._dht = KadDHT(host, DHTMode.SERVER, strict_validation=True)
        dht.register_validator(NAMESPACE, OwnValuesOnly())
        joined = False
        try:
            async with host.run([listen]), background_trio_service(dht):
                joined = await self._join(bootstrap)
                if joined:
                    async with trio.open_nursery() as nursery:
                        if self._config.republish_interval > 0:
                            nursery.start_soon(self._maintain)
                        task_status.started(self._own_multiaddr())
                        await self._closing.wait()
                        nursery.cancel_scope.cancel()
                # Leaving host.run() stops its services but leaves the TCP connections open
                # (peers then see a live connection that never answers): close them first.
                with trio.move_on_after(self._config.close_timeout):
                    await host.close()
        except Exception as exc:  # trio wraps a failure in host.run() in exception groups
            leaf = _single_leaf(exc)
            if leaf is exc:
                raise
            raise leaf from exc
        finally:
            self._host = self._dht = None  # later calls raise PeerUnavailable, not hang
            self._stopped.set()
        if not joined:
            raise PeerUnavailable(f"none of {len(bootstrap)} bootstrap peers could be reached")

    async def stop(self) -> None:
        """Ask `serve` to leave, and wait until it has (the caller bounds the wait)."""
        if self._closing is None or self._stopped is None:
            return
        self._closing.set()
        await self._stopped.wait()

    def _own_multiaddr(self) -> str:
        host = self._require()[0]
        return f"{host.get_transport_addrs()[0]}/p2p/{host.get_id().to_base58()}"

    async def _join(self, bootstrap: list[PeerInfo]) -> bool:
        """Dial the bootstrap peers at once, then look ourselves up to fill the routing table.

        Returns:
            Whether we joined: some bootstrap peer answered, or there were none to dial.
        """
        host, dht = self._require()
        reached: list[ID] = []

        async def dial(info: PeerInfo) -> None:
            with trio.move_on_after(self._config.connect_timeout):
                try:
                    await host.connect(info)
                    await dht.add_peer(info.peer_id)
                    reached.append(info.peer_id)
                except Exception as exc:  # py-libp2p raises many kinds on a failed dial
                    log.warning("bootstrap peer %s unreachable: %r", info.peer_id, exc)

        async with trio.open_nursery() as nursery:
            for info in bootstrap:
                nursery.start_soon(dial, info)
        if reached:
            with trio.move_on_after(self._config.lookup_timeout):
                own = host.get_id()
                for peer in await dht.peer_routing.find_closest_peers_network(own.to_bytes()):
                    await dht.add_peer(peer)
        return bool(reached) or not bootstrap

    async def _maintain(self) -> None:
        """Every `republish_interval`: re-put and re-announce, and prune stale providers."""
        while True:
            await trio.sleep(self._config.republish_interval)
            with trio.move_on_after(self._config.republish_timeout):
                await self.republish()
            self.prune_providers()

    def _require(self) -> tuple[IHost, KadDHT]:
        if self._host is None or self._dht is None:
            raise PeerUnavailable("DHT node is not running")
        return self._host, self._dht

    # --- records --------------------------------------------------------------------------

    async def put(self, key: str, value: bytes) -> None:
        """Store our value for `key` here, and announce us as a provider of its digest."""
        digest = self._digest_fn(key, self._swarm_key)
        self._published[digest] = value
        self._store_own(digest, value)
        await self._announce(digest)

    def _store_own(self, digest: bytes, value: bytes) -> None:
        dht = self._require()[1]
        vkey = value_key(digest)
        dht.value_store.put(vkey, value, validity=time.time() + self._config.record_ttl)
        # put() marks the key for py-libp2p's own 22 h republish to the k closest nodes, which
        # would copy our value to nodes that then serve it after we are gone: keep it here.
        dht.value_store.local_keys.discard(vkey)

    async def _announce(self, digest: bytes) -> None:
        dht = self._require()[1]
        await self._pacer.wait()
        if not await dht.provider_store.provide(digest):
            log.debug("no other node took our provider record for %s", digest.hex())
        # provide() also queues the key for py-libp2p's own republish, outside our pacing.
        dht.provider_store.providing_keys.discard(digest)

    async def republish(self) -> None:
        """Re-put every own value (fresh validity) and re-announce it; failures are logged."""
        for digest, value in list(self._published.items()):
            self._store_own(digest, value)
            with trio.move_on_after(self._config.put_timeout):
                try:
                    await self._announce(digest)
                except Exception as exc:
                    log.warning("re-announcing %s failed: %r", digest.hex(), exc)

    async def remove(self, key: str) -> None:
        """Stop serving our value for `key` and drop our own provider entry."""
        host, dht = self._require()
        digest = self._digest_fn(key, self._swarm_key)
        self._published.pop(digest, None)
        dht.value_store.remove(value_key(digest))
        dht.provider_store.providing_keys.discard(digest)
        dht.provider_store.providers.get(digest, {}).pop(str(host.get_id()), None)

    def prune_providers(self) -> None:
        """Drop provider entries (ours and those others sent us) older than `provider_ttl`."""
        store = self._require()[1].provider_store
        cutoff = time.time() - self._config.provider_ttl
        for digest, entries in list(store.providers.items()):
            for peer, entry in list(entries.items()):
                if entry.timestamp < cutoff:
                    del entries[peer]
            if not entries:
                del store.providers[digest]

    async def get(self, key: str) -> dict[str, bytes]:
        """Ask every provider of `key` for its value; those that answer, by peer ID."""
        digest = self._digest_fn(key, self._swarm_key)
        providers = await self._find_providers(digest)
        found: dict[str, bytes] = {}
        limiter = trio.CapacityLimiter(MAX_FETCHES)
        with trio.move_on_after(self._config.fetch_timeout):  # the phase, and each fetch in it
            async with trio.open_nursery() as nursery:
                for info in providers:
                    nursery.start_soon(self._fetch, info, value_key(digest), found, limiter)
        return found

    async def _find_providers(self, digest: bytes) -> list[PeerInfo]:
        """Providers from the k closest nodes and our own store, one per peer ID."""
        host, dht = self._require()
        merged: dict[ID, list[Multiaddr]] = {}

        def add(infos: list[PeerInfo]) -> None:
            for info in infos:
                addrs = merged.setdefault(info.peer_id, [])
                addrs.extend(a for a in info.addrs if a not in addrs)

        add(dht.provider_store.get_providers(digest))
        cfg = self._config
        deadline = trio.current_time() + cfg.lookup_timeout
        # The iterative lookup can spend its whole budget on one frozen peer: keep the closest
        # peers of our own routing table to ask, should it not finish in time.
        closest = dht.routing_table.find_local_closest_peers(digest, BUCKET_SIZE)
        with trio.move_on_at(deadline - min(cfg.fetch_timeout, cfg.lookup_timeout / 2)):
            closest = await dht.peer_routing.find_closest_peers_network(digest)

        async def ask(peer: ID) -> None:
            with trio.move_on_after(cfg.fetch_timeout):
                store = dht.provider_store
                add((await store._get_providers_from_peer_with_closers(peer, digest))[0])

        with trio.move_on_at(deadline):
            async with trio.open_nursery() as nursery:
                for peer in closest:
                    if peer != host.get_id():
                        nursery.start_soon(ask, peer)
        infos = [PeerInfo(peer, addrs) for peer, addrs in merged.items()]
        return infos[: self._config.max_providers]

    async def _fetch(
        self, info: PeerInfo, vkey: bytes, found: dict[str, bytes], limiter: trio.CapacityLimiter
    ) -> None:
        """One provider's own value, if it answers with a record it authored (`get` bounds it)."""
        host, dht = self._require()
        peer = info.peer_id
        if peer == host.get_id():
            record = dht.value_store.get(vkey)
            if record is not None:
                found[peer.to_base58()] = bytes(record.value)
            return
        async with limiter:
            if info.addrs:
                host.get_peerstore().add_addrs(peer, info.addrs, ADDR_TTL)
            answer = await dht.value_store._get_from_peer(peer, vkey, return_record=True)
            if isinstance(answer, Record) and _authored_by(answer, peer, vkey):
                found[peer.to_base58()] = bytes(answer.value)


async def _never_dial() -> None:
    """Stands in for the auto-connector's dialling round."""


def _single_leaf(exc: BaseException) -> BaseException:
    """The one exception inside nested single-member exception groups, else `exc` itself."""
    inner: tuple[BaseException, ...] = getattr(exc, "exceptions", ())
    while len(inner) == 1:
        exc = inner[0]
        inner = getattr(exc, "exceptions", ())
    return exc


def _authored_by(record: Record, peer: ID, vkey: bytes) -> bool:
    """Whether `record` holds a value for `vkey` signed by `peer`'s own key."""
    if not record.value or bytes(record.key) != vkey:
        return False
    try:
        author = peer.extract_public_key()
    except Exception:  # an ID that does not inline its key (RSA): cannot check, refuse
        return False
    if author is None or bytes(record.author) != author.serialize():
        return False
    return verify_record(record.signature, record.author, vkey, record.value)
