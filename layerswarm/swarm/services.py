"""The swarm's own requests beside a peer's: dial-backs, relay reservations and hole punches,
then the rest.

`SwarmServices(inner, dial_back, punch)` is a `listen.Handler`: it answers `DialBack`,
`Reserve`, `AwaitRelayed`, `HolePunch` and `HolePunchSync`, and hands every other request to
`inner` (the peer's request handler), so the peer's handler needs to know nothing of NAT.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from layerswarm.errors import RemoteError
from layerswarm.swarm.listen import ConnectionInfo, Handler
from layerswarm.swarm.messages import (
    AwaitRelayed,
    DialBack,
    ErrorCode,
    HolePunch,
    HolePunchSync,
    InfoReply,
    JsonValue,
    Message,
    Reserve,
)
from layerswarm.swarm.punch import HolePunchService
from layerswarm.swarm.reachability import DialBackService
from layerswarm.swarm.relay import Relay


class SwarmServices:
    """Answers the swarm's requests; passes the others on."""

    def __init__(
        self,
        inner: Handler,
        dial_back: DialBackService | None,
        punch: HolePunchService | None = None,
    ) -> None:
        self.inner = inner
        self.dial_back = dial_back  # None: this peer does not dial back
        self.punch = punch  # None: this peer does not answer hole punches
        # what an InfoReply's extra says under "nat", fresh at each request (relay counters)
        self.nat_summary: Callable[[], dict[str, JsonValue]] | None = None
        self.relay: Relay | None = None  # set once this peer serves as a relay (`serve_relay`)

    def serve_relay(self, relay: Relay | None) -> None:
        """Answer reservations with `relay` (None: no more), and tell askers of dial-backs."""
        self.relay = relay
        if self.dial_back is not None:
            self.dial_back.relay_port = relay.port if relay is not None else 0

    async def __call__(self, conn: ConnectionInfo, msg: Message) -> Message:
        if isinstance(msg, DialBack):
            if self.dial_back is None:
                raise RemoteError(ErrorCode.PROTOCOL, "this peer does not answer dial-backs")
            return await self.dial_back.answer(conn, msg)
        if isinstance(msg, (HolePunch, HolePunchSync)):
            if self.punch is None:
                raise RemoteError(ErrorCode.PROTOCOL, "this peer does not answer hole punches")
            if isinstance(msg, HolePunch):
                return await self.punch.connect(conn, msg)
            return await self.punch.sync(conn, msg)
        if isinstance(msg, (Reserve, AwaitRelayed)):
            if self.relay is None:
                raise RemoteError(
                    ErrorCode.NO_RESERVATION,
                    "this peer is no relay (it is not publicly reachable, or runs --relay off)",
                )
            if isinstance(msg, Reserve):
                return self.relay.reserve(conn.peer_id, msg.record)
            return await self.relay.await_relayed(conn.peer_id)
        reply = await self.inner(conn, msg)
        if isinstance(reply, InfoReply) and self.nat_summary is not None:
            reply = replace(reply, extra={**reply.extra, "nat": self.nat_summary()})
        return reply
