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
import contextlib
import functools
import hashlib
import hmac
import logging
import socket
import ssl
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from layerswarm.errors import (
    PeerUnavailable,
    ProtocolError,
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
    FrameReader,
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
    # s: a hole punch's simultaneous TCP open (`swarm/punch.py`); 0: relayed stays relayed.
    # 3 s covers a SYN the other router dropped, resent after Linux's initial 1 s RTO.
    punch_timeout: float = 3.0

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
        if self.punch_timeout < 0:
            raise ValueError("punch_timeout must be >= 0")
        if self.max_frame_bytes < 1024 or self.max_concurrent_requests < 1:
            raise ValueError("max_frame_bytes must be >= 1024, max_concurrent_requests >= 1")


CIRCUIT = "p2p-circuit"  # in an address: the part before it is a relay's (libp2p's word)


@dataclass(frozen=True)
class Address:
    """Where a peer listens, and optionally which peer ID must answer there.

    With `relay`, the peer is reached through that relay (`swarm/relay.py`): `host:port` are
    the relay's, and TLS runs end to end with `peer_id` through it.
    """

    host: str
    port: int
    peer_id: str | None = None
    relay: str | None = None  # the relay's peer ID; set: dial host:port, a relay, to reach peer_id

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.relay is not None:
            tail = f"/{self.peer_id}" if self.peer_id else ""
            return f"{host}:{self.port}/{self.relay}/{CIRCUIT}{tail}"
        return f"{host}:{self.port}" + (f"/{self.peer_id}" if self.peer_id else "")


def parse_address(text: str) -> Address:
    """Parse `host:port` or `host:port/PEERID` (IPv6 hosts in brackets: `[::1]:port`), or a
    relayed address `host:port/RELAYID/p2p-circuit[/PEERID]` (host:port: the relay's).

    Raises:
        ValueError: the text is not such an address, or an ID is not an Ed25519 peer ID.
    """
    hostport, _, rest = text.strip().partition("/")
    host, sep, port_text = hostport.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"not a host:port[/peer_id] address: {text!r}")
    parts = rest.split("/") if rest else []
    relay = None
    if len(parts) >= 2 and parts[1] == CIRCUIT:
        relay = parts[0]
        public_key_from_peer_id(relay)
        parts = parts[2:]
    if len(parts) > 1:
        raise ValueError(f"not a host:port[/peer_id] address: {text!r}")
    peer_id = parts[0] if parts else None
    if peer_id:
        public_key_from_peer_id(peer_id)  # raises ValueError for anything else
    return Address(host, int(port_text), peer_id or None, relay)


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


class Channel(asyncio.BufferedProtocol):
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

    def limit_frames(self, max_frame_bytes: int) -> None:
        """Accept frames of at most this many bytes from now on (before a Hello: a Hello's)."""
        self._reader.max_frame_bytes = self._max_frame_bytes = max_frame_bytes

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
def tls_context(identity: Identity, server: bool) -> ssl.SSLContext:
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


def proven_peer_id(transport: asyncio.BaseTransport) -> str:
    ssl_object = transport.get_extra_info("ssl_object")
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    if not der:
        raise ValueError("no TLS certificate")
    return peer_id_from_tls_certificate(der)


def swarm_key_proof(swarm_key: bytes, sender: str, receiver: str) -> bytes:
    """What `sender` puts in its Hello to `receiver` to show it holds `swarm_key`."""
    data = PSK_DOMAIN + sender.encode() + b"\0" + receiver.encode()
    return hmac.new(swarm_key, data, hashlib.sha256).digest()


# Why the other side's Hello does not match this side's swarm key, as told to each side.
_KEY_THERE_ONLY, _KEY_HERE_ONLY, _KEYS_DIFFER = "there only", "here only", "differ"
TELL_CLIENT = {  # the server's refusal, read by the client
    _KEY_THERE_ONLY: "this peer is not in a private swarm (it has no swarm key)",
    _KEY_HERE_ONLY: "this peer is in a private swarm: connect with its swarm key",
    _KEYS_DIFFER: "this peer is in another private swarm (the swarm keys differ)",
}
TELL_SERVER = {  # the client's refusal of a server's Hello
    _KEY_THERE_ONLY: "it is in a private swarm, and this side has no swarm key",
    _KEY_HERE_ONLY: "it is not in this private swarm (its Hello shows no swarm key)",
    _KEYS_DIFFER: "it is in another private swarm (the swarm keys differ)",
}


def swarm_key_fault(
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
