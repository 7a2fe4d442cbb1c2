"""What the client measured of each peer, and the bounds a peer's own claims must keep.

Routing costs and step deadlines come from measurements: a moving average of the time each
decode step took on a peer, as this client saw it. A peer's claim (the `decode_s_per_layer` of
its `InfoReply`) is used only until a measurement exists, and only once it is finite, positive
and within bounds: a peer that claims to be infinitely fast gets no more traffic than the
fastest believable peer, and only until its first steps are timed.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass

# unit: s a layer takes for one decode step. 1 us is ~100x faster than a layer of a 135M model
# on an H100; 10 s is a very slow disk-backed peer. Claims outside are clamped to these.
MIN_SECONDS_PER_LAYER = 1e-6
MAX_SECONDS_PER_LAYER = 10.0
DEFAULT_SECONDS_PER_LAYER = 0.01  # unit: s; a peer that claims nothing usable
MAX_LOAD = 1000.0  # unit: sessions; a larger claimed load is clamped
EWMA_WEIGHT = 0.2  # the weight of a new sample: about the last 5-10 steps count
MAX_DECODE_TOKENS = 4  # unit: tokens; longer steps (prefill, replay) are not decode samples


def bounded(value: object, low: float, high: float, default: float) -> float:
    """A claimed number, made safe: `default` unless finite and positive; clamped to [low, high]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return default
    number = float(value)
    if not math.isfinite(number) or number <= 0:
        return default
    return min(max(number, low), high)


@dataclass
class PeerSpeed:
    """The moving average of one peer's decode steps."""

    seconds_per_layer: float  # unit: s a layer took per decode step, the network taken out
    samples: int = 1


class PeerStats:
    """Per peer: the moving average of its decode steps' time, as this client measured them.

    Updated from the client's loop; read from any thread (the dashboard), hence the lock.
    """

    def __init__(self, weight: float = EWMA_WEIGHT) -> None:
        self.weight = weight
        self._speed: dict[str, PeerSpeed] = {}
        self._lock = threading.Lock()

    def observe(self, peer_id: str, seconds: float, layers: int, tokens: int, rtt: float) -> None:
        """Record one step: `seconds` from request to reply, for `tokens` through `layers`."""
        if tokens > MAX_DECODE_TOKENS or layers < 1 or not math.isfinite(seconds):
            return
        per_layer = min(max((seconds - rtt) / layers, MIN_SECONDS_PER_LAYER), MAX_SECONDS_PER_LAYER)
        with self._lock:
            known = self._speed.get(peer_id)
            if known is None:
                self._speed[peer_id] = PeerSpeed(per_layer)
            else:
                known.seconds_per_layer += self.weight * (per_layer - known.seconds_per_layer)
                known.samples += 1

    def seconds_per_layer(self, peer_id: str) -> float | None:
        """The measured average, or None before the first decode step on this peer."""
        with self._lock:
            known = self._speed.get(peer_id)
            return None if known is None else known.seconds_per_layer

    def snapshot(self) -> dict[str, PeerSpeed]:
        """A copy of every peer's figures (for a dashboard)."""
        with self._lock:
            return {p: PeerSpeed(s.seconds_per_layer, s.samples) for p, s in self._speed.items()}


def claimed_seconds_per_layer(extra: Mapping[str, object]) -> float:
    """A peer's claimed decode speed (`InfoReply.extra`), bounded."""
    return bounded(
        extra.get("decode_s_per_layer"),
        MIN_SECONDS_PER_LAYER,
        MAX_SECONDS_PER_LAYER,
        DEFAULT_SECONDS_PER_LAYER,
    )
