"""The dialing side of a connection: `open_connection` proves the peer's ID, and `Connection`
carries many requests at once, each reply handed to the future waiting for its id (see
`transport` for the framing, TLS and private swarms both sides share)."""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import ssl
from collections.abc import Callable

from layerswarm.errors import (
    PeerIdMismatch,
    PeerUnavailable,
    ProtocolError,
    RemoteError,
    SwarmKeyMismatch,
)
from layerswarm.swarm.identity import (
    Identity,
)
from layerswarm.swarm.protocol import (
    PROTOCOL_VERSION,
    ErrorCode,
    ErrorReply,
    Goodbye,
    Hello,
    Message,
)
from layerswarm.swarm.relay_ends import dial_through_relay, start_tls_channel
from layerswarm.swarm.transport import (
    HANDSHAKE_ID,
    TELL_SERVER,
    Address,
    Channel,
    TransportConfig,
    proven_peer_id,
    swarm_key_fault,
    swarm_key_proof,
    tls_context,
)

log = logging.getLogger(__name__)


class Connection:
    """A client's connection to one peer; `request` may be called by many tasks at once."""

    def __init__(
        self,
        address: Address,
        config: TransportConfig,
        on_goodbye: Callable[[Connection, str], None] | None,
    ) -> None:
        self.address = address
        self.peer_id = ""  # the peer's ID, proven by TLS (claimed in plaintext mode)
        self.goodbye_reason: str | None = None  # set when the peer said Goodbye
        # relayed: host:port this side came from, as the relay saw it (`swarm/punch.py`)
        self.observed: str | None = None
        self._config = config
        self._on_goodbye = on_goodbye
        self._channel = Channel(
            config.max_frame_bytes, self._on_message, self._on_bad_frame, self._on_lost
        )
        self._pending: dict[int, asyncio.Future[Message]] = {}
        self._ids = itertools.count(HANDSHAKE_ID + 1)
        self._last_id = HANDSHAKE_ID  # the newest request ID sent
        self._failure: str | None = None  # why the connection is unusable, once it is

    @property
    def sockname(self) -> tuple[str, int] | None:
        """This side's host and port of the TCP connection (of its relay leg, if relayed)."""
        transport = self._channel.transport
        name = transport.get_extra_info("sockname") if transport is not None else None
        return (str(name[0]), int(name[1])) if name else None

    @property
    def closed(self) -> bool:
        """Whether the connection is closed or broken; requests on it fail."""
        return self._failure is not None

    async def request(self, msg: Message, timeout: float | None = None) -> Message:
        """Send a request and wait for its reply.

        Args:
            msg: one of the request messages (InfoRequest, OpenSession, Step, CloseSession).
            timeout: seconds to wait for the reply; the config's request_timeout if None.

        Returns:
            The reply message. A tensor in it shares memory with the received frame.

        Raises:
            RemoteError: the peer answered with an ErrorReply.
            PeerUnavailable: the connection is or becomes closed, or no reply came in time.
            ProtocolError: `msg` is not a valid message, or too large for the peer.
        """
        if self._failure is not None:
            raise PeerUnavailable(self._failure)
        request_id = self._last_id = next(self._ids)
        if timeout is None:
            timeout = self._config.request_timeout
        reply = await self._exchange(msg, request_id, timeout)
        if isinstance(reply, ErrorReply):
            raise RemoteError(reply.code, reply.message)
        return reply

    async def _exchange(self, msg: Message, request_id: int, timeout: float) -> Message:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Message] = loop.create_future()
        self._channel.send(msg, request_id)
        self._pending[request_id] = future
        timer = loop.call_later(timeout, self._expire, request_id, timeout)
        try:  # no drain: the reply comes only once the peer has read the whole request
            return await future
        finally:
            timer.cancel()
            self._pending.pop(request_id, None)

    def _expire(self, request_id: int, timeout: float) -> None:
        future = self._pending.pop(request_id, None)
        if future is not None and not future.done():
            future.set_exception(
                PeerUnavailable(f"{self._name()} sent no reply within {timeout:g} s")
            )

    def _on_message(self, request_id: int, msg: Message) -> None:
        if request_id == HANDSHAKE_ID and isinstance(msg, Goodbye):
            self.goodbye_reason = msg.reason
            log.info("%s says goodbye: %s", self._name(), msg.reason)
            if self._on_goodbye is not None:
                try:
                    self._on_goodbye(self, msg.reason)
                except Exception:
                    log.exception("on_goodbye callback failed")
            return
        future = self._pending.pop(request_id, None)
        if future is not None and not future.done():
            future.set_result(msg)
        elif isinstance(msg, ErrorReply) and not HANDSHAKE_ID < request_id <= self._last_id:
            # An error about the connection itself (not about a request this side sent).
            self._fail(f"{self._name()} reported {msg.code}: {msg.message}")
        else:  # a late answer, an error reply included, to a request that timed out: harmless
            log.debug("dropped a reply to request %d (timed out or cancelled)", request_id)

    def _on_bad_frame(self, exc: ProtocolError) -> None:
        self._fail(f"{self._name()} sent a malformed frame{self._channel.hint()}: {exc}")
        self._channel.close(abort=True)

    def _on_lost(self, exc: Exception | None) -> None:
        self._fail(f"connection to {self._name()} closed" + (f": {exc}" if exc else ""))

    def _fail(self, reason: str) -> None:
        if self._failure is None:
            self._failure = reason
        for future in self._pending.values():
            if not future.done():
                future.set_exception(PeerUnavailable(self._failure))
        self._pending.clear()

    def _name(self) -> str:
        return f"peer {self.peer_id or '?'} at {self.address.host}:{self.address.port}"

    def close(self) -> None:
        """Start closing; requests in flight fail at once with PeerUnavailable."""
        self._fail(f"connection to {self._name()} closed by this side")
        self._channel.close()

    async def wait_closed(self) -> None:
        """Wait until the connection is gone (aborting it after config.close_timeout)."""
        await self._channel.wait_lost(self._config.close_timeout)

    async def __aenter__(self) -> Connection:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()
        await self.wait_closed()


async def open_connection(
    address: Address,
    identity: Identity,
    config: TransportConfig | None = None,
    *,
    on_goodbye: Callable[[Connection, str], None] | None = None,
    sock: socket.socket | None = None,
) -> Connection:
    """Connect to a peer, check who it is, and exchange Hellos.

    Args:
        address: where to dial; with a peer ID, only that peer is accepted.
        identity: this side's identity, proven to the peer with a TLS client certificate.
        config: timeouts and limits; TransportConfig() if None.
        on_goodbye: called (from the event loop, must not block) when the peer says Goodbye.
        sock: a TCP socket connected to `address` already (a hole punch's); TLS runs over it.

    Returns:
        An open connection whose `peer_id` is the ID the peer proved.

    Raises:
        PeerIdMismatch: the peer proved an ID other than `address.peer_id`.
        PeerUnavailable: no connection, a failed TLS handshake or proof, or a timeout.
        ProtocolError: the peer speaks another protocol version or refused our Hello.
    """
    config = config or TransportConfig()
    connection = Connection(address, config, on_goodbye)
    context = None if config.insecure_plaintext else tls_context(identity, server=False)
    try:
        if address.relay is not None:
            await _open_relayed(connection, address, context, config)
        else:
            await asyncio.wait_for(
                _open_tcp(connection, sock, context, config),
                config.connect_timeout + config.handshake_timeout,
            )
    except asyncio.TimeoutError as exc:
        raise PeerUnavailable(f"connecting to {address} timed out") from exc
    except ssl.SSLError as exc:
        hint = " (does the peer run insecure_plaintext?)"
        raise PeerUnavailable(f"TLS handshake with {address} failed: {exc}{hint}") from exc
    except OSError as exc:
        raise PeerUnavailable(f"cannot connect to {address}: {exc}") from exc
    try:
        await _client_handshake(connection, identity, config, context is not None)
    except BaseException:
        connection._channel.close(abort=True)
        await connection.wait_closed()
        raise
    return connection


async def _open_tcp(
    connection: Connection,
    sock: socket.socket | None,
    context: ssl.SSLContext | None,
    config: TransportConfig,
) -> None:
    """TCP (and TLS) to `connection.address`, or over `sock`, connected already."""
    loop = asyncio.get_running_loop()
    handshake = config.handshake_timeout if context else None
    shutdown = config.close_timeout if context else None
    if sock is not None:
        await loop.create_connection(
            lambda: connection._channel,
            sock=sock,
            ssl=context,
            server_hostname="" if context else None,  # no host to check: the ID is checked
            ssl_handshake_timeout=handshake,
            ssl_shutdown_timeout=shutdown,
        )
        return
    await loop.create_connection(
        lambda: connection._channel,
        connection.address.host,
        connection.address.port,
        ssl=context,
        ssl_handshake_timeout=handshake,
        ssl_shutdown_timeout=shutdown,
    )


async def _open_relayed(
    connection: Connection,
    address: Address,
    context: ssl.SSLContext | None,
    config: TransportConfig,
) -> None:
    """Reach `address.peer_id` through the relay at `address`, then TLS end to end with it.

    The relay copies bytes only: the TLS handshake, and the peer-ID check after it, are the
    same as on a direct dial, so a relay cannot pose as its target (`swarm/relay.py`).
    """
    if address.peer_id is None:
        raise PeerUnavailable(f"a relayed address needs the target's peer ID: {address}")
    timeout = config.connect_timeout + config.handshake_timeout
    raw, connection.observed = await dial_through_relay(
        address.host, address.port, address.peer_id, timeout
    )
    channel = connection._channel
    if context is None:
        raw.set_protocol(channel)
        channel.connection_made(raw)
        return
    await start_tls_channel(raw, channel, context, False, config.handshake_timeout)


async def _client_handshake(
    connection: Connection, identity: Identity, config: TransportConfig, tls: bool
) -> None:
    channel, address = connection._channel, connection.address
    if tls and channel.transport is not None:
        try:
            connection.peer_id = proven_peer_id(channel.transport)
        except ValueError as exc:
            raise PeerUnavailable(f"{address} did not prove a peer ID: {exc}") from exc
        _check_pin(address, connection.peer_id)
    proof = None
    if config.swarm_key is not None and connection.peer_id is not None:
        proof = swarm_key_proof(config.swarm_key, identity.peer_id, connection.peer_id)
    hello = Hello(PROTOCOL_VERSION, identity.peer_id, config.max_frame_bytes, proof)
    try:
        reply = await connection._exchange(hello, HANDSHAKE_ID, config.handshake_timeout)
    except PeerUnavailable as exc:
        hint = channel.hint() or (" (does the peer require TLS?)" if not tls else "")
        raise PeerUnavailable(f"handshake with {address} failed{hint}: {exc}") from exc
    if isinstance(reply, ErrorReply):
        refusal = f"{address} refused the handshake: {reply.code}: {reply.message}"
        if reply.code in (ErrorCode.SHUTTING_DOWN, ErrorCode.BUSY):  # full, not broken
            raise PeerUnavailable(refusal)
        if reply.code == ErrorCode.SWARM_KEY:
            raise SwarmKeyMismatch(refusal)
        raise ProtocolError(refusal)
    if not isinstance(reply, Hello) or reply.peer_id is None:
        raise ProtocolError(f"{address} answered Hello with {type(reply).__name__}")
    if tls and reply.peer_id != connection.peer_id:
        raise ProtocolError(f"{address} proved {connection.peer_id} but claims {reply.peer_id}")
    connection.peer_id = reply.peer_id
    channel.peer_max_frame_bytes = reply.max_frame_bytes
    _check_pin(address, connection.peer_id)
    fault = swarm_key_fault(config.swarm_key, reply.psk_proof, reply.peer_id, identity.peer_id)
    if fault is not None:
        raise SwarmKeyMismatch(f"refused peer {reply.peer_id} at {address}: {TELL_SERVER[fault]}")


def _check_pin(address: Address, peer_id: str) -> None:
    if address.peer_id is not None and address.peer_id != peer_id:
        raise PeerIdMismatch(
            f"{address.host}:{address.port} is peer {peer_id}, not {address.peer_id}"
        )
