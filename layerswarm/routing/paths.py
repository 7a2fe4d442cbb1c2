"""Choosing a path through the swarm: a pure function of what the router knows of its peers.

A path is a list of hops `(peer, span)` whose spans tile `[start, end)` exactly. It is the
shortest path over the layer boundaries, where using peer P for layers `[a, b)` (any part of
what P serves) costs the time P needs for `b - a` layers at its current load, plus the round
trip to P that this client measured itself (a peer's own claims about the network are not
used). A relayed peer's rtt holds its detour through the relay; `RELAYED_HOP_S` on top makes
a direct hop win where the two measure the same.

Spreading sessions: when `rng` is given, each peer's costs are multiplied by an independent
exponential draw for this path. In a race of exponentials the chance that a peer wins is its
rate's share, and its rate is its speed, so among replicas of a span each is picked in
proportion to its capacity, rather than every session piling onto the fastest one.
"""

from __future__ import annotations

import heapq
import random
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

from layerswarm.errors import NoRouteError
from layerswarm.shards.config import Span


@dataclass(frozen=True)
class PeerView:
    """What the router knows of one peer."""

    peer_id: str
    address: str  # host:port/PEERID to dial
    span: Span  # the layers it serves
    seconds_per_layer: float = 0.01  # unit: s one layer takes per step (from its measured speed)
    load: float = 0.0  # unit: sessions waiting beside ours; each one slows a step down
    rtt: float = 0.001  # unit: s, the round trip this client measured
    dtype: str = "float32"  # the compute dtype it claims: activations travel in it, checks take
    # its tolerance
    quant: str = "none"  # the weight quantization it claims (checked only against its like)
    relayed: bool = False  # reached through a relay (`swarm/relay.py`), not dialed directly


@dataclass(frozen=True)
class PathHop:
    peer_id: str
    span: Span


# unit: s added to a relayed hop's cost. Its extra link (relay to peer) is already in `rtt`,
# which this client measured over the relayed connection itself: adding a full crossing again
# would count the detour twice. What `rtt` leaves out is that every byte of the hop crosses the
# relay's uplink twice (shared with its other reservations, capped by its --relay-max-* rate)
# and that a third machine can fail; 1 ms prefers a direct hop of equal measured cost, yet a
# relayed peer measured faster by more than that still wins.
RELAYED_HOP_S = 0.001


def hop_cost(peer: PeerView, layers: int) -> float:
    """Seconds one step through `layers` of the peer's layers is expected to take."""
    compute = layers * peer.seconds_per_layer * (1.0 + peer.load)
    return compute + peer.rtt + (RELAYED_HOP_S if peer.relayed else 0.0)


def missing_layers(
    peers: Collection[PeerView], span: Span, banned: Collection[str] = ()
) -> list[int]:
    """The layers of `span` that no usable peer serves."""
    served = {
        layer
        for p in peers
        if p.peer_id not in banned
        for layer in range(max(p.span.start, span.start), min(p.span.end, span.end))
    }
    return [layer for layer in range(span.start, span.end) if layer not in served]


def choose_path(
    peers: Sequence[PeerView],
    span: Span,
    banned: Collection[str] = (),
    rng: random.Random | None = None,
) -> list[PathHop]:
    """The cheapest chain of hops that covers `span` exactly.

    Args:
        peers: every peer the router knows of.
        span: the layers to cover, usually `[0, num_layers)` or a failed hop's span.
        banned: peer IDs to leave out.
        rng: when given, spread sessions over replicas in proportion to capacity.
    Returns:
        Hops in layer order.
    Raises:
        NoRouteError: some layers of `span` are served by no usable peer.
    """
    usable = [p for p in peers if p.peer_id not in banned and _overlaps(p.span, span)]
    if missing := missing_layers(usable, span):
        raise NoRouteError(missing)
    factor = {p.peer_id: rng.expovariate(1.0) if rng else 1.0 for p in usable}
    # Dijkstra over the boundaries span.start .. span.end; an edge a -> b for each peer that
    # serves all of [a, b). Ties prefer fewer hops (each costs a network round trip anyway).
    best: dict[int, tuple[float, int]] = {span.start: (0.0, 0)}
    back: dict[int, tuple[int, PeerView]] = {}
    queue: list[tuple[float, int, int]] = [(0.0, 0, span.start)]
    while queue:
        cost, hops, at = heapq.heappop(queue)
        if at == span.end:
            break
        if (cost, hops) > best[at]:
            continue
        for p in usable:
            if not p.span.start <= at < p.span.end:
                continue
            for to in range(at + 1, min(p.span.end, span.end) + 1):
                new = (cost + hop_cost(p, to - at) * factor[p.peer_id], hops + 1)
                if to not in best or new < best[to]:
                    best[to] = new
                    back[to] = (at, p)
                    heapq.heappush(queue, (new[0], new[1], to))
    path: list[PathHop] = []
    at = span.end
    while at != span.start:
        prev, peer = back[at]
        path.append(PathHop(peer.peer_id, Span(prev, at)))
        at = prev
    return path[::-1]


def _overlaps(a: Span, b: Span) -> bool:
    return a.start < b.end and b.start < a.end


@dataclass
class BanList:
    """Peers to leave out for a while; a peer that fails again is left out for longer."""

    base_seconds: float = 2.0  # unit: s of the first ban
    max_seconds: float = 60.0  # unit: s, the longest ban
    _until: dict[str, float] = field(default_factory=dict)
    _strikes: dict[str, int] = field(default_factory=dict)

    def ban(self, peer_id: str, now: float | None = None) -> float:
        """Ban a peer for a failure; returns for how many seconds.

        A peer already banned gets no new strike: the sessions that saw one failure of it (a
        crash fails every session in flight) count it once.
        """
        now = time.monotonic() if now is None else now
        if self._until.get(peer_id, 0.0) > now:
            return self._until[peer_id] - now
        strikes = self._strikes.get(peer_id, 0) + 1
        self._strikes[peer_id] = strikes
        seconds = min(self.base_seconds * 2.0 ** (strikes - 1), self.max_seconds)
        self._until[peer_id] = now + seconds
        return seconds

    def banned(self, now: float | None = None) -> set[str]:
        now = time.monotonic() if now is None else now
        return {p for p, until in self._until.items() if until > now}

    def lift(self, peer_id: str) -> None:
        """End a peer's ban now (it came back), but remember its strikes."""
        self._until.pop(peer_id, None)

    def succeeded(self, peer_id: str) -> None:
        """A peer served a step: it starts over with a short ban if it fails again."""
        if peer_id in self._strikes or peer_id in self._until:
            self.forgive(peer_id)

    def forgive(self, peer_id: str) -> None:
        """A peer that served well again starts over with a short ban next time."""
        self._strikes.pop(peer_id, None)
        self._until.pop(peer_id, None)
