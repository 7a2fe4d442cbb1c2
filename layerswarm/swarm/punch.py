"""Hole punching: two ends of a relayed connection open a direct TCP connection, DCUtR's way.

Semantics from libp2p's DCUtR spec (`relay/DCUtR.md`), over our own transport:

1. The dialer A (the client of the relayed connection) sends `HolePunch` with its address as
   the relay saw it (`RelayJoined.observed`: its NAT's mapping of its relay leg); the target B
   answers with its own. A measures that round trip.
2. A sends `HolePunchSync`. B, on reading it, opens TCP at once from its relay leg's local port
   to A's address; A does the same to B's address half a round trip after sending, so the two
   SYNs leave together. Each router has seen its own side's SYN go out when the other's comes
   in, and lets it through: a TCP simultaneous open. Home routers drop unsolicited SYNs; one
   that answers with a RST refuses the first SYN, so A tries a refused open again (backing
   off) until `punch_timeout`, and B listens on its port too.
3. A runs TLS as the client over its socket, pinned to B's peer ID as on any dial; B serves it
   as a connection accepted like any other. A closes the relayed connection: from then on the
   data plane (steps, pushes) does not cross the relay.

Why the relay leg's port: an endpoint-independent NAT (Linux masquerade keeps source ports)
maps a new connection from that local port to the same public port the relay saw, which is
what the other side aims at. The leg was opened from a socket with SO_REUSEADDR and
SO_REUSEPORT (`relay_ends.reusable_socket`), so the punch can bind the port while the leg lives.
A port-randomizing NAT (`masquerade random`) maps it elsewhere: the SYNs miss, the punch times
out, and the relayed connection stays, and works.

Why our own and not py-libp2p 0.8.1's `relay/circuit_v2/dcutr.py`: it runs on trio, its
protobuf streams ride libp2p's own connections, and its dial path drops relay addresses; our
data plane is asyncio with its own TLS and links keyed by peer ID, so only DCUtR's semantics
(Connect with observed addresses, a measured round trip, Sync, simultaneous open) carry over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from layerswarm.errors import LayerswarmError, PeerUnavailable, ProtocolError, RemoteError
from layerswarm.swarm.dial import Connection, open_connection
from layerswarm.swarm.identity import Identity
from layerswarm.swarm.listen import ConnectionInfo, Server
from layerswarm.swarm.messages import ErrorCode, HolePunch, HolePunchSync
from layerswarm.swarm.relay_ends import reusable_socket
from layerswarm.swarm.transport import Address, TransportConfig, parse_address

log = logging.getLogger(__name__)

# unit: s before a refused (RST) simultaneous open is tried again, doubling each time: ~6 SYNs
# in 3 s at most, so a peer that names someone else's address gets no SYN flood aimed there
REFUSED_RETRY = 0.05
MAX_PUNCHES = 8  # punches a peer answers at once; more are told BUSY


@dataclass
class PunchStats:
    """Hole punches answered here (shown in `swarm-peer status`'s nat summary, read by tests)."""

    punched: int = 0  # direct connections that replaced a relayed one
    failed: int = 0  # punches that timed out or were refused: the connection stays relayed


def _host_port(text: str) -> tuple[str, int]:
    try:
        address = parse_address(text)
    except ValueError as exc:
        raise ProtocolError(f"hole punch address: {exc}") from None
    return address.host, address.port


async def connect_from(
    port: int, remote: tuple[str, int], timeout: float, retry: bool = True
) -> socket.socket:
    """A TCP connection from local `port` (bound with reuse) to `remote`: one end of a
    simultaneous open; `retry`: try again after a refusal (backing off), until `timeout`.

    Raises:
        PeerUnavailable: no connection within `timeout` (the NAT maps the port elsewhere, or
            the other end never sent its SYN).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    wildcard = "::" if ":" in remote[0] else "0.0.0.0"
    pause = REFUSED_RETRY
    while True:
        sock = reusable_socket(remote[0])
        try:
            sock.bind((wildcard, port))
            await asyncio.wait_for(loop.sock_connect(sock, remote), deadline - loop.time())
            return sock
        except ConnectionRefusedError:  # a router that RSTs, before the other SYN opened it
            sock.close()
            if not retry or loop.time() + pause >= deadline:
                raise PeerUnavailable(f"simultaneous open to {remote} refused") from None
            await asyncio.sleep(pause)
            pause *= 2
        except (OSError, asyncio.TimeoutError) as exc:
            sock.close()
            raise PeerUnavailable(f"simultaneous open to {remote} failed: {exc!r}") from None
        except BaseException:
            sock.close()
            raise


async def _accept_from(port: int, remote: tuple[str, int]) -> socket.socket:
    """The first connection from `remote` to local `port`, on a listener bound with reuse."""
    loop = asyncio.get_running_loop()
    listener = reusable_socket(remote[0])
    try:
        listener.bind(("::" if ":" in remote[0] else "0.0.0.0", port))
        listener.listen(4)
        while True:
            sock, peer = await loop.sock_accept(listener)
            if (peer[0], peer[1]) == remote:
                sock.setblocking(False)
                return sock
            sock.close()  # not the dialer: someone else found the port open
    finally:
        listener.close()


async def open_simultaneous(port: int, remote: tuple[str, int], timeout: float) -> socket.socket:
    """The target's end: connect from `port` to `remote` while listening on `port` too.

    Behind NAT the two SYNs cross (a simultaneous open); where the dialer's SYN arrives after
    this side's connect was refused (a router's or a kernel's RST: loopback), the listener,
    bound with SO_REUSEPORT beside the relay leg, accepts it instead (go-libp2p listens on its
    dialing port the same way). One four-tuple, so one connection either way.

    Raises:
        PeerUnavailable: neither connected within `timeout`.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    accepting = asyncio.ensure_future(_accept_from(port, remote))
    # no retry: once refused, the listener waits for the dialer's next SYN instead
    connecting = asyncio.ensure_future(connect_from(port, remote, timeout, retry=False))
    winner: socket.socket | None = None
    try:
        pending = {accepting, connecting}
        while pending and winner is None and loop.time() < deadline:
            done, pending = await asyncio.wait(
                pending, timeout=deadline - loop.time(), return_when=asyncio.FIRST_COMPLETED
            )
            for task in done:
                if task.exception() is None and winner is None:
                    winner = task.result()
    finally:
        for task in (accepting, connecting):
            task.cancel()
        for result in await asyncio.gather(accepting, connecting, return_exceptions=True):
            if isinstance(result, socket.socket) and result is not winner:
                result.close()
    if winner is None:
        raise PeerUnavailable(f"no simultaneous open with {remote} within {timeout:g} s")
    return winner


class HolePunchService:
    """The target's side: answers `HolePunch` and `HolePunchSync` on relayed connections."""

    def __init__(self, transport: TransportConfig) -> None:
        self.server: Server | None = None  # serves the punched connections; set once listening
        self.stats = PunchStats()
        self._transport = transport
        self._asked: dict[ConnectionInfo, tuple[str, int]] = {}  # connection -> dialer's address
        self._slots = asyncio.Semaphore(MAX_PUNCHES)

    async def connect(self, conn: ConnectionInfo, msg: HolePunch) -> HolePunch:
        """Note the dialer's address; answer with this side's, as the relay saw it.

        Raises:
            RemoteError: PROTOCOL on a direct connection (nothing to punch).
            ProtocolError: the address is not host:port.
        """
        if conn.observed is None or conn.local_port == 0:
            raise RemoteError(ErrorCode.PROTOCOL, "hole punching runs on relayed connections only")
        remote = _host_port(msg.addresses[0])
        while len(self._asked) >= MAX_PUNCHES:  # punches never synced: the oldest forgotten
            del self._asked[next(iter(self._asked))]
        self._asked[conn] = remote
        return HolePunch((conn.observed,))

    async def sync(self, conn: ConnectionInfo, msg: HolePunchSync) -> HolePunchSync:
        """Open TCP to the dialer at once; serve it as an accepted connection if it connects.

        Raises:
            RemoteError: PROTOCOL without a `HolePunch` first; BUSY past MAX_PUNCHES at once.
        """
        remote = self._asked.pop(conn, None)
        if remote is None or self.server is None:
            raise RemoteError(ErrorCode.PROTOCOL, "hole_punch_sync before hole_punch")
        if self._slots.locked():
            raise RemoteError(ErrorCode.BUSY, "too many hole punches at once here: ask later")
        async with self._slots:
            try:
                timeout = self._transport.punch_timeout
                sock = await open_simultaneous(conn.local_port, remote, timeout)
                await self.server.accept_punched(sock)
            except (LayerswarmError, OSError, asyncio.TimeoutError) as exc:
                self.stats.failed += 1
                log.info("hole punch to %s (%s) failed: %s", conn.peer_id, remote, exc)
                return HolePunchSync(False)
        self.stats.punched += 1
        log.info("hole punched to %s at %s:%d", conn.peer_id, *remote)
        return HolePunchSync(True)


async def punch(
    relayed: Connection,
    identity: Identity,
    config: TransportConfig,
    on_goodbye: Callable[[Connection, str], None] | None = None,
) -> Connection | None:
    """The dialer's side: a direct connection to `relayed`'s peer, or None where none opened.

    Raises nothing a peer can cause: a refusal, a timeout or a bad answer is a failed punch.
    """
    local = relayed.sockname
    if relayed.observed is None or local is None:
        return None
    try:
        t0 = time.perf_counter()
        reply = await relayed.request(HolePunch((relayed.observed,)), config.punch_timeout)
        rtt = time.perf_counter() - t0
        if not isinstance(reply, HolePunch):
            raise ProtocolError(f"answered hole_punch with {type(reply).__name__}")
        host, port = _host_port(reply.addresses[0])
    except LayerswarmError as exc:
        log.info("no hole punch with %s: %s", relayed.peer_id, exc)
        return None
    target = Address(host, port, relayed.peer_id)
    wait = config.punch_timeout + config.handshake_timeout + 2 * rtt
    async with asyncio.TaskGroup() as tasks:
        synced = tasks.create_task(_sync(relayed, wait))
        direct = await _dial(target, local[1], rtt / 2, identity, config, on_goodbye)
    if direct is not None:
        log.info("hole punched to %s at %s (was %s)", relayed.peer_id, target, relayed.address)
    elif synced.result():
        log.info("%s connected to a punch this side did not (its connection is dropped)", target)
    return direct


async def _sync(relayed: Connection, timeout: float) -> bool:
    try:
        reply = await relayed.request(HolePunchSync(), timeout)
    except LayerswarmError as exc:
        log.info("hole punch sync with %s failed: %s", relayed.peer_id, exc)
        return False
    return isinstance(reply, HolePunchSync) and reply.connected


async def _dial(
    target: Address,
    port: int,
    delay: float,
    identity: Identity,
    config: TransportConfig,
    on_goodbye: Callable[[Connection, str], None] | None,
) -> Connection | None:
    await asyncio.sleep(delay)
    try:
        sock = await connect_from(port, (target.host, target.port), config.punch_timeout)
    except PeerUnavailable as exc:
        log.info("hole punch to %s failed: %s", target, exc)
        return None
    try:
        return await open_connection(target, identity, config, on_goodbye=on_goodbye, sock=sock)
    except LayerswarmError as exc:  # a punched port that another peer answered, TLS failing
        log.info("hole punched to %s, but the connection failed: %s", target, exc)
        with contextlib.suppress(OSError):
            sock.close()
        return None


async def open_punched(
    address: Address,
    identity: Identity,
    config: TransportConfig,
    on_goodbye: Callable[[Connection, str], None] | None = None,
) -> Connection:
    """`open_connection`; for a relayed address, then a hole punch: the direct connection where
    it opens (the relayed one closed), else the relayed one. `config.punch_timeout` 0: no punch.

    Raises:
        What `open_connection` raises; never for a failed punch.
    """
    conn = await open_connection(address, identity, config, on_goodbye=on_goodbye)
    if address.relay is None or config.punch_timeout <= 0:
        return conn
    direct = await punch(conn, identity, config, on_goodbye)
    if direct is None:
        return conn
    conn.close()
    await conn.wait_closed()
    return direct
