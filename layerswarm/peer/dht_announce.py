"""A peer in the DHT: its node, and its record there, re-put before it expires.

The record is signed and stamped with a short validity (`PeerConfig.record_ttl`). A reader asks
each provider for its value directly (see `swarm.dht`) and drops a record once its `expires_at`
passes; so a peer that stops re-putting (killed, frozen, cut off) leaves every reader's view
within `record_ttl`, and one that stops cleanly leaves it at once (`close`).
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from layerswarm.errors import LayerswarmError, PeerUnavailable
from layerswarm.peer.announce import reachable_addresses
from layerswarm.peer.config import PeerConfig
from layerswarm.swarm.discovery import dht_key
from layerswarm.swarm.identity import Identity
from layerswarm.swarm.records import PeerRecord, bundle, sign_record, stamped

if TYPE_CHECKING:
    from layerswarm.swarm.dht import DhtNode

log = logging.getLogger(__name__)


async def open_peer_dht(config: PeerConfig, identity: Identity) -> DhtNode:
    """Start the peer's DHT node, under the peer's own identity, and join through `bootstrap`.

    Raises:
        PeerUnavailable: no bootstrap peer could be reached (a private swarm's members also
            refuse a node without their swarm key, or with another one).
        ValueError: a bad bootstrap multiaddr, swarm key or port.
        LayerswarmError: `config.host` is not an IPv4 address or name.
    """
    from layerswarm.swarm.dht import DhtNode  # libp2p loads only when a DHT is asked for

    bootstrap = list(config.bootstrap)
    try:
        node = await DhtNode.start(
            identity, dht_host(config), config.dht_port, bootstrap, config.swarm_key
        )
    except PeerUnavailable as e:
        raise PeerUnavailable(
            f"cannot join the DHT through {', '.join(bootstrap)}: {e} (in a private swarm, "
            "its members refuse a node without its swarm key, or with another one)"
        ) from e
    log.info("DHT node at %s (others can --bootstrap from it)", node.multiaddr)
    return node


def dht_host(config: PeerConfig) -> str:
    """The IPv4 address the DHT node listens on and advertises (it has no address discovery):
    the peer's `host`, or for 0.0.0.0 the address that reaches the first bootstrap peer (else
    the machine's first non-loopback one)."""
    if config.host in ("", "0.0.0.0"):
        if config.bootstrap:
            from layerswarm.swarm.dht import local_ip_towards

            return local_ip_towards(config.bootstrap[0])
        return reachable_addresses(config.host, 0)[0].rsplit(":", 1)[0]
    try:
        return socket.gethostbyname(config.host)
    except OSError as e:
        message = f"the DHT needs an IPv4 host to listen on, not {config.host}: {e}"
        raise LayerswarmError(message) from None


class RecordStore(Protocol):
    """The part of a `DhtNode` an announcer uses (a test double needs only these)."""

    async def put_record(self, key: str, value: bytes) -> None: ...

    async def remove_record(self, key: str) -> None: ...


class DhtAnnouncer:
    """Publishes one peer's signed record under its model's DHT key (the `Announcer` protocol)."""

    def __init__(
        self,
        node: RecordStore,
        identity: Identity,
        record_ttl: float = 60.0,
        carried: Callable[[], list[bytes]] = list,
    ) -> None:
        """`record_ttl` (s): each signed record's validity; it is re-put every third of it.
        `carried`: other peers' signed records to publish with this one (a relay's reservation
        holders', whom readers cannot dial: `swarm/relay.py`)."""
        if record_ttl <= 0:
            raise ValueError("record_ttl must be positive")
        self._node = node
        self._identity = identity
        self._record_ttl = record_ttl
        self._record: PeerRecord | None = None  # the last one put, as stamped
        self._key: str | None = None
        self._signed_at = 0.0  # monotonic s of the last put
        self._carried = carried
        self._carried_put: list[bytes] = []  # the carried records of the last put

    @property
    def refresh_interval(self) -> float:
        """s between re-puts of an unchanged record: a third of its validity, so that one
        late or failed put does not let it expire."""
        return self._record_ttl / 3

    @property
    def record(self) -> PeerRecord | None:
        """The record last put, as stamped and signed; None before `start`."""
        return self._record

    async def start(self, record: PeerRecord) -> None:
        """Put `record` (stamped, signed) under its model's key.

        A put that times out is logged, not raised: the value is stored here already, and the
        next update announces it again.

        Raises:
            InvalidRecord: `record` is out of range or not this identity's.
        """
        if self._key is not None:
            raise LayerswarmError("the DHT announcer is already started")
        self._key = dht_key(record.model_hash)
        try:
            await self._put(record)
        except TimeoutError:  # stored here already; others may not know yet: not fatal
            log.warning("announcing this peer in the DHT timed out; trying again later")

    async def update(self, record: PeerRecord) -> None:
        """Put `record` if it changed (its stamp aside) or the last put is due for a refresh."""
        if self._key is None:
            raise LayerswarmError("the DHT announcer is not started")
        if dht_key(record.model_hash) != self._key:
            raise LayerswarmError("a peer's model does not change while it runs")
        due = time.monotonic() - self._signed_at >= self.refresh_interval
        carried_changed = self._carried() != self._carried_put
        if due or carried_changed or _unstamped(record) != _unstamped(self._record):
            await self._put(record)

    async def close(self) -> None:
        """Stop serving the record: readers drop this peer at their next look."""
        key, self._key = self._key, None
        if key is not None:
            await self._node.remove_record(key)

    async def _put(self, record: PeerRecord) -> None:
        assert self._key is not None  # set by start
        record = stamped(record, self._record_ttl)
        signed = sign_record(record, self._identity)
        self._record, self._signed_at = record, time.monotonic()
        self._carried_put = self._carried()
        value = bundle([signed, *self._carried_put]) if self._carried_put else signed
        await self._node.put_record(self._key, value)


def _unstamped(record: PeerRecord | None) -> PeerRecord | None:
    return None if record is None else dataclasses.replace(record, timestamp=0.0, expires_at=0.0)
