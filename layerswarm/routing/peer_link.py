"""One peer a swarm client was told about: its connection, its answers, and its view."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace

from layerswarm.errors import LayerswarmError, PeerUnavailable
from layerswarm.routing.paths import PeerView
from layerswarm.routing.peer_stats import (
    MAX_LOAD,
    PeerStats,
    bounded,
    claimed_seconds_per_layer,
)
from layerswarm.shards.config import Span
from layerswarm.swarm.dial import Connection
from layerswarm.swarm.identity import Identity
from layerswarm.swarm.protocol import InfoReply
from layerswarm.swarm.punch import open_punched
from layerswarm.swarm.records import PeerRecord
from layerswarm.swarm.transport import Address, TransportConfig, parse_address

log = logging.getLogger(__name__)


@dataclass
class PeerLink:
    """One peer the client was told about, and what it learned of it."""

    address: Address
    conn: Connection | None = None
    info: InfoReply | None = None
    rtt: float = 0.0  # unit: s, the info round trip measured here
    leaving: bool = False  # the peer said Goodbye
    discovered: bool = False  # from a record (mDNS, DHT), not from the caller
    skipped: str | None = None  # why its last answer made it unusable; None: it was fine
    skipped_error: LayerswarmError | None = None  # the error behind `skipped`
    told: str | None = None  # the `skipped` reason last logged (each new reason once)
    # every address its record lists, best first, pinned to its ID (discovered links): tried in
    # turn when `address` cannot be dialed, so a dead relay leaves the peer's others to use
    addresses: tuple[Address, ...] = ()

    def candidates(self) -> list[Address]:
        """Where to dial, in order: the address that worked last, then the record's others."""
        return [self.address, *(a for a in self.addresses if a != self.address)]

    @property
    def key(self) -> object:
        """What makes two links one peer: a relayed address names the peer's ID (peers behind
        one relay share its host and port); a direct one its host and port (a peer given as
        `host:port` has no ID until it is dialed)."""
        return link_key(self.address)

    @property
    def reach(self) -> str:
        """How this client reaches the peer: "direct", "relayed", or "punched" (a direct
        connection after a hole punch, `swarm/punch.py`, its address still the relayed one)."""
        if self.address.relay is None:
            return "direct"
        if self.conn is not None and self.conn.address.relay is None:
            return "punched"
        return "relayed"

    @property
    def live(self) -> bool:
        return self.conn is not None and not self.conn.closed and not self.leaving

    def view(self, stats: PeerStats) -> PeerView:
        """The router's view: measured speed where measured, else the peer's bounded claims."""
        assert self.info is not None and self.conn is not None  # only called on live links
        info = self.info
        measured = stats.seconds_per_layer(self.conn.peer_id)
        quant = info.extra.get("quant")
        return PeerView(
            peer_id=self.conn.peer_id,
            # the ID learned in the handshake: a route names each hop by it (`host:port/ID`),
            # though the peer was given as `host:port`
            address=str(replace(self.address, peer_id=self.conn.peer_id)),
            span=Span(info.span_start, info.span_end),
            seconds_per_layer=measured or claimed_seconds_per_layer(info.extra),
            # a measured step already includes the wait behind other sessions
            load=0.0 if measured else bounded(info.active_sessions, 0.0, MAX_LOAD, 0.0),
            rtt=self.rtt,
            dtype=info.dtype,
            quant=quant if isinstance(quant, str) else "none",
            # the connection's, not the address's: a punched one no longer crosses the relay,
            # while the route still names the relayed address (the next hop dials, and punches)
            relayed=self.conn.address.relay is not None,
        )


def link_key(address: Address) -> object:
    """`PeerLink.key` of a link at `address`."""
    if address.relay is not None:
        return address.peer_id
    return (address.host, address.port)


def record_addresses(record: PeerRecord) -> tuple[Address, ...]:
    """A record's addresses in its order, each pinned to the record's peer ID; addresses that
    cannot be dialed (a host name we do not dial, another peer's ID) are left out."""
    found: list[Address] = []
    for text in record.addresses:
        try:
            address = parse_address(text)
        except ValueError:
            continue
        if address.peer_id is None:
            address = replace(address, peer_id=record.peer_id)
        if address.peer_id == record.peer_id and address not in found:
            found.append(address)
    return tuple(found)


async def open_link(
    link: PeerLink,
    identity: Identity,
    transport: TransportConfig,
    on_goodbye: Callable[[Connection, str], None] | None = None,
) -> Connection:
    """Connect to a link's peer: the address that worked last, else its record's others in turn
    (the one that answers becomes `link.address`); a relayed one then tries a hole punch, and
    the direct connection replaces the relayed one where it opens.

    Raises:
        PeerUnavailable: no address answered (the last one's error); OSError likewise.
    """
    error: PeerUnavailable | OSError | None = None
    for address in link.candidates():
        try:
            conn = await open_punched(address, identity, transport, on_goodbye)
        except (PeerUnavailable, OSError) as e:
            log.debug("peer at %s is unreachable: %s", address, e)
            error = e
            continue
        if address != link.address:
            log.info("peer at %s reached at %s instead", link.address, address)
            link.address = address
        return conn
    assert error is not None  # candidates() holds link.address at least
    raise error
