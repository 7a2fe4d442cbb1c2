"""Measure the scheduler's two sizes: the token budget while sessions decode, and the prefill
chunk when none does.

Budget: four sessions decode (200 tokens of context each) beside a chunk of a 2,000-token prompt
(at 1,000 tokens in): the step time is the gap between a decoding session's tokens while the
prompt prefills, and `chunk / step` the prefill's speed.

Prefill chunk: one 2,000-token prompt alone, in chunks of each size: its speed, and the time of
its last (slowest) chunk. A decode step that arrives just as such a chunk starts waits for it,
then runs beside the next small chunk: `pause = last chunk + budget-32 step`, the longest gap a
decoder sees, set against the budget-32 step (its median gap while a prompt prefills).

Sizes are interleaved round by round, so a noisy machine slows each alike; medians of the rounds,
with [min..max] of the rounds.

    .venv/bin/python scripts/bench_scheduler.py [model] [--rounds N] [--dtype float32]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import benchlib
import torch

from layerswarm.kernels.cpu_linear import pack_linears
from layerswarm.shards.blocks import SpanModel, StepBatch
from layerswarm.shards.config import ModelConfig, Span
from layerswarm.shards.kv_cache import PagedKVCache, SessionCache
from layerswarm.shards.registry import resolve_model
from layerswarm.shards.weights import load_span

DECODERS = 4
CONTEXT = 200
PREFILLED = 1000
PROMPT = 2000
BUDGETS = [0, 16, 32, 64]  # 0: decode steps alone
CHUNKS = [32, 128, 256, 512, 1024, 2000]
PAUSE_BUDGET = 32


def mixed_step(
    model: SpanModel,
    cache: PagedKVCache,
    decoding: list[SessionCache],
    prompt: SessionCache,
    b: int,
) -> float:
    d = model.config.hidden_size
    n = max(b - DECODERS, 0)
    extra = ([PREFILLED], [n], [prompt]) if n else ([], [], [])
    batch = StepBatch(
        [CONTEXT] * DECODERS + extra[0], [1] * DECODERS + extra[1], decoding + extra[2]
    )
    x = torch.randn(DECODERS + n, d, dtype=next(model.parameters()).dtype)
    t0 = time.perf_counter()
    model.forward_flat(x, batch, cache)
    return time.perf_counter() - t0


def lone_prefill(model: SpanModel, cache: PagedKVCache, chunk: int) -> tuple[float, float]:
    """A whole prompt in chunks of `chunk`: (total s, last chunk's s)."""
    d = model.config.hidden_size
    seq = cache.open_session(PROMPT)
    x = torch.randn(PROMPT, d, dtype=next(model.parameters()).dtype)
    total = last = 0.0
    for at in range(0, PROMPT, chunk):
        n = min(chunk, PROMPT - at)
        t0 = time.perf_counter()
        model.forward_flat(x[at : at + n], StepBatch([at], [n], [seq]), cache)
        last = time.perf_counter() - t0
        total += last
    cache.free(seq)
    return total, last


def spread(values: list[float], scale: float = 1.0) -> str:
    return benchlib.spread(values, "4.0f", scale, brackets="[]", alone=False)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", nargs="?", default="smollm2-135m")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--chunks", type=int, nargs="*", default=CHUNKS)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    model_dir = resolve_model(args.model, Path.home() / ".cache" / "layerswarm")
    config = ModelConfig.from_file(model_dir)
    model = pack_linears(load_span(model_dir, Span(0, config.num_layers), dtype, config))
    d = config.hidden_size
    cache = model.new_cache(DECODERS * 400 + 2100 + PROMPT + 64)
    decoding = [cache.open_session(400) for _ in range(DECODERS)]
    for s in decoding:
        model.forward_flat(
            torch.randn(CONTEXT, d, dtype=dtype), StepBatch([0], [CONTEXT], [s]), cache
        )
    prompt = cache.open_session(2100)
    model.forward_flat(
        torch.randn(PREFILLED, d, dtype=dtype), StepBatch([0], [PREFILLED], [prompt]), cache
    )
    steps: dict[int, list[float]] = {b: [] for b in BUDGETS}
    prefills: dict[int, list[tuple[float, float]]] = {c: [] for c in args.chunks}
    for r in range(args.rounds):
        for b in BUDGETS:
            steps[b].append(
                statistics.median(mixed_step(model, cache, decoding, prompt, b) for _ in range(3))
            )
        for c in args.chunks if r % 2 == 0 else args.chunks[::-1]:
            prefills[c].append(lone_prefill(model, cache, c))
    base = statistics.median(steps[0])
    print(
        f"{args.model}, {config.num_layers} layers, {args.dtype}, {torch.get_num_threads()} "
        f"threads, {args.rounds} rounds: median [min..max]"
    )
    for b in BUDGETS[1:]:
        t = steps[b]
        print(
            f"budget {b:4d}: step {spread(t, 1e3)} ms ({statistics.median(t) / base:.1f}x the "
            f"{base * 1e3:.0f} ms of decode alone), prefill "
            f"{spread([(b - DECODERS) / x for x in t])} tok/s"
        )
    gap = statistics.median(steps[PAUSE_BUDGET])
    for c in args.chunks:
        tot = [p[0] for p in prefills[c]]
        pause = [p[1] + gap for p in prefills[c]]
        print(
            f"chunk {c:5d}: lone prefill {spread([PROMPT / t for t in tot])} tok/s, last chunk "
            f"{spread([p[1] for p in prefills[c]], 1e3)} ms, pause {spread(pause, 1e3)} ms "
            f"({statistics.median(pause) / gap:.1f}x the budget-{PAUSE_BUDGET} gap)"
        )


if __name__ == "__main__":
    main()
