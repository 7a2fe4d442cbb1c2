"""The session table's compute worker: steps run on the thread count the peer measured for them."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import torch

from layerswarm.peer.measure import measure_speed
from layerswarm.peer.sessions import SessionTable
from layerswarm.shards.blocks import SpanModel
from layerswarm.shards.config import ModelConfig, Span

CONFIG = ModelConfig(
    hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2, head_dim=16
)


def tiny_span() -> SpanModel:
    torch.manual_seed(0)
    return SpanModel(CONFIG, Span(0, 2))


def recording_threads(model: SpanModel) -> list[tuple[int, int]]:
    """Wraps `model.forward`: each call appends (tokens, torch's thread count during it)."""
    seen: list[tuple[int, int]] = []
    forward = model.forward

    def recorded(hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        seen.append((hidden.shape[1], torch.get_num_threads()))
        return forward(hidden, *args, **kwargs)

    model.forward = recorded  # type: ignore[method-assign]
    return seen


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="needs a machine with 2 threads or more")
def test_one_session_decode_runs_on_the_measured_threads_and_prefill_on_all() -> None:
    all_threads = torch.get_num_threads()
    model = tiny_span()
    seen = recording_threads(model)
    hidden = torch.randn(1, 6, CONFIG.hidden_size, generator=torch.Generator().manual_seed(1))

    async def steps(table: SessionTable) -> list[torch.Tensor]:
        worker = asyncio.create_task(table.serve_steps())
        try:
            session = table.open("client", "s", Span(0, 2), 16)
            outs = [await table.step(session, hidden[:, :4], 0, 10.0)]
            for i in (4, 5):
                outs.append(await table.step(session, hidden[:, i : i + 1], i, 10.0))
            return outs
        finally:
            worker.cancel()

    table = SessionTable(model, 64, decode_threads=1)
    outs = asyncio.run(steps(table))
    table.shutdown()
    assert seen == [(4, all_threads), (1, 1), (1, 1)]
    assert torch.get_num_threads() == all_threads  # the caller's own setting is untouched

    # The same steps on every thread give the same bits.
    cache = model.new_cache(16)
    session = cache.allocate(16)
    expected = [model(hidden[:, :4], [0], cache, [session])]
    expected += [model(hidden[:, i : i + 1], [i], cache, [session]) for i in (4, 5)]
    for out, want in zip(outs, expected, strict=True):
        assert torch.equal(out, want)


def test_measuring_speed_picks_a_thread_count_and_leaves_torchs_as_it_was() -> None:
    before = torch.get_num_threads()
    speed = measure_speed(tiny_span(), prompt=8, steps=2)
    assert torch.get_num_threads() == before
    assert speed.decode_s_per_layer > 0 and speed.prefill_tokens_per_s_per_layer > 0
    assert speed.decode_threads in ({1, before} if before > 1 else {0})
