"""The two ends of a relayed connection: a dialer reaching a target through a relay, and the
target accepting (the relay itself and the wire are in `swarm/relay.py`)."""

from __future__ import annotations

import asyncio
import socket
import ssl

from layerswarm.errors import PeerUnavailable, ProtocolError
from layerswarm.swarm.messages import ErrorReply, Message, RelayAccept, RelayConnect, RelayJoined
from layerswarm.swarm.protocol import decode_frame, encode
from layerswarm.swarm.relay import LENGTH_FIELD, MAX_CONTROL_FRAME_BYTES, READY


class _Held(asyncio.Protocol):
    """Keeps what TLS decrypts before the channel is attached (a Hello may come that early)."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.lost: tuple[Exception | None] | None = None

    def data_received(self, data: bytes) -> None:
        self.data += data

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = (exc,)


async def start_tls_channel(
    raw: asyncio.Transport,
    channel: asyncio.BufferedProtocol,
    context: ssl.SSLContext,
    server_side: bool,
    timeout: float,
) -> None:
    """Run TLS over a joined relay stream, then attach `channel` with no byte lost.

    `loop.start_tls` delivers data that arrives with the handshake's last flight before it
    returns the transport; it is held here and fed to `channel` after `connection_made`.

    Raises:
        PeerUnavailable: the handshake failed or timed out (the stream is aborted).
    """
    held = _Held()
    loop = asyncio.get_running_loop()
    try:
        tls = await loop.start_tls(
            raw, held, context, server_side=server_side, ssl_handshake_timeout=timeout
        )
    except (OSError, ssl.SSLError, asyncio.TimeoutError, ConnectionError) as exc:
        raw.abort()
        raise PeerUnavailable(f"TLS through the relay failed: {exc!r}") from exc
    if tls is None:
        raw.abort()
        raise PeerUnavailable("TLS through the relay did not start")
    tls.set_protocol(channel)
    channel.connection_made(tls)
    data = memoryview(bytes(held.data))
    while data:
        target = memoryview(channel.get_buffer(len(data))).cast("B")
        n = min(len(target), len(data))
        target[:n] = data[:n]
        channel.buffer_updated(n)
        data = data[n:]
    if held.lost is not None:
        channel.connection_lost(held.lost[0])


class _ControlReader(asyncio.Protocol):
    """Reads a relay port's control frames, then hands the transport on (no bytes lost)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._changed: asyncio.Event = asyncio.Event()
        self._lost: Exception | None = None
        self._gone = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        self._changed.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self._gone, self._lost = True, exc
        self._changed.set()

    async def read_frame(self) -> Message:
        while True:
            if len(self._buffer) >= LENGTH_FIELD.size:
                (length,) = LENGTH_FIELD.unpack_from(self._buffer)
                if length > MAX_CONTROL_FRAME_BYTES:
                    raise ProtocolError(f"the relay sent a frame of {length} bytes")
                if len(self._buffer) >= LENGTH_FIELD.size + length:
                    frame = bytes(self._buffer[: LENGTH_FIELD.size + length])
                    del self._buffer[: LENGTH_FIELD.size + length]
                    return decode_frame(frame, MAX_CONTROL_FRAME_BYTES)[1]
            await self._wait()

    async def read_exactly(self, n: int) -> bytes:
        while len(self._buffer) < n:
            await self._wait()
        data = bytes(self._buffer[:n])
        del self._buffer[:n]
        return data

    async def _wait(self) -> None:
        if self._gone:
            raise PeerUnavailable(f"the relay closed the connection: {self._lost or 'EOF'}")
        self._changed.clear()
        await self._changed.wait()

    def leftover(self) -> bytes:
        return bytes(self._buffer)


def reusable_socket(host: str) -> socket.socket:
    """A TCP socket (non-blocking) whose local port another may bind too: a hole punch opens
    its simultaneous connection from the port the NAT mapped for the relay leg (`punch.py`)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if hasattr(socket, "SO_REUSEPORT"):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.setblocking(False)
    return sock


async def _connect(host: str, port: int) -> socket.socket:
    sock = reusable_socket(host)
    try:
        await asyncio.get_running_loop().sock_connect(sock, (host, port))
    except BaseException:
        sock.close()
        raise
    return sock


async def open_relay_stream(
    host: str, port: int, first: RelayConnect | RelayAccept, timeout: float
) -> tuple[asyncio.Transport, _ControlReader, str | None]:
    """Open TCP to a relay port (from a reusable local port), send `first`, and wait for
    `RelayJoined`.

    Returns:
        The raw transport, joined; its reader (still attached, holding what came after); and
        the address this side came from as the relay saw it (None from a relay that says not).

    Raises:
        PeerUnavailable: no connection, the relay refused (its code and message), or a timeout.
        ProtocolError: the relay answered with something else.
    """
    loop = asyncio.get_running_loop()
    try:
        sock = await asyncio.wait_for(_connect(host, port), timeout)
        transport, reader = await loop.create_connection(_ControlReader, sock=sock)
    except (OSError, asyncio.TimeoutError) as exc:
        raise PeerUnavailable(f"cannot connect to relay {host}:{port}: {exc!r}") from exc
    try:
        transport.writelines(encode(first, 0))
        reply = await asyncio.wait_for(reader.read_frame(), timeout)
        if isinstance(reply, ErrorReply):
            raise PeerUnavailable(f"relay {host}:{port} refused: {reply.code}: {reply.message}")
        if not isinstance(reply, RelayJoined):
            raise ProtocolError(f"relay {host}:{port} answered {type(reply).__name__}")
    except asyncio.TimeoutError:
        transport.abort()
        raise PeerUnavailable(f"relay {host}:{port} did not join within {timeout:g} s") from None
    except BaseException:
        transport.abort()
        raise
    return transport, reader, reply.observed


async def dial_through_relay(
    host: str, port: int, target: str, timeout: float
) -> tuple[asyncio.Transport, str | None]:
    """A dialer's raw stream to `target` through the relay at `host:port`, ready for TLS, and
    the address it came from as the relay saw it.

    Raises:
        PeerUnavailable: the relay refused or failed, or the target never said it was ready.
    """
    transport, reader, observed = await open_relay_stream(host, port, RelayConnect(target), timeout)
    try:
        ready = await asyncio.wait_for(reader.read_exactly(len(READY)), timeout)
        if ready != READY or reader.leftover():
            raise PeerUnavailable(f"{target} sent {ready!r} through the relay, not ready")
    except asyncio.TimeoutError:
        transport.abort()
        raise PeerUnavailable(f"{target} was not ready through the relay in time") from None
    except BaseException:
        transport.abort()
        raise
    return transport, observed
