"""Measure the scheduler's token budget: decode gaps beside a chunked prefill, and its speed.

Four sessions decode (each with a 200-token context) while one 2,000-token prompt prefills in
chunks of the budget. For each budget this prints the median gap between a decoding session's
tokens while the prefill runs, against the median gap without it, and the prefill's tokens/s.

    .venv/bin/python scripts/bench_scheduler.py [model] [budgets...]
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
import sys
import time
from pathlib import Path

import torch

from layerswarm.kernels.cpu_linear import pack_linears
from layerswarm.shards.blocks import SpanModel
from layerswarm.shards.config import ModelConfig, Span
from layerswarm.shards.registry import resolve_model
from layerswarm.shards.scheduler import SchedulerConfig, StepScheduler
from layerswarm.shards.weights import load_span

DECODERS = 4
CONTEXT = 200
PROMPT = 2000


async def one_budget(model: SpanModel, budget: int) -> tuple[float, float, float]:
    cache = model.new_cache(DECODERS * 400 + PROMPT + 64)
    scheduler = StepScheduler(model, cache, SchedulerConfig(token_budget=budget, max_batch=16))
    loop = asyncio.create_task(scheduler.serve())
    d = model.config.hidden_size
    seqs = [cache.open_session(CONTEXT + 400) for _ in range(DECODERS)]
    for s in seqs:
        await scheduler.run(s, torch.randn(1, CONTEXT, d), 0)
    stamps: list[list[float]] = [[] for _ in seqs]
    prefill_span: list[float] = []
    stop = False

    async def decode(i: int) -> None:
        pos = CONTEXT
        while not stop:
            await scheduler.run(seqs[i], torch.randn(1, 1, d), pos)
            stamps[i].append(time.perf_counter())
            pos += 1

    async def prefill() -> None:
        await asyncio.sleep(1.0)  # decode-only gaps first
        t0 = time.perf_counter()
        await scheduler.run(cache.open_session(PROMPT), torch.randn(1, PROMPT, d), 0)
        prefill_span.extend((t0, time.perf_counter()))

    tasks = [asyncio.create_task(decode(i)) for i in range(DECODERS)]
    await prefill()
    await asyncio.sleep(0.5)
    stop = True
    await asyncio.gather(*tasks)
    loop.cancel()
    scheduler.close()
    t0, t1 = prefill_span
    alone, beside = [], []
    for s in stamps:
        for a, b in itertools.pairwise(s):
            (beside if t0 < b <= t1 else alone if b <= t0 else []).append(b - a)
    return statistics.median(alone), statistics.median(beside), PROMPT / (t1 - t0)


def main() -> None:
    name = sys.argv[1] if len(sys.argv) > 1 else "smollm2-135m"
    budgets = [int(b) for b in sys.argv[2:]] or [32, 64, 128, 256, 512]
    model_dir = resolve_model(name, Path.home() / ".cache" / "layerswarm")
    config = ModelConfig.from_file(model_dir)
    model = pack_linears(load_span(model_dir, Span(0, config.num_layers), torch.float32, config))
    print(f"{name}, {config.num_layers} layers, fp32, {torch.get_num_threads()} threads")
    for budget in budgets:
        alone, beside, rate = asyncio.run(one_budget(model, budget))
        print(
            f"budget {budget:4d}: decode gap {beside * 1e3:6.0f} ms beside the prefill "
            f"({beside / alone:.1f}x the {alone * 1e3:.0f} ms alone), prefill {rate:5.0f} tok/s"
        )


if __name__ == "__main__":
    main()
