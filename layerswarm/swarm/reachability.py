"""Knowing whether others can dial this peer: ask peers to dial back on a fresh connection.

Semantics from libp2p's AutoNAT spec (`autonat/README.md`, v1; v2 adds the same rule): the
asking peer names a port, the answering peer dials it back on a *new* connection, and only at
the IP address the request came from, so no peer can use another to dial a third party. The
answer also says which IP and port the answerer saw: the asker's public address as others see
it (libp2p's identify `observedAddr`).

Why not py-libp2p 0.8.1's AutoNAT: its server dials back over the connection that already
exists, so it answers "reachable" whatever the NAT does (ARCHITECTURE.md, "Home routers").

A dial-back is our own `open_connection` with the asker's peer ID pinned: TLS proves that the
peer that answered at `observed_ip:port` is the asker, so no nonce is needed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from layerswarm.errors import LayerswarmError, PeerUnavailable, RemoteError
from layerswarm.swarm.dial import open_connection
from layerswarm.swarm.identity import Identity
from layerswarm.swarm.listen import ConnectionInfo
from layerswarm.swarm.messages import DialBack, DialBackReply, ErrorCode
from layerswarm.swarm.transport import Address, TransportConfig

log = logging.getLogger(__name__)

PUBLIC, RELAYED, PRIVATE, UNKNOWN = "public", "relayed", "private", "unknown"


class DialBackService:
    """Answers `DialBack`: dial the asker at its observed IP and the port it names."""

    def __init__(
        self, identity: Identity, transport: TransportConfig, timeout: float, max_dials: int = 8
    ) -> None:
        self._identity = identity
        self._transport = transport
        self._timeout = timeout  # unit: s for one dial-back, TCP to Hello
        self._slots = asyncio.Semaphore(max_dials)
        self.relay_port = 0  # this peer's relay port, told to askers; 0: not a relay

    async def answer(self, conn: ConnectionInfo, msg: DialBack) -> DialBackReply:
        """Dial `conn.host:msg.port`, expecting `conn.peer_id`; say whether that worked.

        Raises:
            RemoteError: BUSY when max_dials dial-backs are running already.
        """
        if self._slots.locked():
            raise RemoteError(ErrorCode.BUSY, "too many dial-backs at once here: ask later")
        async with self._slots:
            reason = await self._dial(conn, msg.port)
        return DialBackReply(reason == "", conn.host, conn.port, reason[:1024], self.relay_port)

    async def _dial(self, conn: ConnectionInfo, port: int) -> str:
        address = Address(conn.host, port, conn.peer_id)
        try:
            connection = await asyncio.wait_for(
                open_connection(address, self._identity, self._transport), self._timeout
            )
        except asyncio.TimeoutError:
            return f"no answer at {address} within {self._timeout:g} s"
        except LayerswarmError as exc:
            return f"{type(exc).__name__}: {exc}"
        connection.close()
        await connection.wait_closed()
        return ""


@dataclass(frozen=True)
class Answer:
    """One peer's answer to a dial-back request."""

    asked: Address  # the peer asked
    reachable: bool
    observed: str  # host:port this side's request came from, as that peer saw it
    reason: str
    relay_port: int  # that peer relays on this port; 0: it does not


@dataclass(frozen=True)
class Reachability:
    """What the answers say: whether this peer is reachable, and at which public address."""

    status: str  # PUBLIC (dialed back), PRIVATE (asked, never dialed back) or UNKNOWN (no answer)
    public_address: str | None  # host:port that dialed back fine; None unless PUBLIC
    observed_host: str | None  # this side's IP address as the answerers saw it, most often
    answers: tuple[Answer, ...]

    @property
    def relays(self) -> list[Address]:
        """The answerers that serve as relays (their data-plane addresses, to reserve on)."""
        return [a.asked for a in self.answers if a.relay_port]


def summarize(answers: Sequence[Answer], port: int) -> Reachability:
    """Public when any answerer dialed back; private when some answered and none did."""
    hosts = [a.observed.rpartition(":")[0] for a in answers]
    observed = max(set(hosts), key=hosts.count) if hosts else None
    good = [a for a in answers if a.reachable]
    if good:
        host = good[0].observed.rpartition(":")[0]
        return Reachability(PUBLIC, f"{host}:{port}", observed, tuple(answers))
    return Reachability(PRIVATE if answers else UNKNOWN, None, observed, tuple(answers))


async def ask_dial_back(
    peers: Sequence[Address],
    identity: Identity,
    port: int,
    transport: TransportConfig,
    timeout: float,
) -> Reachability:
    """Ask each peer (at once) to dial this side back at `port`; sum up their answers.

    Args:
        peers: data-plane addresses of other peers, peer IDs pinned (bootstrap or met peers).
        identity: this side's identity (the answerer dials back expecting its peer ID).
        port: the TCP port this side listens on and plans to announce.
        transport: timeouts and TLS for the requests.
        timeout: s: for one whole ask (connect, the answerer's dial-back, the reply).

    Returns:
        A `Reachability`; peers that fail to answer count as no answer, never as "not
        reachable".
    """
    results = await asyncio.gather(*(_ask(p, identity, port, transport, timeout) for p in peers))
    return summarize([a for a in results if a is not None], port)


async def _ask(
    peer: Address, identity: Identity, port: int, transport: TransportConfig, timeout: float
) -> Answer | None:
    try:
        async with await open_connection(peer, identity, transport) as connection:
            reply = await connection.request(DialBack(port), timeout)
    except (LayerswarmError, PeerUnavailable) as exc:
        log.info("no dial-back answer from %s: %s", peer, exc)
        return None
    if not isinstance(reply, DialBackReply):
        log.info("%s answered DialBack with %s", peer, type(reply).__name__)
        return None
    observed = f"{reply.observed_host}:{reply.observed_port}"
    log.info(
        "%s says this peer is %s (seen as %s)%s",
        peer,
        "reachable" if reply.reachable else "not reachable",
        observed,
        f": {reply.reason}" if reply.reason else "",
    )
    return Answer(peer, reply.reachable, observed, reply.reason, reply.relay_port)
