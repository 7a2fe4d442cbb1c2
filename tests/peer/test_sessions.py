"""The session table's compute worker: steps run on the thread count the peer measured for them."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
import torch

from layerswarm.errors import RemoteError
from layerswarm.peer.config import ServingConfig
from layerswarm.peer.measure import measure_speed
from layerswarm.peer.sessions import SessionTable
from layerswarm.shards.blocks import SpanModel
from layerswarm.shards.config import ModelConfig, Span
from layerswarm.shards.scheduler import SchedulerConfig
from layerswarm.swarm.protocol import ErrorCode

CONFIG = ModelConfig(
    hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2, head_dim=16
)
T = TypeVar("T")


def tiny_span() -> SpanModel:
    torch.manual_seed(0)
    return SpanModel(CONFIG, Span(0, 2))


def recording_threads(model: SpanModel) -> list[tuple[int, int]]:
    """Wraps `model.forward_flat`: each call appends (tokens, torch's thread count during it)."""
    seen: list[tuple[int, int]] = []
    forward = model.forward_flat

    def recorded(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        seen.append((x.shape[0], torch.get_num_threads()))
        return forward(x, *args, **kwargs)

    model.forward_flat = recorded  # type: ignore[method-assign]
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
            session = await table.open("conn", "client", "s", Span(0, 2), 16)
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


def table_of(pages: int, **limits: Any) -> SessionTable:
    """A table over a cache of `pages` pages of 16 tokens (no reserve, no per-client share
    unless asked)."""
    limits.setdefault("cache_reserve", 0.0)
    limits.setdefault("max_client_cache_fraction", 1.0)
    return SessionTable(tiny_span(), 16 * pages, ServingConfig(**limits))


def serve(table: SessionTable, body: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        worker = asyncio.create_task(table.serve_steps())
        try:
            return await body()
        finally:
            worker.cancel()

    try:
        return asyncio.run(main())
    finally:
        table.shutdown()


def steps(tokens: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(1, tokens, CONFIG.hidden_size, generator=torch.Generator().manual_seed(seed))


def test_opening_reserves_nothing_and_steps_take_pages_as_the_session_grows() -> None:
    table = table_of(8)

    async def body() -> None:
        s = await table.open("conn", "client", "s", Span(0, 2), 128)  # 8 pages if reserved
        assert table.cache.pages_free == 8
        await table.step(s, steps(20), 0, 10.0)
        assert len(s.cache.pages) == 2
        other = await table.open("conn", "client", "t", Span(0, 2), 128)
        assert other.cache.pages == []

    serve(table, body)


def test_a_session_that_cannot_grow_hears_session_full() -> None:
    table = table_of(4)

    async def body() -> None:
        a = await table.open("conn", "client", "a", Span(0, 2), 64)
        b = await table.open("conn", "other", "b", Span(0, 2), 64)
        await table.step(a, steps(40), 0, 10.0)  # 3 of 4 pages
        await table.step(b, steps(16), 0, 10.0)  # the last one
        with pytest.raises(RemoteError) as e:
            await table.step(b, steps(1), 16, 10.0)
        assert e.value.code == ErrorCode.SESSION_FULL
        assert "'b'" in e.value.message and "cannot grow to 17 tokens" in e.value.message
        await table.step(a, steps(1), 40, 10.0)  # the other session goes on

    serve(table, body)


def test_an_open_waits_for_memory_and_gets_in_when_a_session_closes() -> None:
    table = table_of(2, admission_timeout=30.0)

    async def body() -> None:
        await table.open("conn", "a", "1", Span(0, 2), 64)
        await table.open("conn", "b", "2", Span(0, 2), 64)
        waiting = asyncio.ensure_future(table.open("conn", "c", "3", Span(0, 2), 64))
        await asyncio.sleep(0.01)
        assert not waiting.done()
        table.close("conn", "1")
        session = await waiting
        assert session.key == ("conn", "3")

    serve(table, body)


def test_an_open_hears_cache_full_after_the_timeout_or_at_once_when_the_queue_is_full() -> None:
    table = table_of(1, admission_timeout=0.05, admission_queue=1)

    async def body() -> None:
        await table.open("conn", "a", "1", Span(0, 2), 64)
        waiting = asyncio.ensure_future(table.open("conn", "b", "2", Span(0, 2), 64))
        await asyncio.sleep(0)
        with pytest.raises(RemoteError) as at_once:
            await table.open("conn", "c", "3", Span(0, 2), 64)
        assert at_once.value.code == ErrorCode.CACHE_FULL and "already wait" in str(at_once.value)
        with pytest.raises(RemoteError) as later:
            await waiting
        assert later.value.code == ErrorCode.CACHE_FULL and "within" in str(later.value)
        assert table.tokens_free == 0 and ("conn", "2") not in table.sessions

    serve(table, body)


def test_a_client_over_its_limits_hears_busy() -> None:
    table = table_of(8, max_sessions_per_client=2, max_client_cache_fraction=0.5)

    async def body() -> None:
        a = await table.open("conn1", "greedy", "a", Span(0, 2), 128)
        await table.open("conn2", "greedy", "b", Span(0, 2), 128)  # another connection
        with pytest.raises(RemoteError) as many:
            await table.open("conn1", "greedy", "c", Span(0, 2), 128)
        assert many.value.code == ErrorCode.BUSY and "max_sessions_per_client" in str(many.value)
        await table.step(a, steps(70), 0, 10.0)  # 5 of 8 pages: alone, past its share of 4
        modest = await table.open("conn1", "modest", "c", Span(0, 2), 128)  # not limited
        with pytest.raises(RemoteError) as big:
            await table.step(a, steps(20), 70, 10.0)  # a 6th page, while another client is here
        assert big.value.code == ErrorCode.BUSY and "max_client_cache_fraction" in str(big.value)
        await table.step(modest, steps(20), 0, 10.0)  # others are not limited

    serve(table, body)


def test_a_step_queued_behind_others_is_not_timed_out_by_its_wait() -> None:
    table = table_of(16, scheduler=SchedulerConfig(token_budget=20, max_batch=2))

    async def body() -> None:
        long = await table.open("conn", "a", "long", Span(0, 2), 256)
        short = await table.open("conn", "b", "short", Span(0, 2), 64)
        prefill = asyncio.ensure_future(table.step(long, steps(200), 0, 10.0))
        await asyncio.sleep(0)
        # Timeout 0: counted from when it runs, so waiting behind the prefill's chunks is fine.
        out = await table.step(short, steps(1), 0, 0.0)
        assert out.shape == (1, 1, CONFIG.hidden_size)
        load = table.load()
        assert {"queued_tokens", "queue_seconds"} <= set(load)
        assert load["queued_tokens"] > 0 and load["queue_seconds"] >= 0
        await prefill
        assert table.load()["queued_tokens"] == 0

    serve(table, body)
