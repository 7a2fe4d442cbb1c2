"""The listening side: `serve_connections` accepts connections, proves both sides' IDs, and
runs a handler for each request in a task of its own (see `transport` for the framing, TLS and
private swarms both sides share)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from layerswarm.errors import (
    CacheFull,
    PeerUnavailable,
    ProtocolError,
    RemoteError,
    SessionExpired,
)
from layerswarm.swarm.identity import (
    Identity,
)
from layerswarm.swarm.limits import ConnectionCounter, ListenLimits
from layerswarm.swarm.protocol import (
    PROTOCOL_VERSION,
    REQUEST_TYPES,
    ErrorCode,
    ErrorReply,
    Goodbye,
    Hello,
    Message,
)
from layerswarm.swarm.relay import READY
from layerswarm.swarm.relay_ends import start_tls_channel
from layerswarm.swarm.transport import (
    HANDSHAKE_ID,
    TELL_CLIENT,
    Channel,
    TransportConfig,
    proven_peer_id,
    swarm_key_fault,
    swarm_key_proof,
    tls_context,
)

log = logging.getLogger(__name__)


def _error_reply(exc: Exception) -> ErrorReply:
    """The reply that tells a client about an exception its request raised."""
    if isinstance(exc, RemoteError) and 0 < len(exc.code) <= 64:
        code, message = exc.code, exc.message
    elif isinstance(exc, ProtocolError):
        code, message = ErrorCode.PROTOCOL, str(exc)
    elif isinstance(exc, CacheFull):
        code, message = ErrorCode.CACHE_FULL, str(exc)
    elif isinstance(exc, SessionExpired):
        code, message = ErrorCode.UNKNOWN_SESSION, str(exc)
    elif isinstance(exc, TimeoutError):
        code, message = ErrorCode.TIMEOUT, str(exc) or "timed out"
    else:
        log.error("request handler failed", exc_info=exc)
        code, message = ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}"
    return ErrorReply(code, message[:4096])


@dataclass(frozen=True)
class ConnectionInfo:
    """Who sent a request: the client's peer ID (proven by TLS) and its address."""

    peer_id: str
    host: str
    port: int
    local_port: int = 0  # this side's port of the connection (of its relay leg, if relayed)
    observed: str | None = None  # relayed: this side's host:port as the relay saw it


class Handler(Protocol):
    """Answers one request. Raise RemoteError(code, message) to answer with that error."""

    def __call__(self, conn: ConnectionInfo, msg: Message, /) -> Awaitable[Message]: ...


class _ServerConnection:
    """One accepted connection: its handshake, and a task per request in flight."""

    def __init__(self, server: Server) -> None:
        self._server = server
        config = server._config
        self.channel = Channel(
            config.max_frame_bytes, self._on_message, self._on_bad_frame, self._on_lost, self._start
        )
        self.info: ConnectionInfo | None = None  # set once the handshake is done
        self._proven_id: str | None = None
        self._tasks: set[asyncio.Task[None]] = set()  # owned here, cancelled on close
        self._timer: asyncio.TimerHandle | None = None
        self._reading_paused = False  # paused with max_concurrent_requests in flight
        self._backlog: collections.deque[tuple[int, Message]] = collections.deque()
        self._ip: str | None = None  # counted against the caps under this address, once held
        self._refusal: str | None = None  # why this connection is refused (told at its Hello)
        self._last_frame = 0.0  # unit: loop s of the last request, for the idle timeout
        self.observed: str | None = None  # relayed: this side as the relay saw it
        # Until its Hello, a client may send a Hello's worth of bytes, nothing larger.
        self.channel.limit_frames(server._limits.max_hello_frame_bytes)

    def _start(self) -> None:
        """Called once the transport is up, after the TLS handshake."""
        transport, server = self.channel.transport, self._server
        if transport is None or server._closing:
            self.channel.close(abort=True)
            return
        peername = transport.get_extra_info("peername")
        ip = str(peername[0]) if peername else "?"
        self._refusal = server._counter.refusal(ip)
        if self._refusal is None:
            self._ip = ip
            server._counter.add(ip)
        elif server._counter.refusing >= server._limits.max_refusing:
            self.channel.close(abort=True)  # refusing too many already: no words to spare
            return
        else:
            server._counter.refusing += 1
        server._connections.add(self)  # only now: a failed TLS handshake never gets here
        if not server._config.insecure_plaintext:
            try:
                self._proven_id = proven_peer_id(transport)
            except ValueError as exc:
                log.info("dropped a client that proved no peer ID: %s", exc)
                self.channel.close(abort=True)
                return
        self._timer = asyncio.get_running_loop().call_later(
            server._config.handshake_timeout, self.channel.close, True
        )

    def _check_idle(self) -> None:
        """Close the connection if it had no request in flight for the idle timeout."""
        loop, idle = asyncio.get_running_loop(), self._server._limits.idle_timeout
        left = self._last_frame + idle - loop.time()
        if self._tasks or self._backlog or left > 0:
            self._timer = loop.call_later(max(left, 1.0), self._check_idle)
            return
        log.info("closing a connection of %s idle for %g s", self.info, idle)
        message = f"closing this connection: idle for {idle:g} s (reconnect to go on)"
        self._reply(HANDSHAKE_ID, ErrorReply(ErrorCode.TIMEOUT, message))
        self.channel.close()

    def _on_message(self, request_id: int, msg: Message) -> None:
        self._last_frame = asyncio.get_running_loop().time()
        if self.info is None:
            self._handshake(request_id, msg)
        elif request_id == HANDSHAKE_ID or not isinstance(msg, REQUEST_TYPES):
            name = type(msg).__name__
            self._reply(request_id, ErrorReply(ErrorCode.PROTOCOL, f"{name} is not a request"))
        elif len(self._tasks) < self._server._config.max_concurrent_requests:
            self._spawn(self.info, request_id, msg)
        else:  # one read may hold many requests: keep the rest until a slot frees
            self._backlog.append((request_id, msg))
            if self.channel.transport is not None and not self._reading_paused:
                self.channel.transport.pause_reading()
                self._reading_paused = True

    def _spawn(self, info: ConnectionInfo, request_id: int, msg: Message) -> None:
        task = asyncio.get_running_loop().create_task(self._handle(info, request_id, msg))
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _handshake(self, request_id: int, msg: Message) -> None:
        server, transport = self._server, self.channel.transport
        swarm_key = server._config.swarm_key
        if request_id != HANDSHAKE_ID or not isinstance(msg, Hello) or msg.peer_id is None:
            error = ErrorReply(ErrorCode.PROTOCOL, "expected Hello with a peer ID first")
        elif self._refusal is not None:
            log.info("refused client %s: %s", msg.peer_id, self._refusal)
            error = ErrorReply(ErrorCode.BUSY, self._refusal)
        elif self._proven_id is not None and msg.peer_id != self._proven_id:
            error = ErrorReply(ErrorCode.PROTOCOL, "Hello's peer ID differs from the TLS proof")
        elif server._closing or server._leaving:
            error = ErrorReply(ErrorCode.SHUTTING_DOWN, "this peer is shutting down")
        elif fault := swarm_key_fault(swarm_key, msg.psk_proof, msg.peer_id, server.peer_id):
            log.info("refused client %s: swarm keys: %s", msg.peer_id, fault)
            error = ErrorReply(ErrorCode.SWARM_KEY, TELL_CLIENT[fault])
        else:
            if self._timer is not None:
                self._timer.cancel()
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(server._limits.idle_timeout, self._check_idle)
            self.channel.limit_frames(server._config.max_frame_bytes)
            peername = transport.get_extra_info("peername") if transport else None
            host, port = (peername[0], peername[1]) if peername else ("?", 0)
            local = transport.get_extra_info("sockname") if transport else None
            local_port = local[1] if local else 0
            self.info = ConnectionInfo(msg.peer_id, host, port, local_port, self.observed)
            self.channel.peer_max_frame_bytes = msg.max_frame_bytes
            proof = None
            if swarm_key is not None:
                proof = swarm_key_proof(swarm_key, server.peer_id, msg.peer_id)
            hello = Hello(PROTOCOL_VERSION, server.peer_id, server._config.max_frame_bytes, proof)
            self._reply(HANDSHAKE_ID, hello)
            return
        self._reply(HANDSHAKE_ID, error)
        self.channel.close()

    async def _handle(self, info: ConnectionInfo, request_id: int, msg: Message) -> None:
        try:
            reply = await self._server._handler(info, msg)
        except Exception as exc:
            reply = _error_reply(exc)
        self._reply(request_id, reply)
        if self.channel.paused:  # hold this request's slot until the client reads its reply
            try:
                await asyncio.wait_for(self.channel.drain(), self._server._config.request_timeout)
            except (asyncio.TimeoutError, PeerUnavailable):
                self.channel.close(abort=True)

    def _reply(self, request_id: int, reply: Message) -> None:
        try:
            self.channel.send(reply, request_id)
        except ProtocolError as exc:  # the handler built an invalid or oversized reply
            log.error("cannot send %s: %s", type(reply).__name__, exc)
            error = ErrorReply(ErrorCode.INTERNAL, f"invalid reply: {exc}"[:4096])
            self.channel.send(error, request_id)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        transport = self.channel.transport
        if self._backlog and self.info is not None and self.channel.open:
            self._spawn(self.info, *self._backlog.popleft())
        elif self._reading_paused and transport is not None and not transport.is_closing():
            self._reading_paused = False
            transport.resume_reading()
        if not task.cancelled() and task.exception() is not None:
            log.debug("request task ended with %r", task.exception())

    def _on_bad_frame(self, exc: ProtocolError) -> None:
        message = f"malformed frame{self.channel.hint()}: {exc}"
        if self.info is None:
            message += " (a connection's first frame must be its Hello)"
        log.info("closing a connection from %s: %s", self.info or "a client", message)
        self._reply(HANDSHAKE_ID, ErrorReply(ErrorCode.PROTOCOL, message))
        self.channel.close()

    def _on_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        counter = self._server._counter
        if self._ip is not None:
            counter.remove(self._ip)
            self._ip = None
        elif self._refusal is not None:
            counter.refusing -= 1
            self._refusal = None
        for task in self._tasks:
            task.cancel()
        self._server._connections.discard(self)
        on_disconnect = self._server._on_disconnect
        if self.info is not None and on_disconnect is not None:
            try:
                on_disconnect(self.info)
            except Exception:
                log.exception("on_disconnect callback failed")

    async def wait_closed(self, timeout: float) -> None:
        await self.channel.wait_lost(timeout)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


class Server:
    """A listening peer; from `serve_connections`."""

    def __init__(
        self,
        handler: Handler,
        identity: Identity,
        config: TransportConfig,
        on_disconnect: Callable[[ConnectionInfo], None] | None,
        limits: ListenLimits | None = None,
    ) -> None:
        self.peer_id = identity.peer_id
        self._identity = identity
        self._handler = handler
        self._on_disconnect = on_disconnect
        self._config = config
        self._limits = limits or ListenLimits()
        self._counter = ConnectionCounter(self._limits)
        self._listener: asyncio.Server | None = None
        self._connections: set[_ServerConnection] = set()
        self._closed: list[_ServerConnection] = []  # closed by close(), for wait_closed
        self._closing = False  # close() was called
        self._leaving = False  # say_goodbye() was called

    @property
    def port(self) -> int:
        """The TCP port listened on (the one chosen, when asked for port 0).

        With port 0 and a host name of several addresses, each socket gets its own port: this
        is the first one's. Listen on an IP address to have one port.
        """
        assert self._listener is not None  # set by serve_connections before it returns
        port: int = self._listener.sockets[0].getsockname()[1]
        return port

    def _new_connection(self) -> Channel:
        return _ServerConnection(self).channel

    async def accept_relayed(self, transport: asyncio.Transport, observed: str | None) -> None:
        """Serve a connection joined through a relay (`swarm/relay.py`) as one accepted here;
        `observed`: this side's address as the relay saw it (RelayJoined's).

        Writes the relay's READY byte, then runs the TLS server end over the joined stream.

        Raises:
            PeerUnavailable: the TLS handshake through the relay failed or timed out.
        """
        accepted = _ServerConnection(self)
        accepted.observed, channel = observed, accepted.channel
        transport.write(READY)  # nothing is read before start_tls takes the transport over
        if self._config.insecure_plaintext:
            transport.set_protocol(channel)
            channel.connection_made(transport)
            return
        context = tls_context(self._identity, server=True)
        timeout = self._config.handshake_timeout
        await start_tls_channel(transport, channel, context, True, timeout)

    async def accept_punched(self, sock: socket.socket) -> None:
        """Serve a hole-punched TCP connection (`swarm/punch.py`) as one accepted here, this
        side the TLS server as on the relayed connection it replaces."""
        context = None if self._config.insecure_plaintext else tls_context(self._identity, True)
        await asyncio.get_running_loop().connect_accepted_socket(
            self._new_connection,
            sock,
            ssl=context,
            ssl_handshake_timeout=self._config.handshake_timeout if context else None,
        )

    async def say_goodbye(self, reason: str) -> None:
        """Tell every client this peer is about to stop; new clients are refused from now on."""
        self._leaving = True
        goodbye = Goodbye(reason[:1024])
        ready = [c for c in self._connections if c.info is not None and c.channel.open]
        for connection in ready:
            connection._reply(HANDSHAKE_ID, goodbye)
        with contextlib.suppress(asyncio.TimeoutError, PeerUnavailable):
            await asyncio.wait_for(
                asyncio.gather(*(c.channel.drain() for c in ready)), self._config.close_timeout
            )

    def close(self) -> None:
        """Stop listening, close every connection, and cancel the requests in flight."""
        self._closing = True
        if self._listener is not None:
            self._listener.close()
        self._closed.extend(self._connections)
        for connection in self._closed:
            connection.channel.close()
            for task in connection._tasks:
                task.cancel()

    async def wait_closed(self) -> None:
        """Wait until the listener and every connection are closed."""
        if self._listener is not None:
            await self._listener.wait_closed()
        timeout = self._config.close_timeout
        await asyncio.gather(*(c.wait_closed(timeout) for c in self._closed))
        self._closed.clear()

    async def __aenter__(self) -> Server:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()
        await self.wait_closed()


async def serve_connections(
    handler: Handler,
    host: str,
    port: int,
    identity: Identity,
    config: TransportConfig | None = None,
    *,
    on_disconnect: Callable[[ConnectionInfo], None] | None = None,
    limits: ListenLimits | None = None,
) -> Server:
    """Listen for peers and answer their requests with `handler`.

    Each request runs in its own task, so one connection's requests may run concurrently.
    An exception from the handler becomes an ErrorReply (RemoteError keeps its code); a
    malformed frame gets an ErrorReply and closes that connection only.

    Args:
        handler: `await handler(conn_info, request) -> reply`.
        host, port: where to listen; port 0 picks a free port (see `Server.port`).
        identity: this peer's identity, proven to clients by its TLS certificate.
        config: timeouts and limits; TransportConfig() if None.
        on_disconnect: called (from the event loop, must not block) when a client's connection
            closes, after its requests in flight were cancelled; for freeing its sessions.
        limits: caps on connections (in all, per IP), idle time, bytes before Hello; each
            refused client is told why; ListenLimits() if None.

    Raises:
        OSError: the address cannot be listened on.
    """
    config = config or TransportConfig()
    server = Server(handler, identity, config, on_disconnect, limits)
    context = None if config.insecure_plaintext else tls_context(identity, server=True)
    server._listener = await asyncio.get_running_loop().create_server(
        server._new_connection,
        host,
        port,
        ssl=context,
        ssl_handshake_timeout=config.handshake_timeout if context else None,
        ssl_shutdown_timeout=config.close_timeout if context else None,
    )
    return server
