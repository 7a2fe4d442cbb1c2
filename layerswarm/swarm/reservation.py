"""A peer behind NAT holds a reservation on a relay and accepts the dialers it relays.

The holder's side of `swarm/relay.py`: a TLS connection to the relay's data-plane port carries
`Reserve` (renewed every half ttl) and one `AwaitRelayed` in flight; each `Relayed(token)` makes
a fresh outbound TCP connection to the relay port, which `Server.accept_relayed` then serves as
an accepted connection, TLS server end and all.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from layerswarm.errors import LayerswarmError, PeerUnavailable, ProtocolError
from layerswarm.swarm.dial import Connection, open_connection
from layerswarm.swarm.identity import Identity
from layerswarm.swarm.listen import Server
from layerswarm.swarm.messages import AwaitRelayed, RelayAccept, Relayed, Reserve, Reserved
from layerswarm.swarm.relay_ends import open_relay_stream
from layerswarm.swarm.transport import CIRCUIT, Address, TransportConfig

log = logging.getLogger(__name__)


class Reservation:
    """One relay's reservation for this peer, and the relayed connections it brings."""

    def __init__(
        self,
        relay: Address,
        identity: Identity,
        transport: TransportConfig,
        server: Server,
        record: Callable[[], bytes | None] = lambda: None,
        record_interval: float = 20.0,
    ) -> None:
        """`record`: this peer's signed record for the relay to carry (None: none), renewed
        every `record_interval` s at most (a third of its validity)."""
        if relay.peer_id is None:
            raise ValueError(f"a relay's address needs its peer ID: {relay}")
        self.relay = relay  # the relay's data-plane address, its peer ID pinned
        self.reserved: Reserved | None = None  # the relay's terms, once it reserved
        self.accepted = 0  # relayed connections accepted, in all
        self._identity = identity
        self._transport = transport
        self._server = server
        self._record = record
        self._record_interval = record_interval

    @property
    def address(self) -> str | None:
        """The relayed address to announce, `host:port/RELAYID/p2p-circuit`; None until held."""
        if self.reserved is None:
            return None
        host = f"[{self.relay.host}]" if ":" in self.relay.host else self.relay.host
        return f"{host}:{self.reserved.relay_port}/{self.relay.peer_id}/{CIRCUIT}"

    async def serve(self, on_held: asyncio.Event | None = None) -> None:
        """Reserve, keep the reservation, and accept dialers until cancelled.

        Raises:
            PeerUnavailable: the relay cannot be reached, refused, or the connection broke.
            ProtocolError: the relay answered with something unexpected.
        """
        connection = await open_connection(self.relay, self._identity, self._transport)
        try:
            self.reserved = await self._reserve(connection)
            # Again, now that the record to carry can name the relayed address just granted.
            self.reserved = await self._reserve(connection)
            log.info("holding a reservation on relay %s: %s", self.relay, self.address)
            if on_held is not None:
                on_held.set()
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._renew(connection, self.reserved.ttl))
                while True:
                    token = await self._next_dialer(connection, self.reserved.ttl)
                    if token is not None:
                        tasks.create_task(self._accept(token))
        finally:
            self.reserved = None
            connection.close()
            await connection.wait_closed()

    async def _reserve(self, connection: Connection) -> Reserved:
        reply = await connection.request(Reserve(self._record()))
        if not isinstance(reply, Reserved):
            raise ProtocolError(f"relay {self.relay} answered Reserve with {type(reply).__name__}")
        return reply

    async def _renew(self, connection: Connection, ttl: float) -> None:
        while True:
            await asyncio.sleep(min(ttl / 2, self._record_interval))
            self.reserved = await self._reserve(connection)

    async def _next_dialer(self, connection: Connection, ttl: float) -> bytes | None:
        try:
            reply = await connection.request(AwaitRelayed(), ttl + self._transport.request_timeout)
        except PeerUnavailable:
            if connection.closed:
                raise
            return None  # no dialer within the wait: ask again
        if not isinstance(reply, Relayed):
            raise ProtocolError(f"relay {self.relay} answered AwaitRelayed with {reply!r:.80}")
        return reply.token

    async def _accept(self, token: bytes) -> None:
        reserved = self.reserved
        if reserved is None:
            return
        timeout = self._transport.connect_timeout + self._transport.handshake_timeout
        try:
            transport, _, observed = await open_relay_stream(
                self.relay.host, reserved.relay_port, RelayAccept(token), timeout
            )
            await self._server.accept_relayed(transport, observed)
        except (LayerswarmError, OSError) as exc:
            log.info("could not accept a dialer through relay %s: %s", self.relay, exc)
            return
        self.accepted += 1
