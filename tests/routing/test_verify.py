"""The pure parts of checking peers: cheap reply checks, tolerances, kept context, claims."""

from __future__ import annotations

import math
import struct
from types import SimpleNamespace

import msgpack
import pytest
import torch

from layerswarm.errors import LayerswarmError, ProtocolError
from layerswarm.routing.failures import reply_fault
from layerswarm.routing.kept_inputs import context_slice
from layerswarm.routing.peer_book import NormBounds
from layerswarm.routing.peer_link import PeerLink
from layerswarm.routing.peer_stats import (
    MAX_SECONDS_PER_LAYER,
    MIN_SECONDS_PER_LAYER,
    PeerStats,
    claimed_seconds_per_layer,
)
from layerswarm.routing.trust import TrustLedger
from layerswarm.routing.verify import relative_error, tolerance
from layerswarm.swarm.protocol import InfoReply, decode_frame, encode
from layerswarm.swarm.transport import parse_address


def test_reply_checks_name_shape_dtype_and_non_finite_values() -> None:
    sent = torch.randn(1, 3, 8)
    assert reply_fault(sent, sent.clone()) is None
    assert "shape" in str(reply_fault(sent, torch.randn(1, 2, 8)))
    assert "torch.float16" in str(reply_fault(sent, sent.half()))
    for bad in (float("nan"), float("inf"), -float("inf")):
        out = sent.clone()
        out[0, 1, 2] = bad
        assert "non-finite" in str(reply_fault(sent, out))


def test_the_tolerance_follows_the_loosest_dtype_and_catches_a_10_percent_change() -> None:
    assert tolerance("float32") < tolerance("float16") < tolerance("bfloat16")
    assert tolerance("float32", "bfloat16") == tolerance("bfloat16")
    a = torch.randn(1, 4, 64)
    assert relative_error(a, a) == 0.0
    noisy = a.clone()
    noisy[0, 2] += 0.1 * a[0, 2].norm() / 8  # one token off by 10% of its norm
    err = relative_error(noisy, a)
    assert math.isclose(err, 0.1, rel_tol=1e-3)
    assert err > tolerance("bfloat16")


def test_norm_bounds_learn_then_flag_a_blown_up_output() -> None:
    bounds = NormBounds(factor=8.0, learn_steps=2)
    normal = torch.ones(1, 1, 16)
    assert not bounds.suspicious(5, normal) and not bounds.suspicious(5, normal * 2)
    assert not bounds.suspicious(5, normal * 3)
    assert bounds.suspicious(5, normal * 100)
    assert not bounds.suspicious(7, normal * 100)  # another boundary learns on its own


def test_context_slice_cuts_kept_inputs_and_follows_a_rollback() -> None:
    h = torch.arange(10.0).reshape(1, 10, 1)
    entries = [(0, h[:, :6]), (6, h[:, 6:7]), (7, h[:, 7:8])]
    got = context_slice(entries, 4, 8)
    assert [(s, t.flatten().tolist()) for s, t in got] == [(4, [4.0, 5.0]), (6, [6.0]), (7, [7.0])]
    # The session went back to position 6 and took another token there.
    rewritten = [*entries, (6, torch.tensor([[[60.0]]]))]
    got = context_slice(rewritten, 0, 7)
    assert torch.cat([t for _, t in got], dim=1).flatten().tolist()[-2:] == [5.0, 60.0]
    with pytest.raises(LayerswarmError, match="do not cover"):
        context_slice(entries, 0, 9)


@pytest.mark.parametrize(
    ("claim", "expected"),
    [
        (0.002, 0.002),
        (float("inf"), 0.01),
        (float("nan"), 0.01),
        (0.0, 0.01),
        (-1.0, 0.01),
        (1e-30, MIN_SECONDS_PER_LAYER),
        (1e9, MAX_SECONDS_PER_LAYER),
        ("fast", 0.01),
        (True, 0.01),
    ],
)
def test_a_claimed_speed_is_used_only_within_bounds(claim: object, expected: float) -> None:
    assert claimed_seconds_per_layer({"decode_s_per_layer": claim}) == expected


def test_measured_steps_replace_claims_as_a_moving_average() -> None:
    stats = PeerStats(weight=0.5)
    assert stats.seconds_per_layer("p") is None
    stats.observe("p", 0.011, layers=10, tokens=1, rtt=0.001)  # 1 ms a layer
    stats.observe("p", 0.031, layers=10, tokens=1, rtt=0.001)  # 3 ms a layer
    assert stats.seconds_per_layer("p") == pytest.approx(0.002)
    stats.observe("p", 5.0, layers=10, tokens=500, rtt=0.001)  # a prefill: not a decode sample
    assert stats.seconds_per_layer("p") == pytest.approx(0.002)


def test_an_info_reply_with_a_non_finite_float_is_refused_on_both_sides() -> None:
    reply = InfoReply("p", "m", 0, 1, 1, "float32", 0, 0, 0, {"decode_s_per_layer": math.inf})
    with pytest.raises(ProtocolError, match="not a finite number"):
        encode(reply, 1)
    header = {
        "type": "info_reply",
        "id": 1,
        **{k: getattr(reply, k) for k in reply.__dataclass_fields__},
    }
    header["extra"] = {"load": {"deep": [1.0, math.nan]}}
    head = msgpack.packb(header)
    frame = struct.pack(">II", 4 + len(head), len(head)) + head
    with pytest.raises(ProtocolError, match="not a finite number"):
        decode_frame(frame)


def test_a_liar_is_recorded_once_with_its_evidence() -> None:
    seen = []
    ledger = TrustLedger(on_ban=seen.append)
    assert ledger.ban("p", "h:1/p", "wrong", {"layers": "0:4"})
    assert not ledger.ban("p", "h:1/p", "wrong again", {})
    assert ledger.liars == {"p"} and len(seen) == 1
    [record] = ledger.records()
    assert record.as_dict()["evidence"] == {"layers": "0:4"} and record.reason == "wrong"


def test_the_router_sees_bounded_claims_until_its_own_measurements_replace_them() -> None:
    claim = {"decode_s_per_layer": 1e-30, "quant": "int8"}
    info = InfoReply("p", "m@h", 0, 4, 4, "bfloat16", 0, 0, 10**9, claim)  # type: ignore[arg-type]
    address = parse_address("127.0.0.1:1")
    conn = SimpleNamespace(peer_id="p", address=address)  # a connection as a link reads it
    link = PeerLink(address, conn, info)  # type: ignore[arg-type]
    stats = PeerStats()
    view = link.view(stats)
    assert view.seconds_per_layer == MIN_SECONDS_PER_LAYER  # "infinitely fast": clamped
    assert view.load == 1000.0 and view.dtype == "bfloat16" and view.quant == "int8"
    stats.observe("p", 0.041, layers=4, tokens=1, rtt=0.001)
    view = link.view(stats)
    assert view.seconds_per_layer == pytest.approx(0.01) and view.load == 0.0
