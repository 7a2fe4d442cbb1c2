"""Span choice and rebalancing, table-driven with heterogeneous peers."""

from __future__ import annotations

import pytest

from layerswarm.peer.placement import (
    RELAYED_ONLY_SHARE,
    Server,
    choose_span,
    device_share,
    layers_that_fit,
    memory_budget,
    record_server,
    should_move,
)
from layerswarm.shards.config import Span
from layerswarm.swarm.records import PeerRecord


def srv(pid: str, start: int, end: int, speed: float = 1.0) -> Server:
    return Server(pid, Span(start, end), speed)


CHOOSE = {
    "empty swarm: start at the left": ([], 10, Span(0, 10)),
    "fill the gap after the first peer": ([srv("a", 0, 12)], 10, Span(12, 22)),
    "a gap beats a weak but served region": (
        [srv("a", 0, 20, speed=0.1), srv("b", 25, 30)],
        5,
        Span(20, 25),
    ),
    "partial gap: the window with most unserved layers": ([srv("a", 0, 26)], 8, Span(22, 30)),
    "all served: go where throughput is lowest": (
        [srv("fast", 0, 15, speed=4.0), srv("slow", 15, 30, speed=1.0)],
        15,
        Span(15, 30),
    ),
    "all served, replicas: the thinner half": (
        [srv("a", 0, 15), srv("b", 0, 15), srv("c", 15, 30)],
        15,
        Span(15, 30),
    ),
    "longer than the model: all of it": ([srv("a", 0, 30)], 40, Span(0, 30)),
}


@pytest.mark.parametrize("case", sorted(CHOOSE))
def test_choose_span(case: str) -> None:
    servers, length, expected = CHOOSE[case]
    assert choose_span(servers, 30, length) == expected


def test_three_peers_with_different_budgets_cover_the_model_in_proportion() -> None:
    per_layer, reserve = 20 * 2**20, 16 * 2**20
    budgets = {"big": 316 * 2**20, "mid": 216 * 2**20, "small": 96 * 2**20}
    servers: list[Server] = []
    for pid, budget in budgets.items():  # peers join one after another
        n = layers_that_fit(budget, per_layer, reserve, 30)
        servers.append(Server(pid, choose_span(servers, 30, n), 1.0))
    assert [len(s.span) for s in servers] == [15, 10, 4]
    covered = {layer for s in servers for layer in range(s.span.start, s.span.end)}
    assert covered == set(range(29))  # one layer short: the budgets hold 29 layers in all
    # A fourth peer goes where coverage is thinnest: the layer nobody serves.
    fourth = choose_span(servers, 30, 5)
    assert 29 in range(fourth.start, fourth.end)


def test_twice_the_memory_serves_about_twice_the_layers() -> None:
    one = layers_that_fit(200 * 2**20, 10 * 2**20, 0, 100)
    two = layers_that_fit(400 * 2**20, 10 * 2**20, 0, 100)
    assert two == 2 * one


MOVES = {
    "stay when alone": ([srv("me", 0, 15)], srv("me", 0, 15), None),
    "fill a gap when my layers are served twice": (
        [srv("me", 0, 15), srv("a", 0, 15), srv("b", 15, 25)],
        srv("me", 0, 15),
        Span(15, 30),
    ),
    "do not open a gap to fill another": (
        [srv("me", 0, 15), srv("b", 15, 25)],
        srv("me", 0, 15),
        None,
    ),
    "a small gain is not worth a move (hysteresis)": (
        [srv("me", 0, 15), srv("a", 0, 15, speed=1.0), srv("b", 15, 30, speed=1.6)],
        srv("me", 0, 15),
        None,
    ),
    "a large gain is": (
        [srv("me", 0, 15), srv("a", 0, 15, speed=4.0), srv("b", 15, 30, speed=0.5)],
        srv("me", 0, 15),
        Span(15, 30),
    ),
}


@pytest.mark.parametrize("case", sorted(MOVES))
def test_should_move(case: str) -> None:
    servers, me, expected = MOVES[case]
    assert should_move(servers, 30, me) == expected


def test_a_peer_that_moved_does_not_move_back() -> None:
    others = [srv("a", 0, 15, speed=4.0), srv("b", 15, 30, speed=0.5)]
    me = srv("me", 0, 15)
    target = should_move([*others, me], 30, me)
    assert target == Span(15, 30)
    moved = Server("me", target, me.speed)
    assert should_move([*others, moved], 30, moved) is None


GiB = 1 << 30
LLAMA_8B_LAYER = 218_112_000  # parameters of one Llama-3-8B layer
BF16, INT4 = 2.0, 0.6  # bytes a weight (server's BYTES_PER_WEIGHT)
CACHE = 2 * GiB  # --cache-memory

# (free bytes of the device, on a GPU, peers on it still loading, bytes a weight) -> budget, layers
VRAM = {
    "a 12 GB card alone: free VRAM less 1 GiB": (11.5 * GiB, True, 1, BF16, 10.5 * GiB, 20),
    "two peers started together: the first takes half": (11.5 * GiB, True, 2, BF16, 5.25 * GiB, 7),
    "...and the second what is left, alone now": (6.0 * GiB, True, 1, BF16, 5.0 * GiB, 7),
    "int4 layers: the whole model fits": (11.5 * GiB, True, 1, INT4, 10.5 * GiB, 32),
    "a 24 GB card, four peers loading": (23.0 * GiB, True, 4, BF16, 5.5 * GiB, 8),
    "less than the reserve free: nothing, one layer anyway": (0.5 * GiB, True, 1, BF16, 0, 1),
    "a CPU: half the available RAM, peers ignored": (16 * GiB, False, 3, BF16, 8 * GiB, 14),
}


@pytest.mark.parametrize("case", list(VRAM))
def test_auto_layers_budget_the_devices_memory(case: str) -> None:
    free, on_gpu, loading, per_weight, budget, layers = VRAM[case]
    got = memory_budget(int(free), on_gpu, loading)
    assert got == int(budget)
    per_layer = int(LLAMA_8B_LAYER * per_weight)
    assert layers_that_fit(got, per_layer, CACHE, 32) == layers


SHARES = {
    "alone: the whole device": (10 * GiB, 24 * GiB, 1, 10 * GiB, 24 * GiB),
    "two peers on one GPU: half each": (10 * GiB, 24 * GiB, 2, 5 * GiB, 12 * GiB),
    "three: a third, rounded down": (10, 24, 3, 3, 8),
    "no peer counted: as if alone": (10, 24, 0, 10, 24),
}


@pytest.mark.parametrize("case", list(SHARES))
def test_peers_sharing_a_gpu_announce_an_equal_part(case: str) -> None:
    free, total, peers, want_free, want_total = SHARES[case]
    assert device_share(free, total, peers) == (want_free, want_total)


def _record(peer_id: str, span: Span, *addresses: str) -> PeerRecord:
    return PeerRecord(
        peer_id=peer_id,
        addresses=addresses,
        model="m",
        model_hash="0123456789abcdef",
        span_start=span.start,
        span_end=span.end,
        num_layers=30,
        dtype="float32",
        software_version="0.1.0",
        protocol_version=1,
        decode_steps_per_s_per_layer=100.0,
    )


RELAY_ID = "12D3KooWE1vaqiNT9YerddmeqsQu7fkyuTKxgqw3Vxxps7CZtVLE"
CIRCUIT_ADDRESS = f"11.99.0.1:4001/{RELAY_ID}/p2p-circuit"


@pytest.mark.parametrize(
    ("addresses", "speed"),
    [
        (("11.99.0.1:5000",), 100.0),
        (("11.99.0.1:5000", CIRCUIT_ADDRESS), 100.0),  # public first: dialed directly
        ((CIRCUIT_ADDRESS,), 100.0 * RELAYED_ONLY_SHARE),
        # behind NAT: relayed first, then its home LAN's address, which others cannot reach
        ((CIRCUIT_ADDRESS, "10.101.0.2:5000"), 100.0 * RELAYED_ONLY_SHARE),
        ((CIRCUIT_ADDRESS, CIRCUIT_ADDRESS.replace(".1:", ".2:")), 100.0 * RELAYED_ONLY_SHARE),
    ],
)
def test_a_relayed_only_peer_counts_at_a_share_of_its_speed(
    addresses: tuple[str, ...], speed: float
) -> None:
    assert record_server(_record("p", Span(0, 15), *addresses)).speed == speed


def test_a_new_peer_loads_the_layers_of_a_relayed_only_peer_before_a_public_ones() -> None:
    public = record_server(_record("pub", Span(0, 15), "11.99.0.1:5000"))
    home = record_server(_record("home", Span(15, 30), CIRCUIT_ADDRESS))
    assert choose_span([public, home], 30, 15) == Span(15, 30)
