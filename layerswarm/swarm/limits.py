"""Bounds on strangers: how many connections a peer holds, from one address and in all.

A peer on the open internet is dialled by anyone. Each connection costs a socket, buffers and
a TLS session, so a peer caps them (in all, and per IP address: one host cannot take every
slot), drops a connection that has not finished its TLS handshake and `Hello` in time, reads at
most a `Hello`'s worth of bytes before that `Hello`, and closes connections that stay idle.
Requests of a connection are bounded by `TransportConfig.max_concurrent_requests`, sessions and
KV pages of a client by the peer's `ServingConfig`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from layerswarm.errors import ConfigError

# bytes: the largest frame a peer reads before a connection's Hello. A Hello's frame takes
# ~250 bytes (a 52-character peer ID, a 32-byte swarm-key proof and three small ints).
MAX_HELLO_FRAME_BYTES = 1024


@dataclass(frozen=True)
class ListenLimits:
    """The caps a listening peer keeps on the connections it accepts."""

    # connections open at once, every client together
    max_connections: int = field(
        default=1024, metadata={"help": "connections at once", "metavar": "N"}
    )
    # connections open at once from one IP address
    max_connections_per_ip: int = field(
        default=64, metadata={"help": "connections at once from one IP address", "metavar": "N"}
    )
    # unit: s a connection with no request in flight may stay silent
    idle_timeout: float = field(
        default=600.0,
        metadata={
            "help": "close a connection with no request in flight for this long",
            "flag": "--connection-idle-timeout",
            "metavar": "S",
        },
    )
    max_hello_frame_bytes: int = MAX_HELLO_FRAME_BYTES  # bytes: largest frame before Hello
    max_refusing: int = 64  # connections being told "too many" at once; past it, dropped at once

    def __post_init__(self) -> None:
        for name in ("max_connections", "max_connections_per_ip", "max_refusing"):
            if getattr(self, name) < 1:
                raise ConfigError(name, "must be at least 1")
        if not self.idle_timeout > 0:
            raise ConfigError("idle_timeout", "must be positive")
        if self.max_hello_frame_bytes < 256:
            raise ConfigError("max_hello_frame_bytes", "must hold a Hello (at least 256 bytes)")


class ConnectionCounter:
    """The connections a peer holds, in all and per IP address, against its `ListenLimits`."""

    def __init__(self, limits: ListenLimits) -> None:
        self.limits = limits
        self.total = 0
        self.refusing = 0  # connections told "too many", not yet closed
        self._per_ip: Counter[str] = Counter()

    def refusal(self, ip: str) -> str | None:
        """Why a new connection from `ip` is refused, or None if it may be held."""
        if self.total >= self.limits.max_connections:
            return (
                f"this peer holds {self.total} connections, its most (max_connections): "
                "try another peer or later"
            )
        if self._per_ip[ip] >= self.limits.max_connections_per_ip:
            return (
                f"this peer holds {self._per_ip[ip]} connections from {ip}, the most one address "
                "may open (max_connections_per_ip): reuse a connection"
            )
        return None

    def add(self, ip: str) -> None:
        self.total += 1
        self._per_ip[ip] += 1

    def remove(self, ip: str) -> None:
        self.total -= 1
        self._per_ip[ip] -= 1
        if self._per_ip[ip] <= 0:
            del self._per_ip[ip]

    def from_ip(self, ip: str) -> int:
        return self._per_ip[ip]
