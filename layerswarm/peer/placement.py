"""Which layers a peer serves: a pure function of the swarm's records and the peer's capacity.

How many: as many layers as the peer's memory budget holds, weights plus a KV-cache reserve
(quantization counts: an int4 layer takes about a quarter of an fp16 one). So a peer with twice
the memory serves about twice the layers. The budget is memory of the device the peer serves
from (`memory_budget`): on a CPU half the available RAM, as before; on a GPU the free VRAM less
a fixed reserve for the CUDA context and a step's activations, split evenly among the peers on
that GPU that have not loaded yet. Peers on one GPU load one at a time (`peer.gpu_share`), so
each measures free VRAM after the ones before it took theirs: two peers started together get
about half each, and a second peer started later gets what the first left.

Which: the window where the swarm is weakest. Each layer's strength is the throughput the
swarm has for it, the sum over the peers serving it of their measured decode speed. Layers
nobody serves come first (a window holding more of them always wins); among windows with as
many, the one with the least total strength; ties go to the leftmost.

Rebalancing, with hysteresis: a peer moves only if a layer nobody serves exists outside its
span while its own layers are all served by others, or if moving would raise the throughput of
the swarm's weakest layer by `min_gain` times; otherwise it stays, so peers do not flap.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from layerswarm.shards.config import Span
from layerswarm.swarm.records import PeerRecord
from layerswarm.swarm.transport import CIRCUIT


@dataclass(frozen=True)
class Server:
    """One peer as placement sees it."""

    peer_id: str
    span: Span
    speed: float  # unit: decode steps/s of one layer (its measured throughput)


# A peer reachable only through a relay counts at this share of its speed: every step to it
# also crosses the relay (5 link crossings a token instead of 3 on a two-hop path, as
# scripts/bench_nat.py counts them), the relay's rate limit caps it, and the relay can fail
# beneath it. At half, new peers load its layers too instead of taking them as covered, as
# Petals penalises relay-only servers when it rebalances.
RELAYED_ONLY_SHARE = 0.5


def record_server(record: PeerRecord) -> Server:
    """Placement's view of a peer from its record: relayed-only peers at RELAYED_ONLY_SHARE.

    Relayed-only: its best address (records list them best first, `swarm/traversal.py`) is a
    relayed one; the local addresses a peer behind NAT lists after it reach only its own LAN.
    """
    speed = record.decode_steps_per_s_per_layer or 1.0
    relayed = bool(record.addresses) and f"/{CIRCUIT}" in record.addresses[0]
    span = Span(record.span_start, record.span_end)
    return Server(record.peer_id, span, speed * (RELAYED_ONLY_SHARE if relayed else 1.0))


# unit: bytes of a GPU's free memory a peer leaves for the CUDA context, the kernels' code, a
# step's activations and the allocator's slack (torch's CUDA context alone takes ~300-500 MiB)
GPU_RESERVE_BYTES = 1 << 30
CPU_BUDGET_FRACTION = 0.5  # of available RAM: the rest is the home PC's


def memory_budget(free_bytes: int, on_gpu: bool, peers_loading: int = 1) -> int:
    """The bytes a peer's weights and KV cache may take by default (no `--memory-budget`).

    Args:
        free_bytes: free memory of the device now (VRAM on a GPU, available RAM on a CPU).
        on_gpu: the device is a GPU.
        peers_loading: peers on this GPU that have not loaded yet, this one included; the free
            VRAM splits evenly among them (peers already loaded took theirs: it is not free).
    """
    if not on_gpu:
        return int(free_bytes * CPU_BUDGET_FRACTION)
    return max(0, free_bytes - GPU_RESERVE_BYTES) // max(1, peers_loading)


def device_share(free_bytes: int, total_bytes: int, peers: int) -> tuple[int, int]:
    """`(free, total)` bytes one of `peers` peers on a device announces: an equal part, so
    that readers summing the swarm's records count a shared GPU once."""
    n = max(1, peers)
    return free_bytes // n, total_bytes // n


def layers_that_fit(
    budget_bytes: int, bytes_per_layer: int, cache_reserve_bytes: int, num_layers: int
) -> int:
    """How many layers fit a memory budget, after the KV-cache reserve (at least one)."""
    usable = max(0, budget_bytes - cache_reserve_bytes)
    return max(1, min(num_layers, usable // max(1, bytes_per_layer)))


def strength(servers: Sequence[Server], num_layers: int, skip: str | None = None) -> list[float]:
    """Per layer, the swarm's decode throughput for it (0 where nobody serves it)."""
    out = [0.0] * num_layers
    for s in servers:
        if s.peer_id == skip:
            continue
        for layer in range(s.span.start, min(s.span.end, num_layers)):
            out[layer] += s.speed
    return out


def choose_span(
    servers: Sequence[Server], num_layers: int, length: int, me: str | None = None
) -> Span:
    """The window of `length` layers where the swarm (without `me`) is weakest."""
    length = max(1, min(length, num_layers))
    power = strength(servers, num_layers, skip=me)
    best: tuple[int, float, int] | None = None
    for start in range(num_layers - length + 1):
        window = power[start : start + length]
        key = (-sum(1 for p in window if p == 0), sum(window), start)
        if best is None or key < best:
            best = key
    assert best is not None  # at least one window exists
    return Span(best[2], best[2] + length)


def should_move(
    servers: Sequence[Server], num_layers: int, me: Server, min_gain: float = 1.5
) -> Span | None:
    """Where `me` should move to help the swarm most, or None to stay.

    Args:
        servers: every peer's record, `me` included or not.
        me: this peer, with its current span and speed.
        min_gain: how many times the weakest layer's throughput must grow to be worth a move.
    """
    others = [s for s in servers if s.peer_id != me.peer_id]
    without_me = strength(others, num_layers)
    mine = range(me.span.start, me.span.end)
    target = choose_span(others, num_layers, len(me.span))
    if target == me.span:
        return None
    if 0 in without_me and all(without_me[layer] > 0 for layer in mine):
        return target  # a gap elsewhere, and every layer of mine is served by someone else
    if any(without_me[layer] == 0 for layer in mine):
        return None  # leaving would open a gap
    here = min(strength([*others, me], num_layers))
    there = min(strength([*others, Server(me.peer_id, target, me.speed)], num_layers))
    return target if there > here * min_gain else None
