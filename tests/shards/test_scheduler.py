"""The step scheduler: mixed batches give each session what it gets alone, prefills go in chunks
beside decode steps, and one session's failure stays its own."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest
import torch

from layerswarm.errors import CacheFull, SessionExpired, StepCancelled
from layerswarm.shards.blocks import ClientHead, SpanModel, StepBatch
from layerswarm.shards.config import ModelConfig, Span
from layerswarm.shards.kv_cache import PagedKVCache, SessionCache
from layerswarm.shards.scheduler import PositionGap, SchedulerConfig, StepScheduler

CONFIG = ModelConfig(
    hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2, head_dim=16
)
T = TypeVar("T")


def tiny_span(dtype: torch.dtype = torch.float32) -> SpanModel:
    torch.manual_seed(0)
    return SpanModel(CONFIG, Span(0, 2)).to(dtype)


def hidden(tokens: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(1, tokens, CONFIG.hidden_size, generator=torch.Generator().manual_seed(seed))


def serving(scheduler: StepScheduler, body: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        loop = asyncio.create_task(scheduler.serve())
        try:
            return await body()
        finally:
            loop.cancel()

    try:
        return asyncio.run(main())
    finally:
        scheduler.close()


def alone(model: SpanModel, steps: list[tuple[torch.Tensor, int]]) -> list[torch.Tensor]:
    """Each step of one session, run by itself with a cache of its own."""
    cache = model.new_cache(256)
    seq = cache.open_session(256)
    return [model(h.to(next(model.parameters()).dtype), [s], cache, [seq]) for h, s in steps]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_session_in_a_mixed_batch_gets_what_it_gets_alone(dtype: torch.dtype) -> None:
    model = tiny_span(dtype)
    cache = model.new_cache(512)
    scheduler = StepScheduler(model, cache, SchedulerConfig(token_budget=24, max_batch=4))
    # Three sessions: prompts of different lengths (one chunked), then decode steps, all at once.
    plans = [
        [(hidden(n, 10 * i), 0)] + [(hidden(1, 10 * i + j), n + j - 1) for j in range(1, 4)]
        for i, n in enumerate((5, 30, 9))
    ]

    async def body() -> list[list[torch.Tensor]]:
        seqs = [cache.open_session(64) for _ in plans]

        async def session(i: int) -> list[torch.Tensor]:
            return [await scheduler.run(seqs[i], h, s) for h, s in plans[i]]

        return list(await asyncio.gather(*(session(i) for i in range(len(plans)))))

    outs = serving(scheduler, body)
    for plan, got in zip(plans, outs, strict=True):
        for g, w in zip(got, alone(model, plan), strict=True):
            assert g.dtype == torch.float32  # the caller's dtype
            # Not torch.equal in fp32: a CPU matmul of 1 row and of 40 rows round differently
            # (GEMV against GEMM, 3.6e-7 here); bf16 came out bit-equal here, but nothing
            # promises it, so both are held to a tolerance of their dtype.
            assert (g - w.float()).abs().max() < (1e-5 if dtype == torch.float32 else 0.05)


def test_chunked_prefill_equals_one_pass_and_picks_the_same_tokens() -> None:
    model = tiny_span()
    torch.manual_seed(1)
    head = ClientHead(CONFIG)
    cache = model.new_cache(256)
    scheduler = StepScheduler(model, cache, SchedulerConfig(token_budget=9, max_batch=2))
    prompt = hidden(40, 3)

    async def body() -> torch.Tensor:
        return await scheduler.run(cache.open_session(64), prompt, 0)

    chunked = serving(scheduler, body)
    (whole,) = alone(model, [(prompt, 0)])
    assert (chunked - whole).abs().max() < 1e-5
    assert torch.equal(head.logits(chunked).argmax(-1), head.logits(whole).argmax(-1))


def test_a_decode_step_runs_beside_a_long_prefill_queued_before_it() -> None:
    model = tiny_span()
    cache = model.new_cache(256)
    scheduler = StepScheduler(model, cache, SchedulerConfig(token_budget=8, max_batch=2))
    finished: list[str] = []

    async def body() -> None:
        decoding, prefilling = cache.open_session(64), cache.open_session(64)
        await scheduler.run(decoding, hidden(3, 1), 0)

        async def step(name: str, seq: object, h: torch.Tensor, start: int) -> None:
            await scheduler.run(seq, h, start)  # type: ignore[arg-type]
            finished.append(name)

        await asyncio.gather(
            step("prefill", prefilling, hidden(60, 2), 0),
            step("decode", decoding, hidden(1, 3), 3),
        )

    serving(scheduler, body)
    assert finished == ["decode", "prefill"]


def test_a_step_past_its_deadline_fails_alone_and_its_session_stays_where_it_was() -> None:
    model = tiny_span()
    cache = model.new_cache(256)
    config = SchedulerConfig(token_budget=8, max_batch=2, prefill_chunk=8)  # chunks even alone
    scheduler = StepScheduler(model, cache, config)
    steps = [(hidden(4, 1), 0), (hidden(1, 2), 4), (hidden(1, 3), 5)]

    async def body() -> tuple[list[torch.Tensor], BaseException | None, int]:
        mate, late = cache.open_session(64), cache.open_session(64)

        async def mate_steps() -> list[torch.Tensor]:
            return [await scheduler.run(mate, h, s) for h, s in steps]

        # Timeout 0: expired as soon as its first chunk ran, so its second chunk never runs.
        results = await asyncio.gather(
            scheduler.run(late, hidden(30, 4), 0, timeout=0.0), mate_steps(), return_exceptions=True
        )
        error = results[0] if isinstance(results[0], BaseException) else None
        return results[1], error, late.length  # type: ignore[return-value]

    outs, error, late_length = serving(scheduler, body)
    assert isinstance(error, StepCancelled)
    assert late_length == 0
    for g, w in zip(outs, alone(model, steps), strict=True):
        assert (g - w).abs().max() < 1e-5


def test_a_session_that_cannot_grow_fails_alone() -> None:
    model = tiny_span()
    cache = PagedKVCache(2, 2, 16, num_pages=4, page_size=16)
    scheduler = StepScheduler(model, cache, SchedulerConfig(token_budget=64, max_batch=4))

    async def body() -> tuple[BaseException | torch.Tensor, ...]:
        big, small = cache.open_session(64), cache.open_session(64)
        await scheduler.run(big, hidden(40, 1), 0)  # 3 of the 4 pages
        return tuple(
            await asyncio.gather(
                scheduler.run(small, hidden(20, 2), 0),  # needs 2 pages: 1 is left
                scheduler.run(big, hidden(1, 3), 40),
                return_exceptions=True,
            )
        )

    grown, decoded = serving(scheduler, body)
    assert isinstance(grown, CacheFull) and "cannot grow to 20 tokens" in str(grown)
    assert isinstance(decoded, torch.Tensor) and decoded.shape == (1, 1, 64)


def test_steps_of_a_freed_session_fail_and_gaps_are_refused() -> None:
    model = tiny_span()
    cache = model.new_cache(64)
    scheduler = StepScheduler(model, cache, SchedulerConfig(token_budget=32, max_batch=2))

    async def body() -> None:
        seq = cache.open_session(32)
        with pytest.raises(PositionGap):
            await scheduler.run(seq, hidden(1, 1), 3)
        queued = asyncio.ensure_future(scheduler.run(seq, hidden(4, 1), 0))
        await asyncio.sleep(0)
        scheduler.free(seq)
        with pytest.raises(SessionExpired):
            await queued
        assert cache.pages_free == cache.num_pages

    serving(scheduler, body)


@pytest.mark.parametrize("linger", [60.0, 0.0])
def test_a_lone_prefill_runs_in_big_chunks_and_a_decode_step_makes_them_small(
    linger: float,
) -> None:
    model = tiny_span()
    cache = model.new_cache(512)
    config = SchedulerConfig(token_budget=8, max_batch=2, prefill_chunk=32, decode_linger=linger)
    scheduler = StepScheduler(model, cache, config)
    batches: list[list[int]] = []  # each batch's segment sizes, in the order they ran
    forward_flat = model.forward_flat

    async def body() -> None:
        loop = asyncio.get_running_loop()
        second_chunk = asyncio.Event()

        def recording(x: torch.Tensor, batch: StepBatch, *args: object, **kw: object) -> object:
            batches.append(list(batch.counts))
            if len(batches) == 2:  # the prompt's second chunk: a decode step comes now
                loop.call_soon_threadsafe(second_chunk.set)
            return forward_flat(x, batch, *args, **kw)  # type: ignore[arg-type]

        decoding, prompting = cache.open_session(64), cache.open_session(256)
        await scheduler.run(decoding, hidden(3, 1), 0)  # a prefill: it does not count as decoding
        model.forward_flat = recording  # type: ignore[method-assign]

        async def decode_soon() -> None:
            await second_chunk.wait()
            await scheduler.run(decoding, hidden(1, 3), 3)

        await asyncio.gather(scheduler.run(prompting, hidden(200, 2), 0), decode_soon())

    serving(scheduler, body)
    assert batches[0] == [32] and batches[1] == [32]  # alone: big chunks
    at = next(i for i, b in enumerate(batches) if len(b) == 2)  # the decode step's batch
    assert at <= 3  # it waited for one big chunk at most
    assert batches[at][0] == 1 and sum(batches[at]) == 8
    after = [sum(b) for b in batches[at + 1 :]]
    if linger:  # the session still counts as decoding: chunks stay small to the end
        assert max(after) <= 8
    else:  # only a queued step counts: back to big chunks
        assert after[0] == 32
    assert sum(sum(b) for b in batches) == 201


@pytest.mark.parametrize("regroup_wait", [0.0, 5.0])
def test_sessions_of_one_batch_stay_together_with_a_regroup_wait(regroup_wait: float) -> None:
    """Two sessions decode beside a prefill; one comes back at once, the other a moment later
    (as after the head's pick). With a regroup wait they keep sharing batches; without it, the
    prompt's next chunk starts with the first alone and the two take turns from then on."""
    model = tiny_span()
    cache = model.new_cache(512)
    config = SchedulerConfig(token_budget=8, max_batch=4, regroup_wait=regroup_wait)
    scheduler = StepScheduler(model, cache, config)
    batches: list[list[int]] = []
    forward_flat = model.forward_flat

    def recording(x: torch.Tensor, batch: StepBatch, *args: object, **kw: object) -> object:
        batches.append(list(batch.counts))
        return forward_flat(x, batch, *args, **kw)  # type: ignore[arg-type]

    async def body() -> None:
        quick, slow, prompt = (cache.open_session(64) for _ in range(3))
        await asyncio.gather(
            *(scheduler.run(s, hidden(2, i), 0) for i, s in enumerate([quick, slow]))
        )
        model.forward_flat = recording  # type: ignore[method-assign]

        async def decode(seq: SessionCache, seed: int, delay: float) -> None:
            for n in range(4):
                await scheduler.run(seq, hidden(1, seed + n), 2 + n)
                await asyncio.sleep(delay)  # this session's "head": slower for one of the two

        await asyncio.gather(
            decode(quick, 10, 0.0), decode(slow, 20, 0.2), scheduler.run(prompt, hidden(60, 3), 0)
        )

    serving(scheduler, body)
    paired = sum(1 for b in batches if b[:2] == [1, 1])
    if regroup_wait:
        assert paired == 4  # every decode step of the two ran in the same batch
    else:
        assert paired < 4


def test_a_step_that_starts_before_the_end_replaces_what_follows_and_frees_its_pages() -> None:
    model = tiny_span()
    cache = model.new_cache(64)  # pages of 16
    scheduler = StepScheduler(model, cache, SchedulerConfig(token_budget=32, max_batch=2))
    prompt, guesses, other = hidden(10, 1), hidden(12, 2), hidden(3, 3)

    async def body() -> torch.Tensor:
        seq = cache.open_session(64)
        await scheduler.run(seq, prompt, 0)
        await scheduler.run(seq, guesses, 10)  # 22 tokens: two pages
        assert len(seq.pages) == 2
        out = await scheduler.run(seq, other, 12)  # 10 of the guesses fall
        assert seq.length == 15 and len(seq.pages) == 1
        assert scheduler.rolled_back_tokens == 10
        return out

    rolled_back = serving(scheduler, body)
    kept = torch.cat([prompt, guesses[:, :2]], dim=1)
    _, expected = alone(model, [(kept, 0), (other, 12)])
    assert (rolled_back - expected).abs().max() < 1e-5
