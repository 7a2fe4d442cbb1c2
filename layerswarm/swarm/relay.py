"""Relays: a reachable peer joins a dialer to a peer behind NAT that holds a reservation with it.

Semantics from libp2p's circuit relay v2 spec (`relay/circuit-v2.md`): a peer behind NAT
*reserves* a slot on a relay over a connection of its own; the relay serves only peers that hold
a reservation, with limits on reservations, on connections per reservation, on bytes and on
duration; a dialer names the target, never an arbitrary host, so the relay is no open proxy; the
relay refuses with a reason (`NO_RESERVATION`, `RESOURCE_LIMIT`). Addresses read as libp2p's do,
`RELAYHOST:PORT/RELAYID/p2p-circuit/TARGETID`.

Why not py-libp2p 0.8.1's `relay/circuit_v2`: its dial path drops `/p2p-circuit` addresses,
`new_host()` wires none of it, and it runs on trio, while our data plane is asyncio with its own
TLS (ARCHITECTURE.md). So the wire here is ours, and simpler than the spec's STOP protocol:

1. The target holds a TLS connection to the relay's data-plane port: `Reserve` -> `Reserved`
   (renewed before its ttl), and one `AwaitRelayed` request in flight at a time.
2. A dialer opens plain TCP to the relay's relay port and sends `RelayConnect(target)`.
3. The relay answers the target's `AwaitRelayed` with `Relayed(token)`; the target opens a fresh
   TCP connection to the relay port (outbound: its NAT lets it) and sends `RelayAccept(token)`.
4. The relay sends `RelayJoined` on both, each naming the address that leg came from, and
   from then on copies bytes, counted and rate limited. The target writes one `READY` byte,
   then both run TLS 1.3 end to end (the dialer as client, checking the target's peer ID as on
   a direct dial): the relay sees only ciphertext. Then the two may punch a direct connection
   and leave the relay (`swarm/punch.py`).

The dialer's and the target's ends are in `swarm/relay_ends.py`. The outer frames use the wire
protocol's framing (`protocol.encode`/`decode_frame`); any bad
frame gets an `ErrorReply` and closes that one connection, the relay keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import struct
import time
from dataclasses import dataclass, field

from layerswarm.errors import (
    ConfigError,
    InvalidRecord,
    ProtocolError,
    RemoteError,
)
from layerswarm.swarm.messages import (
    ErrorCode,
    ErrorReply,
    Message,
    RelayAccept,
    RelayConnect,
    Relayed,
    RelayJoined,
    Reserved,
)
from layerswarm.swarm.protocol import decode_frame, encode
from layerswarm.swarm.records import verify_record

log = logging.getLogger(__name__)

READY = b"R"  # the target's first byte through a joined relay: its TLS server is listening
MAX_CARRIED = 8  # holders' records a relay publishes beside its own (each <= 1 KiB)
MAX_CONTROL_FRAME_BYTES = 1024  # bytes: the largest frame on a relay port before joining
LENGTH_FIELD = struct.Struct(">I")  # a frame's length field (`protocol`), read here before decoding


NAT_GROUP = "home routers (NAT): reachability, relays, port mapping"  # the flags' group


def _flag(help: str, flag: str, metavar: str) -> dict[str, object]:
    return {"help": help, "flag": flag, "metavar": metavar, "group": NAT_GROUP}


@dataclass(frozen=True)
class RelayConfig:
    """A relay's limits (libp2p's defaults are 2 min and 128 KiB a connection, for hole punching
    only; ours carry inference, so they are longer and counted in bytes per second)."""

    # peers holding a reservation at once
    max_reservations: int = field(
        default=128,
        metadata=_flag("peers a relay holds reservations for", "--relay-max-reservations", "N"),
    )
    # relayed connections at once to one target
    max_connections_per_reservation: int = field(
        default=16,
        metadata=_flag(
            "relayed connections at once to one reservation holder",
            "--relay-max-connections",
            "N",
        ),
    )
    # bytes/s: each relayed connection, each way
    max_bytes_per_s: int = field(
        default=8 * 2**20,
        metadata=_flag(
            "bytes per second each relayed connection may carry each way",
            "--relay-max-bytes-per-s",
            "B",
        ),
    )
    # unit: s a relayed connection may stay open
    max_duration: float = field(
        default=3600.0,
        metadata=_flag("seconds a relayed connection may stay open", "--relay-max-duration", "S"),
    )
    reservation_ttl: float = 300.0  # unit: s a reservation holds unless renewed
    join_timeout: float = 10.0  # unit: s a dialer waits at the relay for its target to accept

    def __post_init__(self) -> None:
        for name in ("max_reservations", "max_connections_per_reservation"):
            if getattr(self, name) < 1:
                raise ConfigError(name, "must be at least 1")
        if self.max_bytes_per_s < 1024:
            raise ConfigError("max_bytes_per_s", "must be at least 1024")
        for name in ("max_duration", "reservation_ttl", "join_timeout"):
            if not getattr(self, name) > 0:
                raise ConfigError(name, "must be positive")


@dataclass
class _Reservation:
    peer_id: str
    expires_at: float  # unit: loop s
    record: bytes | None = None  # the holder's signed record, carried for it (checked)
    record_expires_at: float = 0.0  # unit: unix s, the record's own
    offers: asyncio.Queue[bytes] = field(default_factory=asyncio.Queue)  # tokens to take
    circuits: int = 0  # relayed connections open (or joining) now


@dataclass
class RelayStats:
    """What a relay has done (shown by `swarm-peer status`, read by tests)."""

    circuits: int = 0  # relayed connections joined, in all
    refused: int = 0  # dialers refused (no reservation, limits, bad frames)
    bytes_relayed: int = 0  # bytes copied between dialers and targets, both ways


class Relay:
    """The relay side: reservations (answered on the data plane) and the relay port."""

    def __init__(self, config: RelayConfig) -> None:
        self.config = config
        self.stats = RelayStats()
        self.port = 0  # the relay port, once `open` returned
        self._reservations: dict[str, _Reservation] = {}
        self._waiting: dict[bytes, _RelayLeg] = {}  # token -> dialer leg waiting for its target
        self._legs: set[_RelayLeg] = set()
        self._listener: asyncio.Server | None = None

    async def open(self, host: str, port: int) -> None:
        """Listen for dialers and targets on `host:port` (0: a free port, then `self.port`)."""
        loop = asyncio.get_running_loop()
        self._listener = await loop.create_server(lambda: _RelayLeg(self), host, port)
        self.port = self._listener.sockets[0].getsockname()[1]

    def reserve(self, peer_id: str, record: bytes | None = None) -> Reserved:
        """Hold or renew `peer_id`'s reservation; carry its signed `record`, if given.

        Raises:
            RemoteError: RESOURCE_LIMIT when max_reservations other peers hold one; PROTOCOL
                when `record` is invalid, expired or another peer's.
        """
        checked = _checked_record(peer_id, record) if record is not None else None
        now = asyncio.get_running_loop().time()
        self._drop_expired(now)
        held = self._reservations.get(peer_id)
        if held is None:
            if len(self._reservations) >= self.config.max_reservations:
                raise RemoteError(
                    ErrorCode.RESOURCE_LIMIT,
                    f"this relay holds {len(self._reservations)} reservations, its most "
                    "(max_reservations): try another relay",
                )
            held = self._reservations[peer_id] = _Reservation(peer_id, 0.0)
        held.expires_at = now + self.config.reservation_ttl
        if checked is not None:
            held.record, held.record_expires_at = record, checked
        c = self.config
        return Reserved(
            self.port,
            c.reservation_ttl,
            c.max_connections_per_reservation,
            c.max_bytes_per_s,
            c.max_duration,
        )

    async def await_relayed(self, peer_id: str) -> Relayed:
        """Wait for the next dialer of `peer_id`; its token, to accept it with.

        Raises:
            RemoteError: NO_RESERVATION when `peer_id` holds none (or it expired meanwhile).
        """
        held = self._live(peer_id)
        loop = asyncio.get_running_loop()
        left = held.expires_at - loop.time()
        try:
            token = await asyncio.wait_for(held.offers.get(), max(left, 0.0))
        except asyncio.TimeoutError:
            raise RemoteError(
                ErrorCode.NO_RESERVATION, "the reservation expired: reserve again"
            ) from None
        return Relayed(token)

    def carried(self) -> list[bytes]:
        """The signed records of the live reservations' holders (to publish beside ours)."""
        loop_now, now = asyncio.get_running_loop().time(), time.time()
        return [
            r.record
            for r in self._reservations.values()
            if r.record is not None and r.expires_at > loop_now and r.record_expires_at > now
        ][:MAX_CARRIED]

    def holds(self, peer_id: str) -> bool:
        """Whether `peer_id` holds a live reservation here."""
        try:
            self._live(peer_id)
        except RemoteError:
            return False
        return True

    def _live(self, peer_id: str) -> _Reservation:
        held = self._reservations.get(peer_id)
        if held is None or held.expires_at <= asyncio.get_running_loop().time():
            raise RemoteError(
                ErrorCode.NO_RESERVATION,
                f"this relay holds no reservation for {peer_id:.60}: it relays only to peers "
                "that reserved a slot",
            )
        return held

    def _drop_expired(self, now: float) -> None:
        for peer_id in [p for p, r in self._reservations.items() if r.expires_at <= now]:
            del self._reservations[peer_id]

    def _connect(self, leg: _RelayLeg, target: str) -> None:
        """A dialer asks for `target`: offer it to the target, or refuse."""
        held = self._live(target)
        if held.circuits >= self.config.max_connections_per_reservation:
            raise RemoteError(
                ErrorCode.RESOURCE_LIMIT,
                f"{target:.60} has {held.circuits} relayed connections here, the most one "
                "reservation may hold (max_connections_per_reservation)",
            )
        token = secrets.token_bytes(16)
        held.circuits += 1
        leg.reservation = held
        leg.token = token
        self._waiting[token] = leg
        held.offers.put_nowait(token)
        loop = asyncio.get_running_loop()
        leg.timer = loop.call_later(self.config.join_timeout, self._join_timed_out, token)

    def _join_timed_out(self, token: bytes) -> None:
        leg = self._waiting.pop(token, None)
        if leg is not None:
            leg.refuse(ErrorReply(ErrorCode.TIMEOUT, "the target did not accept in time"))

    def _accept(self, leg: _RelayLeg, token: bytes) -> None:
        """A target accepts the dialer its token names: join the two."""
        dialer = self._waiting.pop(token, None)
        if dialer is None or not dialer.open:
            raise ProtocolError("no dialer waits with this token (it left, or timed out)")
        if dialer.timer is not None:
            dialer.timer.cancel()
        self.stats.circuits += 1
        dialer.join(leg)
        leg.join(dialer)
        loop = asyncio.get_running_loop()
        timer = loop.call_later(self.config.max_duration, dialer.close_both)
        dialer.timer = leg.timer = timer

    def _leg_lost(self, leg: _RelayLeg) -> None:
        self._legs.discard(leg)
        if leg.token is not None:
            self._waiting.pop(leg.token, None)
        if leg.reservation is not None:
            leg.reservation.circuits -= 1
            leg.reservation = None

    def close(self) -> None:
        """Stop listening and close every relayed connection."""
        if self._listener is not None:
            self._listener.close()
        for leg in list(self._legs):
            leg.close_both()
        self._reservations.clear()

    async def wait_closed(self) -> None:
        if self._listener is not None:
            await self._listener.wait_closed()


def host_port(host: str, port: int) -> str:
    """`host:port`, an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _checked_record(peer_id: str, record: bytes) -> float:
    """`record`'s expiry, once it proved to be `peer_id`'s valid signed record."""
    try:
        checked = verify_record(record)
    except InvalidRecord as exc:
        raise RemoteError(ErrorCode.PROTOCOL, f"the record to carry is invalid: {exc}") from None
    if checked.peer_id != peer_id:
        raise RemoteError(ErrorCode.PROTOCOL, "the record to carry is another peer's")
    return checked.expires_at


class _RelayLeg(asyncio.Protocol):
    """One TCP connection at the relay port: a control frame, then bytes copied to its peer."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.transport: asyncio.Transport | None = None
        self.other: _RelayLeg | None = None
        self.reservation: _Reservation | None = None  # counted there, dialer legs only
        self.token: bytes | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.open = False
        self._buffer = bytearray()
        self._window_start = 0.0  # unit: loop s, of the current rate window
        self._window_bytes = 0
        self._throttled = False
        self._other_full = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.open = True
        self.relay._legs.add(self)
        loop = asyncio.get_running_loop()
        self.timer = loop.call_later(self.relay.config.join_timeout, self._no_frame)

    def _no_frame(self) -> None:
        if self.other is None and self.token is None:
            self.refuse(ErrorReply(ErrorCode.TIMEOUT, "no relay_connect or relay_accept in time"))

    def data_received(self, data: bytes) -> None:
        if self.other is not None:
            self._forward(data)
            return
        self._buffer += data
        if self.token is not None:  # a dialer waiting for its target: it must stay quiet
            if len(self._buffer) > MAX_CONTROL_FRAME_BYTES:
                self.refuse(ErrorReply(ErrorCode.PROTOCOL, "sent bytes before relay_joined"))
            return
        try:
            msg = self._control_frame()
            if msg is not None:
                self._on_control(msg)
        except ProtocolError as exc:
            self.refuse(ErrorReply(ErrorCode.PROTOCOL, f"bad relay frame: {exc}"[:4096]))
        except RemoteError as exc:
            self.refuse(ErrorReply(exc.code, exc.message[:4096]))

    def _control_frame(self) -> Message | None:
        if len(self._buffer) < LENGTH_FIELD.size:
            return None
        (length,) = LENGTH_FIELD.unpack_from(self._buffer)
        if length > MAX_CONTROL_FRAME_BYTES:
            raise ProtocolError(f"frame of {length} bytes exceeds {MAX_CONTROL_FRAME_BYTES}")
        if len(self._buffer) < LENGTH_FIELD.size + length:
            return None
        frame = bytes(self._buffer[: LENGTH_FIELD.size + length])
        del self._buffer[: LENGTH_FIELD.size + length]
        _, msg = decode_frame(frame, MAX_CONTROL_FRAME_BYTES)
        return msg

    def _on_control(self, msg: Message) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if isinstance(msg, RelayConnect):
            self.relay._connect(self, msg.target)
        elif isinstance(msg, RelayAccept):
            if self._buffer:
                raise ProtocolError("bytes after relay_accept, before relay_joined")
            self.relay._accept(self, msg.token)
        else:
            raise ProtocolError(f"expected relay_connect or relay_accept, got {type(msg).__name__}")

    def join(self, other: _RelayLeg) -> None:
        self.other = other
        self._window_start = asyncio.get_running_loop().time()
        # Each end learns where it came from (libp2p identify's observedAddr): its NAT's
        # mapping, the address a hole punch aims the other end at (`swarm/punch.py`).
        peer = self.transport.get_extra_info("peername") if self.transport else None
        self._send(RelayJoined(host_port(peer[0], peer[1]) if peer else None))
        if self._buffer:  # a dialer's early bytes (it should have waited): passed on
            data, self._buffer = bytes(self._buffer), bytearray()
            self._forward(data)

    def _forward(self, data: bytes) -> None:
        other = self.other
        if other is None or other.transport is None or other.transport.is_closing():
            return
        other.transport.write(data)
        self.relay.stats.bytes_relayed += len(data)
        self._throttle(len(data))

    def _throttle(self, nbytes: int) -> None:
        """Pause reading while this leg is over its bytes per second (a token bucket of 1 s)."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        rate = self.relay.config.max_bytes_per_s
        if now - self._window_start >= 1.0:
            self._window_start, self._window_bytes = now, 0
        self._window_bytes += nbytes
        if self._window_bytes > rate and self.transport is not None and not self._throttled:
            self._throttled = True
            self.transport.pause_reading()
            delay = self._window_start + self._window_bytes / rate - now
            loop.call_later(max(delay, 0.0), self._unthrottle)

    def _unthrottle(self) -> None:
        self._throttled = False
        self._window_start, self._window_bytes = asyncio.get_running_loop().time(), 0
        if self.transport is not None and not self.transport.is_closing() and not self._other_full:
            self.transport.resume_reading()

    def pause_writing(self) -> None:  # this leg's socket is full: stop reading the other one
        if self.other is not None and self.other.transport is not None:
            self.other._other_full = True
            self.other.transport.pause_reading()

    def resume_writing(self) -> None:
        other = self.other
        if other is not None and other.transport is not None and not other.transport.is_closing():
            other._other_full = False
            if not other._throttled:
                other.transport.resume_reading()

    def _send(self, msg: Message) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.writelines(encode(msg, 0))

    def refuse(self, error: ErrorReply) -> None:
        """Tell this connection why, and close it (the relay goes on serving)."""
        self.relay.stats.refused += 1
        log.info("relay refused a connection: %s: %s", error.code, error.message)
        self._send(error)
        if self.transport is not None:
            self.transport.close()

    def close_both(self) -> None:
        for leg in (self, self.other):
            if leg is not None and leg.transport is not None:
                leg.transport.close()

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.open = False
        if self.timer is not None:
            self.timer.cancel()
        self.relay._leg_lost(self)
        other = self.other
        if other is not None and other.transport is not None:
            other.transport.close()
