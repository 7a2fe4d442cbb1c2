"""Connections between peers: one long-lived, mutually authenticated TCP connection per pair.

Requests carry ids, so many are in flight on one connection at once: the client's reader (the
protocol's callbacks, no task) hands each reply to the future waiting for its id, and the
server runs the handler of each request in a task of its own.

Both sides speak TLS 1.3 with a certificate that proves their peer ID (see `identity`): the
dialer checks the listener's ID right after the handshake, and the listener learns the dialer's.
`TransportConfig(insecure_plaintext=True)` turns TLS off; peer IDs are then claims, not proofs.

Private swarms: with `TransportConfig(swarm_key=...)` each side's Hello carries
`psk_proof = HMAC-SHA256(swarm_key, PSK_DOMAIN + sender ID + 0 + receiver ID)`, and each side
checks the other's. Both IDs are proven by TLS, so a proof is good for one pair of peers only:
a side that sees one learns nothing it could use with anybody else. A side without the key, or
with another one, is refused (`SwarmKeyMismatch`) before any request; so is a side with a key
by one without. Under insecure_plaintext the proof could be replayed, so the two do not mix.

Measured before it was chosen (ARCHITECTURE.md): asyncio on uvloop with length-prefixed frames
is ~20x faster per round trip than py-libp2p's streams, so the data plane does not use libp2p.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import hashlib
import hmac
import itertools
import logging
import socket
import ssl
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, cast

from layerswarm.errors import (
    CacheFull,
    PeerIdMismatch,
    PeerUnavailable,
    ProtocolError,
    RemoteError,
    SessionExpired,
    SwarmKeyMismatch,
)
from layerswarm.swarm.identity import (
    Identity,
    make_tls_certificate,
    peer_id_from_tls_certificate,
    public_key_from_peer_id,
    shared_issuer_certificate_pem,
)
from layerswarm.swarm.protocol import (
    MAX_FRAME_BYTES,
    PROTOCOL_VERSION,
    REQUEST_TYPES,
    ErrorCode,
    ErrorReply,
    FrameReader,
    Goodbye,
    Hello,
    Message,
    decode_frame,
    encode,
)

log = logging.getLogger(__name__)

HANDSHAKE_ID = 0  # request id of Hello, Goodbye and errors about the connection itself
PSK_DOMAIN = b"layerswarm-psk-v1"  # HMAC'd before the two peer IDs: no other MAC matches
SWARM_KEY_BYTES = 32  # bytes: a private swarm's pre-shared key (the DHT's too)


@dataclass(frozen=True)
class TransportConfig:
    connect_timeout: float = 5.0  # s: TCP connect
    handshake_timeout: float = 5.0  # s: TLS handshake, then the Hello exchange
    request_timeout: float = 30.0  # s: wait for a reply when `request` is given no timeout
    close_timeout: float = 2.0  # s: wait for a closing connection (TLS close_notify, Goodbye)
    max_frame_bytes: int = MAX_FRAME_BYTES  # bytes: the largest frame this side accepts
    max_concurrent_requests: int = 256  # requests: a server stops reading a connection past this
    insecure_plaintext: bool = False  # no TLS: IDs are claimed, not proven; trusted LANs only
    swarm_key: bytes | None = None  # 32 bytes: talk only to peers that hold it; None: anyone

    def __post_init__(self) -> None:
        if self.swarm_key is not None:
            if len(self.swarm_key) != SWARM_KEY_BYTES:
                raise ValueError(
                    f"swarm key has {len(self.swarm_key)} bytes, expected {SWARM_KEY_BYTES}"
                )
            if self.insecure_plaintext:
                raise ValueError("a swarm key needs TLS: over plaintext its proof can be replayed")
        for name in ("connect_timeout", "handshake_timeout", "request_timeout", "close_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")
        if self.max_frame_bytes < 1024 or self.max_concurrent_requests < 1:
            raise ValueError("max_frame_bytes must be >= 1024, max_concurrent_requests >= 1")


@dataclass(frozen=True)
class Address:
    """Where a peer listens, and optionally which peer ID must answer there."""

    host: str
    port: int
    peer_id: str | None = None

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}" + (f"/{self.peer_id}" if self.peer_id else "")


def parse_address(text: str) -> Address:
    """Parse `host:port` or `host:port/PEERID` (IPv6 hosts in brackets: `[::1]:port`).

    Raises:
        ValueError: the text is not such an address, or PEERID is not an Ed25519 peer ID.
    """
    hostport, _, peer_id = text.strip().partition("/")
    host, sep, port_text = hostport.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"not a host:port[/peer_id] address: {text!r}")
    if peer_id:
        public_key_from_peer_id(peer_id)  # raises ValueError for anything else
    return Address(host, int(port_text), peer_id or None)


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A uvloop event loop where uvloop is installed, else a plain asyncio one.

    Use as `asyncio.Runner(loop_factory=new_event_loop)`.
    """
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def install_uvloop() -> bool:
    """Make uvloop the event loop policy when it is installed; returns whether it is."""
    try:
        import uvloop
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


# --- framing over an asyncio transport ---------------------------------------------------------


class _Channel(asyncio.BufferedProtocol):
    """Frames in and out of one transport; the owner gets decoded messages by callback."""

    def __init__(
        self,
        max_frame_bytes: int,
        on_message: Callable[[int, Message], None],
        on_bad_frame: Callable[[ProtocolError], None],
        on_lost: Callable[[Exception | None], None],
        on_open: Callable[[], None] | None = None,
    ) -> None:
        self.transport: asyncio.Transport | None = None
        self.first_bytes = b""  # for error messages: does the other side speak TLS?
        self.peer_max_frame_bytes = MAX_FRAME_BYTES
        self._reader = FrameReader(max_frame_bytes)
        self._max_frame_bytes = max_frame_bytes
        self._on_message, self._on_bad_frame, self._on_lost = on_message, on_bad_frame, on_lost
        self._on_open = on_open
        self._view: memoryview | None = None
        self._broken = False
        self._paused = False
        self._waiters: list[asyncio.Future[None]] = []
        self._lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TLS transport is no asyncio.Transport subclass, but has the same methods.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._on_open is not None:
            self._on_open()

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._broken:  # read and drop whatever arrives until the transport closes
            return memoryview(bytearray(2**16))
        view = self._reader.get_buffer()
        if len(self.first_bytes) < 2:
            self._view = view
        return view

    def buffer_updated(self, nbytes: int) -> None:
        if self._broken:
            return
        if self._view is not None:
            self.first_bytes += bytes(self._view[: min(nbytes, 2 - len(self.first_bytes))])
            self._view = None
        try:
            for frame in self._reader.buffer_updated(nbytes):
                request_id, msg = decode_frame(frame, self._max_frame_bytes)
                self._on_message(request_id, msg)
                if self._broken:
                    return
        except ProtocolError as exc:
            self._broken = True
            self._on_bad_frame(exc)

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self._broken = True
        self._lost.set_result(None)
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(PeerUnavailable("connection lost while sending"))
        self._waiters.clear()
        self._on_lost(exc)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._waiters.clear()

    @property
    def open(self) -> bool:
        return self.transport is not None and not self._lost.done() and not self._broken

    def send(self, msg: Message, request_id: int) -> None:
        """Write one frame (no copy of a tensor payload on uvloop and TLS transports).

        Raises:
            ProtocolError: `msg` is invalid, or larger than the other side accepts.
        """
        chunks = encode(msg, request_id)
        size = sum(len(c) if isinstance(c, bytes) else c.nbytes for c in chunks) - 4
        if size > self.peer_max_frame_bytes:
            raise ProtocolError(f"frame of {size} bytes exceeds the peer's limit")
        if self.transport is not None and not self.transport.is_closing():
            self.transport.writelines(chunks)

    @property
    def paused(self) -> bool:
        """Whether the transport's write buffer is above its high-water mark."""
        return self._paused

    async def drain(self) -> None:
        """Wait until the transport's write buffer is below its high-water mark."""
        if self._paused and not self._lost.done():
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            await waiter

    def close(self, abort: bool = False) -> None:
        self._broken = True
        if self.transport is not None:
            self.transport.abort() if abort else self.transport.close()

    async def wait_lost(self, timeout: float) -> None:
        """Wait for the transport to be gone; abort it if it lingers past `timeout`."""
        if self.transport is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._lost), timeout)
        except asyncio.TimeoutError:
            self.transport.abort()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._lost), timeout)

    def hint(self) -> str:
        """A guess at why the handshake failed, from the first bytes the other side sent."""
        head = self.first_bytes
        if len(head) == 2 and head[0] in range(0x14, 0x18) and head[1] == 0x03:
            return " (the other side speaks TLS; this side runs insecure_plaintext)"
        return ""


@functools.lru_cache(maxsize=16)
def _tls_context(identity: Identity, server: bool) -> ssl.SSLContext:
    """A TLS 1.3 context with a fresh certificate proving `identity`, one per process."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    cert_pem, key_pem = make_tls_certificate(identity)
    with tempfile.TemporaryDirectory() as folder:  # ssl loads certificates from files only
        cert_path, key_path = Path(folder, "cert.pem"), Path(folder, "key.pem")
        cert_path.write_bytes(cert_pem)
        key_path.touch(mode=0o600)
        key_path.write_bytes(key_pem)
        context.load_cert_chain(cert_path, key_path)
    if server:  # ask for the client's certificate; its chain is the shared issuer's
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cadata=shared_issuer_certificate_pem().decode())
    else:  # the server's identity is checked after the handshake, from its certificate
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _proven_peer_id(transport: asyncio.BaseTransport) -> str:
    ssl_object = transport.get_extra_info("ssl_object")
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    if not der:
        raise ValueError("no TLS certificate")
    return peer_id_from_tls_certificate(der)


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


# --- the dialing side --------------------------------------------------------------------------


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
        self._config = config
        self._on_goodbye = on_goodbye
        self._channel = _Channel(
            config.max_frame_bytes, self._on_message, self._on_bad_frame, self._on_lost
        )
        self._pending: dict[int, asyncio.Future[Message]] = {}
        self._ids = itertools.count(HANDSHAKE_ID + 1)
        self._last_id = HANDSHAKE_ID  # the newest request ID sent
        self._failure: str | None = None  # why the connection is unusable, once it is

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
) -> Connection:
    """Connect to a peer, check who it is, and exchange Hellos.

    Args:
        address: where to dial; with a peer ID, only that peer is accepted.
        identity: this side's identity, proven to the peer with a TLS client certificate.
        config: timeouts and limits; TransportConfig() if None.
        on_goodbye: called (from the event loop, must not block) when the peer says Goodbye.

    Returns:
        An open connection whose `peer_id` is the ID the peer proved.

    Raises:
        PeerIdMismatch: the peer proved an ID other than `address.peer_id`.
        PeerUnavailable: no connection, a failed TLS handshake or proof, or a timeout.
        ProtocolError: the peer speaks another protocol version or refused our Hello.
    """
    config = config or TransportConfig()
    loop = asyncio.get_running_loop()
    connection = Connection(address, config, on_goodbye)
    context = None if config.insecure_plaintext else _tls_context(identity, server=False)
    try:
        await asyncio.wait_for(
            loop.create_connection(
                lambda: connection._channel,
                address.host,
                address.port,
                ssl=context,
                ssl_handshake_timeout=config.handshake_timeout if context else None,
                ssl_shutdown_timeout=config.close_timeout if context else None,
            ),
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


async def _client_handshake(
    connection: Connection, identity: Identity, config: TransportConfig, tls: bool
) -> None:
    channel, address = connection._channel, connection.address
    if tls and channel.transport is not None:
        try:
            connection.peer_id = _proven_peer_id(channel.transport)
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
        if reply.code == ErrorCode.SHUTTING_DOWN:
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
    fault = _swarm_key_fault(config.swarm_key, reply.psk_proof, reply.peer_id, identity.peer_id)
    if fault is not None:
        raise SwarmKeyMismatch(f"refused peer {reply.peer_id} at {address}: {_TELL_SERVER[fault]}")


def swarm_key_proof(swarm_key: bytes, sender: str, receiver: str) -> bytes:
    """What `sender` puts in its Hello to `receiver` to show it holds `swarm_key`."""
    data = PSK_DOMAIN + sender.encode() + b"\0" + receiver.encode()
    return hmac.new(swarm_key, data, hashlib.sha256).digest()


# Why the other side's Hello does not match this side's swarm key, as told to each side.
_KEY_THERE_ONLY, _KEY_HERE_ONLY, _KEYS_DIFFER = "there only", "here only", "differ"
_TELL_CLIENT = {  # the server's refusal, read by the client
    _KEY_THERE_ONLY: "this peer is not in a private swarm (it has no swarm key)",
    _KEY_HERE_ONLY: "this peer is in a private swarm: connect with its swarm key",
    _KEYS_DIFFER: "this peer is in another private swarm (the swarm keys differ)",
}
_TELL_SERVER = {  # the client's refusal of a server's Hello
    _KEY_THERE_ONLY: "it is in a private swarm, and this side has no swarm key",
    _KEY_HERE_ONLY: "it is not in this private swarm (its Hello shows no swarm key)",
    _KEYS_DIFFER: "it is in another private swarm (the swarm keys differ)",
}


def _swarm_key_fault(
    swarm_key: bytes | None, proof: bytes | None, sender: str, receiver: str
) -> str | None:
    """How `sender`'s Hello fails to match the swarm key this side holds; None if it matches."""
    if swarm_key is None:
        return None if proof is None else _KEY_THERE_ONLY
    if proof is None:
        return _KEY_HERE_ONLY
    if not hmac.compare_digest(proof, swarm_key_proof(swarm_key, sender, receiver)):
        return _KEYS_DIFFER
    return None


def _check_pin(address: Address, peer_id: str) -> None:
    if address.peer_id is not None and address.peer_id != peer_id:
        raise PeerIdMismatch(
            f"{address.host}:{address.port} is peer {peer_id}, not {address.peer_id}"
        )


# --- the listening side ------------------------------------------------------------------------


@dataclass(frozen=True)
class ConnectionInfo:
    """Who sent a request: the client's peer ID (proven by TLS) and its address."""

    peer_id: str
    host: str
    port: int


class Handler(Protocol):
    """Answers one request. Raise RemoteError(code, message) to answer with that error."""

    def __call__(self, conn: ConnectionInfo, msg: Message, /) -> Awaitable[Message]: ...


class _ServerConnection:
    """One accepted connection: its handshake, and a task per request in flight."""

    def __init__(self, server: Server) -> None:
        self._server = server
        config = server._config
        self.channel = _Channel(
            config.max_frame_bytes, self._on_message, self._on_bad_frame, self._on_lost, self._start
        )
        self.info: ConnectionInfo | None = None  # set once the handshake is done
        self._proven_id: str | None = None
        self._tasks: set[asyncio.Task[None]] = set()  # owned here, cancelled on close
        self._timer: asyncio.TimerHandle | None = None
        self._reading_paused = False  # paused with max_concurrent_requests in flight
        self._backlog: collections.deque[tuple[int, Message]] = collections.deque()

    def _start(self) -> None:
        """Called once the transport is up, after the TLS handshake."""
        transport = self.channel.transport
        if transport is None or self._server._closing:
            self.channel.close(abort=True)
            return
        self._server._connections.add(self)  # only now: a failed TLS handshake never gets here
        if not self._server._config.insecure_plaintext:
            try:
                self._proven_id = _proven_peer_id(transport)
            except ValueError as exc:
                log.info("dropped a client that proved no peer ID: %s", exc)
                self.channel.close(abort=True)
                return
        self._timer = asyncio.get_running_loop().call_later(
            self._server._config.handshake_timeout, self.channel.close, True
        )

    def _on_message(self, request_id: int, msg: Message) -> None:
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
        elif self._proven_id is not None and msg.peer_id != self._proven_id:
            error = ErrorReply(ErrorCode.PROTOCOL, "Hello's peer ID differs from the TLS proof")
        elif server._closing or server._leaving:
            error = ErrorReply(ErrorCode.SHUTTING_DOWN, "this peer is shutting down")
        elif fault := _swarm_key_fault(swarm_key, msg.psk_proof, msg.peer_id, server.peer_id):
            log.info("refused client %s: swarm keys: %s", msg.peer_id, fault)
            error = ErrorReply(ErrorCode.SWARM_KEY, _TELL_CLIENT[fault])
        else:
            if self._timer is not None:
                self._timer.cancel()
            peername = transport.get_extra_info("peername") if transport else None
            host, port = (peername[0], peername[1]) if peername else ("?", 0)
            self.info = ConnectionInfo(msg.peer_id, host, port)
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
        log.info("closing a connection from %s: %s", self.info or "a client", message)
        self._reply(HANDSHAKE_ID, ErrorReply(ErrorCode.PROTOCOL, message))
        self.channel.close()

    def _on_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
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
    ) -> None:
        self.peer_id = identity.peer_id
        self._handler = handler
        self._on_disconnect = on_disconnect
        self._config = config
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

    def _new_connection(self) -> _Channel:
        return _ServerConnection(self).channel

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

    Raises:
        OSError: the address cannot be listened on.
    """
    config = config or TransportConfig()
    server = Server(handler, identity, config, on_disconnect)
    context = None if config.insecure_plaintext else _tls_context(identity, server=True)
    server._listener = await asyncio.get_running_loop().create_server(
        server._new_connection,
        host,
        port,
        ssl=context,
        ssl_handshake_timeout=config.handshake_timeout if context else None,
        ssl_shutdown_timeout=config.close_timeout if context else None,
    )
    return server
