"""Benchmark the local engine against transformers on the same weights, in the same run.

Prefill of a 128-token prompt and greedy decode of 64 tokens at batch 1, fp32 and bf16, for a
model of any supported family (a name, a folder, a .gguf file or ORG/NAME). The two engines
take turns (A B A B ...), so a noisy machine slows both alike; the table shows medians and the
decode spread (min-max). Decode is timed twice: by the wall clock and by the process's CPU time,
which leaves out the time other processes held the cores (on a shared machine the wall-clock
rate moves with their load, the CPU-time rate much less; with more than one torch thread, CPU
time counts every thread's work, so it is only a rate of work then). Both engines run with the
heap frozen after loading (`gc.freeze`), as `swarm-peer` and `swarm-chat` run, and with
`swarm-peer`'s `GOMP_SPINCOUNT`. transformers is a dev dependency: `pip install -e .[dev]`.

    python scripts/bench_local.py [--model smollm2-135m] [--repeats 3]
    python scripts/make_synthetic_moe.py && \
        python scripts/bench_local.py --model ~/.cache/layerswarm/models/synthetic-moe
"""

from __future__ import annotations

import os

# OpenMP threads spin only briefly after a parallel region: what `swarm-peer` runs with (set
# before torch loads OpenMP; both engines run under it).
os.environ.setdefault("GOMP_SPINCOUNT", "20000")

import argparse
import gc
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from benchlib import value_range

from layerswarm.cli.common import default_cache_dir, resolve_model_cli
from layerswarm.kernels.cpu_linear import pack_linears
from layerswarm.shards.config import ModelConfig, Span
from layerswarm.shards.weights import freeze_heap, load_client_head, load_span

PROMPT_TOKENS = 128
NEW_TOKENS = 64


Run = tuple[float, float, float]  # prefill seconds, decode tok/s by wall clock, by CPU time


@contextmanager
def frozen_heap() -> Iterator[None]:
    """The loaded model out of the collector's sight while timed, as a peer runs (see
    `freeze_heap`); collectable again after, so the next run's load does not add to it."""
    freeze_heap()
    try:
        yield
    finally:
        gc.unfreeze()


def bench_ours(model_dir: Path, dtype: torch.dtype, ids: torch.Tensor) -> Run:
    config = ModelConfig.from_file(model_dir)
    head = pack_linears(load_client_head(model_dir, dtype, config))
    span = pack_linears(load_span(model_dir, Span(0, config.num_layers), dtype, config))
    # The span's math as a peer runs it (one session; the scheduler's thread hops left out).
    cache = span.new_cache(PROMPT_TOKENS + NEW_TOKENS)
    seq = cache.open_session(PROMPT_TOKENS + NEW_TOKENS)
    with frozen_heap():
        t0 = time.perf_counter()
        logits = head.logits(span(head.embed_tokens(ids), [0], cache, [seq])[:, -1:])
        t1 = time.perf_counter()
        token = logits[0, 0].argmax()
        c1 = time.process_time()
        for i in range(NEW_TOKENS):
            h = span(head.embed_tokens(token.view(1, 1)), [PROMPT_TOKENS + i], cache, [seq])
            token = head.logits(h)[0, 0].argmax()
        t2, c2 = time.perf_counter(), time.process_time()
    return t1 - t0, NEW_TOKENS / (t2 - t1), NEW_TOKENS / (c2 - c1)


def bench_transformers(model_dir: Path, dtype: torch.dtype, ids: torch.Tensor) -> Run:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    with torch.inference_mode(), frozen_heap():
        t0 = time.perf_counter()
        model(ids)
        t1, c1 = time.perf_counter(), time.process_time()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
        t2, c2 = time.perf_counter(), time.process_time()
        model.generate(
            ids, max_new_tokens=NEW_TOKENS + 1, min_new_tokens=NEW_TOKENS + 1, do_sample=False
        )
        t3, c3 = time.perf_counter(), time.process_time()
    # Decode rate: the full generate minus a generate of one token (its prefill and set-up).
    return t1 - t0, NEW_TOKENS / ((t3 - t2) - (t2 - t1)), NEW_TOKENS / ((c3 - c2) - (c2 - c1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--repeats", type=int, default=3, help="runs per cell; the median is shown")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = resolve_model_cli(args.model, default_cache_dir())
    config = ModelConfig.from_file(model_dir)
    ids = torch.randint(
        100, config.vocab_size, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(0)
    )
    rows = []
    engines = (("layerswarm", bench_ours), ("transformers", bench_transformers))
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        runs: dict[str, list[Run]] = {engine: [] for engine, _ in engines}
        for _ in range(args.repeats):  # interleaved: A B A B
            for engine, fn in engines:
                runs[engine].append(fn(model_dir, dtype, ids))
        rows.append((name, runs["layerswarm"], runs["transformers"]))
    experts = (
        f", {config.moe.num_experts} experts top-{config.moe.experts_per_token}"
        if config.moe
        else ""
    )
    print(
        f"\n{model_dir.name} ({config.architecture}, {config.num_layers} layers{experts}): local "
        f"engine vs transformers, {torch.get_num_threads()} threads, prompt {PROMPT_TOKENS} "
        f"tokens, decode {NEW_TOKENS} tokens, median of {args.repeats} (decode min-max)\n"
    )
    print(
        "| dtype | prefill ms (ours) | prefill ms (transformers) | prefill speed-up "
        "| decode tok/s (ours) | decode tok/s (transformers) | decode speed-up "
        "| by CPU time: ours | transformers | speed-up |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, ours, ref in rows:
        p_ours, p_ref = (statistics.median(r[0] for r in x) for x in (ours, ref))
        cells = [f"| {name} | {p_ours * 1e3:.0f} | {p_ref * 1e3:.0f} | {p_ref / p_ours:.2f}x "]
        for k in (1, 2):  # decode by wall clock, by CPU time
            d_ours, d_ref = (statistics.median(r[k] for r in x) for x in (ours, ref))
            cells.append(
                f"| {d_ours:.1f} ({_spread(ours, k)}) | {d_ref:.1f} ({_spread(ref, k)}) "
                f"| {d_ours / d_ref:.2f}x "
            )
        print("".join(cells) + "|")


def _spread(runs: list[Run], k: int) -> str:
    return value_range([r[k] for r in runs], ".1f")


if __name__ == "__main__":
    main()
