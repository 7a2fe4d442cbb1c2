"""Path choice, table-driven: heterogeneous peers, overlaps, gaps, bans, spreading load."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from layerswarm.errors import NoRouteError
from layerswarm.routing.paths import (
    RELAYED_HOP_S,
    BanList,
    PeerView,
    choose_path,
    hop_cost,
    missing_layers,
)
from layerswarm.shards.config import Span


def peer(
    pid: str,
    start: int,
    end: int,
    spl: float = 0.01,
    load: float = 0.0,
    rtt: float = 0.001,
    relayed: bool = False,
) -> PeerView:
    return PeerView(pid, f"127.0.0.1:1/{pid}", Span(start, end), spl, load, rtt, relayed=relayed)


def route(path) -> list[tuple[str, int, int]]:  # type: ignore[no-untyped-def]
    return [(h.peer_id, h.span.start, h.span.end) for h in path]


CASES = {
    "two halves": (
        [peer("a", 0, 15), peer("b", 15, 30)],
        [],
        [("a", 0, 15), ("b", 15, 30)],
    ),
    "one peer serves everything: one hop beats two": (
        [peer("a", 0, 15), peer("b", 15, 30), peer("all", 0, 30)],
        [],
        [("all", 0, 30)],
    ),
    "a much faster peer is worth an extra hop": (
        [peer("slow", 0, 30, spl=0.1), peer("fast1", 0, 15), peer("fast2", 15, 30)],
        [],
        [("fast1", 0, 15), ("fast2", 15, 30)],
    ),
    "partial overlap: the faster peer takes all it can": (
        [peer("a", 0, 20), peer("b", 10, 30, spl=0.005)],
        [],
        [("a", 0, 10), ("b", 10, 30)],
    ),
    "a loaded peer is avoided": (
        [peer("busy", 0, 30, load=9.0), peer("idle", 0, 30)],
        [],
        [("idle", 0, 30)],
    ),
    "a far peer is avoided (client-measured round trip)": (
        [peer("far", 0, 30, rtt=0.5), peer("near", 0, 30, rtt=0.001)],
        [],
        [("near", 0, 30)],
    ),
    "banned peers are left out": (
        [peer("a", 0, 30), peer("b", 0, 15), peer("c", 15, 30)],
        ["a"],
        [("b", 0, 15), ("c", 15, 30)],
    ),
    "three heterogeneous peers": (
        [peer("x", 0, 12, spl=0.02), peer("y", 8, 25, spl=0.01), peer("z", 20, 30, spl=0.03)],
        [],
        [("x", 0, 8), ("y", 8, 25), ("z", 25, 30)],
    ),
}


# A relayed hop's round trip was measured through its relay; the router adds RELAYED_HOP_S.
RELAYED_CASES = {
    "equal measurements: the direct replica wins": (
        [peer("relayed", 0, 30, relayed=True), peer("direct", 0, 30)],
        [("direct", 0, 30)],
    ),
    "a relayed replica measured faster by more than the penalty still wins": (
        [peer("relayed", 0, 30, relayed=True, rtt=0.001), peer("direct", 0, 30, rtt=0.01)],
        [("relayed", 0, 30)],
    ),
    "a relayed-only span is used: relayed beats no route": (
        [peer("a", 0, 15), peer("home", 15, 30, relayed=True)],
        [("a", 0, 15), ("home", 15, 30)],
    ),
    "a relayed peer's extra link is counted per hop: one relayed hop beats two": (
        [
            peer("h1", 0, 15, relayed=True),
            peer("h2", 15, 30, relayed=True),
            peer("h12", 0, 30, relayed=True, spl=0.01005),
        ],
        [("h12", 0, 30)],
    ),
    "two direct hops beat one relayed hop that costs the same compute plus its relay": (
        [
            peer("d1", 0, 15, rtt=0.0005),
            peer("d2", 15, 30, rtt=0.0005),
            peer("r", 0, 30, relayed=True),
        ],
        [("d1", 0, 15), ("d2", 15, 30)],
    ),
}


@pytest.mark.parametrize("case", sorted(RELAYED_CASES))
def test_choose_path_prefers_direct_hops(case: str) -> None:
    peers, expected = RELAYED_CASES[case]
    assert route(choose_path(peers, Span(0, 30))) == expected


@pytest.mark.parametrize(
    ("view", "layers", "cost"),
    [
        (peer("d", 0, 30, spl=0.01, rtt=0.002), 10, 0.1 + 0.002),
        (peer("r", 0, 30, spl=0.01, rtt=0.002, relayed=True), 10, 0.1 + 0.002 + RELAYED_HOP_S),
        (peer("r", 0, 30, spl=0.01, load=1.0, rtt=0.0, relayed=True), 5, 0.1 + RELAYED_HOP_S),
    ],
)
def test_hop_cost_counts_a_relayed_hops_extra_link_once(
    view: PeerView, layers: int, cost: float
) -> None:
    assert hop_cost(view, layers) == pytest.approx(cost)


@pytest.mark.parametrize("case", sorted(CASES))
def test_choose_path(case: str) -> None:
    peers, banned, expected = CASES[case]
    assert route(choose_path(peers, Span(0, 30), banned)) == expected


def test_path_for_a_failed_hops_span_only() -> None:
    peers = [peer("a", 0, 15), peer("b", 15, 30), peer("b2", 10, 30)]
    assert route(choose_path(peers, Span(15, 30), banned={"b"})) == [("b2", 15, 30)]


@pytest.mark.parametrize(
    ("peers", "banned", "missing"),
    [
        ([peer("a", 0, 10), peer("b", 12, 30)], [], [10, 11]),
        ([peer("a", 0, 15), peer("b", 15, 30)], ["b"], list(range(15, 30))),
        ([], [], list(range(30))),
    ],
)
def test_no_route_names_the_missing_layers(
    peers: list[PeerView], banned: list[str], missing: list[int]
) -> None:
    assert missing_layers(peers, Span(0, 30), banned) == missing
    with pytest.raises(NoRouteError) as e:
        choose_path(peers, Span(0, 30), banned)
    assert e.value.missing_layers == missing


def test_sessions_spread_over_replicas_in_proportion_to_capacity() -> None:
    # "big" is twice as fast as "small": it should get about 2/3 of the sessions, not all.
    peers = [peer("big", 0, 30, spl=0.01), peer("small", 0, 30, spl=0.02)]
    rng = random.Random(0)
    picks = Counter(choose_path(peers, Span(0, 30), rng=rng)[0].peer_id for _ in range(3000))
    assert picks["big"] / 3000 == pytest.approx(2 / 3, abs=0.04)


def test_without_rng_the_choice_is_deterministic() -> None:
    peers = [peer("big", 0, 30, spl=0.01), peer("small", 0, 30, spl=0.02)]
    assert {choose_path(peers, Span(0, 30))[0].peer_id for _ in range(20)} == {"big"}


def test_bans_back_off_and_expire() -> None:
    bans = BanList(base_seconds=2.0, max_seconds=10.0)
    assert bans.ban("p", now=0.0) == 2.0
    assert bans.banned(now=1.0) == {"p"}
    assert bans.banned(now=2.5) == set()
    assert bans.ban("p", now=3.0) == 4.0
    assert bans.ban("p", now=8.0) == 8.0
    assert bans.ban("p", now=20.0) == 10.0  # capped
    bans.forgive("p")
    assert bans.banned(now=20.0) == set()
    assert bans.ban("p", now=21.0) == 2.0
