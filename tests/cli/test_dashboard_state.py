"""The dashboard's data, pure: coverage of peer rows, tokens/s buckets, events, their counters."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import REGISTRY

from layerswarm.cli.dashboard import coverage, peer_row
from layerswarm.metrics import EVENTS, TokenRate, note_event


def row(span: tuple[int, int], state: str = "live") -> dict[str, Any]:
    return peer_row("12D3KooWxxxxxxxxxxxxxxxxAbCdEfGh", "10.0.0.1:4000", span, state=state)


@pytest.mark.parametrize(
    ("rows", "counts", "gaps"),
    [
        ([], [0] * 6, [[0, 6]]),
        ([row((0, 3)), row((3, 6))], [1] * 6, []),
        ([row((0, 3)), row((0, 6)), row((3, 6), "down")], [2, 2, 2, 1, 1, 1], []),
        (
            [row((0, 2)), row((2, 4), "banned"), row((4, 6), "leaving")],
            [1, 1, 0, 0, 0, 0],
            [[2, 6]],
        ),
        ([row((1, 2)), row((4, 9))], [0, 1, 0, 0, 1, 1], [[0, 1], [2, 4]]),
    ],
)
def test_coverage_counts_live_peers_and_names_the_gaps(
    rows: list[dict[str, Any]], counts: list[int], gaps: list[list[int]]
) -> None:
    assert coverage(rows, 6) == {"counts": counts, "gaps": gaps}


def test_peer_row_shortens_ids_and_dtypes() -> None:
    r = peer_row("12D3KooWxxxxAbCdEfGh", "h:1", (0, 4), dtype="bfloat16", quant="int8")
    assert (r["short_id"], r["dtype"], r["span"], r["state"]) == (
        "…AbCdEfGh",
        "bf16/int8",
        [0, 4],
        "live",
    )


def test_peer_rows_say_how_the_peer_is_reached() -> None:
    from layerswarm.cli.dashboard import _record_row
    from layerswarm.swarm.records import PeerRecord

    assert peer_row("p", "h:1", (0, 4))["reach"] == "?"
    assert peer_row("p", "h:1", (0, 4), reach="punched")["reach"] == "punched"
    relayed = "203.0.113.7:4001/12D3KooWRelay/p2p-circuit"
    record = PeerRecord(
        "12D3KooWxxxxAbCdEfGh", (relayed,), "m", "0123456789abcdef", 0, 2, 2, "float32",
        "0.1.0", 1, timestamp=1000.0, expires_at=2000.0,
    )  # fmt: skip
    assert _record_row(record, "live")["reach"] == "relayed"


def test_token_rate_averages_per_bucket_over_the_window() -> None:
    rate = TokenRate(window=20)
    for i in range(10):  # 30 tokens over seconds 1000-1004
        rate.add(3, now=1000 + i * 0.5)
    rate.add(100, now=900)  # older than the window at 1010: dropped on the next add
    rate.add(5, now=1009)
    series = rate.series(now=1010, step=5)
    assert [t for t, _ in series] == [995, 1000, 1005, 1010]
    assert sum(v * 5 for _, v in series) == 35
    assert max(v for _, v in series) == 6.0  # 30 tokens in one 5 s bucket


def test_events_are_kept_and_bans_and_reroutes_counted() -> None:
    def count(name: str) -> float:
        return REGISTRY.get_sample_value(name) or 0.0

    bans, reroutes = count("layerswarm_bans_total"), count("layerswarm_reroutes_total")
    note_event("ban", "banned 12D3KooW... for 5 s: bad reply")
    note_event("reroute", "rerouted layers 0:10 from a to b")
    note_event("leave", "peer ...x is leaving")
    assert count("layerswarm_bans_total") == bans + 1
    assert count("layerswarm_reroutes_total") == reroutes + 1
    kinds = [(e.kind, e.text) for e in EVENTS.recent()[-3:]]
    assert kinds[0] == ("ban", "banned 12D3KooW... for 5 s: bad reply")
    assert [k for k, _ in kinds] == ["ban", "reroute", "leave"]
