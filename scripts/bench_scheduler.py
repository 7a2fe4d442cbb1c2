"""Measure the scheduler's token budget: a mixed step's time against a decode-only step's.

Four sessions decode (200 tokens of context each) beside a chunk of a 2,000-token prompt (at
1,000 tokens in): the step time is the gap between a decoding session's tokens while the prompt
prefills, and `chunk / step` the prefill's speed. Budgets are interleaved round by round, so a
noisy machine slows each alike; medians of the rounds.

    .venv/bin/python scripts/bench_scheduler.py [model] [budgets...]
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

from layerswarm.kernels.cpu_linear import pack_linears
from layerswarm.shards.blocks import StepBatch
from layerswarm.shards.config import ModelConfig, Span
from layerswarm.shards.registry import resolve_model
from layerswarm.shards.weights import load_span

DECODERS = 4
CONTEXT = 200
PREFILLED = 1000
ROUNDS = 7


def main() -> None:
    name = sys.argv[1] if len(sys.argv) > 1 else "smollm2-135m"
    budgets = [0] + ([int(b) for b in sys.argv[2:]] or [16, 32, 64, 128, 256])
    model_dir = resolve_model(name, Path.home() / ".cache" / "layerswarm")
    config = ModelConfig.from_file(model_dir)
    model = pack_linears(load_span(model_dir, Span(0, config.num_layers), torch.float32, config))
    d = config.hidden_size
    cache = model.new_cache(DECODERS * 400 + 2100 + 64)
    decoding = [cache.open_session(400) for _ in range(DECODERS)]
    for s in decoding:
        model.forward_flat(torch.randn(CONTEXT, d), StepBatch([0], [CONTEXT], [s]), cache)
    prompt = cache.open_session(2100)
    model.forward_flat(torch.randn(PREFILLED, d), StepBatch([0], [PREFILLED], [prompt]), cache)
    times: dict[int, list[float]] = {b: [] for b in budgets}
    for _ in range(ROUNDS):
        for b in budgets:
            n = max(b - DECODERS, 0)
            extra = ([PREFILLED], [n], [prompt]) if n else ([], [], [])
            batch = StepBatch(
                [CONTEXT] * DECODERS + extra[0], [1] * DECODERS + extra[1], decoding + extra[2]
            )
            x = torch.randn(DECODERS + n, d)
            t0 = time.perf_counter()
            model.forward_flat(x, batch, cache)
            times[b].append(time.perf_counter() - t0)
    base = statistics.median(times[0])
    print(f"{name}, {config.num_layers} layers, fp32, {torch.get_num_threads()} threads")
    for b in budgets[1:]:
        t = statistics.median(times[b])
        print(
            f"budget {b:4d}: step {t * 1e3:5.0f} ms ({t / base:.1f}x the {base * 1e3:.0f} ms of "
            f"decode alone), prefill {(b - DECODERS) / t:4.0f} tok/s"
        )


if __name__ == "__main__":
    main()
