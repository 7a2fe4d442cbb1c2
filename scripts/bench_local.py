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

    python scripts/bench_local.py [--model smollm2-135m] [--repeats 3] [--quant int8,int4]
        [--plans default,tuned,one-bag]

    python scripts/make_synthetic_moe.py && \
        python scripts/bench_local.py --model ~/.cache/layerswarm/models/synthetic-moe

`--plans` names the CPU linear plans our engine runs with, each a row of its own, interleaved
with the others: `default` (`cpu_linear.default_plan`, the fixed rule), `tuned` (chosen by
timing at load, `kernels.cpu_tuning.Tuner`, kept in the cache folder: the first run times),
`one-bag` (the last round's one-thread bag GEMVs, for comparison). `--quant` adds rows of our
engine with int8/int4 weights (bf16 and fp32 activations; transformers has no such row). Every
row's greedy tokens are checked against transformers' (fp32/bf16) or against our own unquantized
tokens (int8/int4) and the number that agree is shown beside the times.
"""

from __future__ import annotations

import os

# OpenMP threads spin only briefly after a parallel region: what `swarm-peer` runs with (set
# before torch loads OpenMP; both engines run under it).
os.environ.setdefault("GOMP_SPINCOUNT", "20000")

import argparse
import functools
import gc
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from benchlib import value_range

from layerswarm.cli.common import default_cache_dir, resolve_model_cli
from layerswarm.kernels.cpu_linear import Chooser, LinearPlan, default_plan, pack_linears
from layerswarm.kernels.cpu_tuning import Tuner, TuningConfig
from layerswarm.shards.config import ModelConfig, Span
from layerswarm.shards.quantize import quantize
from layerswarm.shards.weights import freeze_heap, load_client_head, load_span

PROMPT_TOKENS = 128
NEW_TOKENS = 64


# prefill seconds, decode tok/s by wall clock, by CPU time, the greedy tokens
Run = tuple[float, float, float, list[int]]


@contextmanager
def frozen_heap() -> Iterator[None]:
    """The loaded model out of the collector's sight while timed, as a peer runs (see
    `freeze_heap`); collectable again after, so the next run's load does not add to it."""
    freeze_heap()
    try:
        yield
    finally:
        gc.unfreeze()


def one_bag(weights: Sequence[torch.Tensor], has_bias: bool) -> LinearPlan:
    """The last round's plan: `default_plan` with one block a bag (one thread a GEMV)."""
    plan = default_plan(weights, has_bias)
    return LinearPlan(plan.layout, tuple(1 for _ in plan.bags))


def bench_ours(
    model_dir: Path, dtype: torch.dtype, ids: torch.Tensor, choose: Chooser, quant: str | None
) -> Run:
    config = ModelConfig.from_file(model_dir)
    head = pack_linears(load_client_head(model_dir, dtype, config), choose)
    span = load_span(model_dir, Span(0, config.num_layers), dtype, config)
    if quant:
        quantize(span, quant)  # type: ignore[arg-type]
    span = pack_linears(span, choose)
    # The span's math as a peer runs it (one session; the scheduler's thread hops left out).
    cache = span.new_cache(PROMPT_TOKENS + NEW_TOKENS)
    seq = cache.open_session(PROMPT_TOKENS + NEW_TOKENS)
    tokens = []
    with frozen_heap():
        t0 = time.perf_counter()
        logits = head.logits(span(head.embed_tokens(ids), [0], cache, [seq])[:, -1:])
        t1 = time.perf_counter()
        token = logits[0, 0].argmax()
        c1 = time.process_time()
        for i in range(NEW_TOKENS):
            tokens.append(token)
            h = span(head.embed_tokens(token.view(1, 1)), [PROMPT_TOKENS + i], cache, [seq])
            token = head.logits(h)[0, 0].argmax()
        t2, c2 = time.perf_counter(), time.process_time()
    return t1 - t0, NEW_TOKENS / (t2 - t1), NEW_TOKENS / (c2 - c1), [int(t) for t in tokens]


def bench_transformers(model_dir: Path, dtype: torch.dtype, ids: torch.Tensor) -> Run:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    with torch.inference_mode(), frozen_heap():
        t0 = time.perf_counter()
        model(ids)
        t1, c1 = time.perf_counter(), time.process_time()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
        t2, c2 = time.perf_counter(), time.process_time()
        out = model.generate(
            ids, max_new_tokens=NEW_TOKENS + 1, min_new_tokens=NEW_TOKENS + 1, do_sample=False
        )
        t3, c3 = time.perf_counter(), time.process_time()
    # Decode rate: the full generate minus a generate of one token (its prefill and set-up).
    tokens = out[0, ids.shape[1] : ids.shape[1] + NEW_TOKENS].tolist()
    decode_wall, decode_cpu = (t3 - t2) - (t2 - t1), (c3 - c2) - (c2 - c1)
    return t1 - t0, NEW_TOKENS / decode_wall, NEW_TOKENS / decode_cpu, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--repeats", type=int, default=3, help="runs per cell; the median is shown")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16")
    ap.add_argument("--plans", default="tuned", help="comma-separated: default, tuned, one-bag")
    ap.add_argument("--quant", default="", help="comma-separated: int8, int4 (rows of ours)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = resolve_model_cli(args.model, default_cache_dir())
    config = ModelConfig.from_file(model_dir)
    ids = torch.randint(
        100, config.vocab_size, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(0)
    )
    tuner = Tuner(TuningConfig(cache_dir=default_cache_dir()))
    plans: dict[str, Chooser] = {"default": default_plan, "tuned": tuner, "one-bag": one_bag}
    engines: list[tuple[str, Callable[[Path, torch.dtype, torch.Tensor], Run]]] = []
    for plan in args.plans.split(","):
        for quant in [None, *filter(None, args.quant.split(","))]:
            name = f"ours {plan}" + (f" {quant}" if quant else "")
            engines.append((name, functools.partial(bench_ours, choose=plans[plan], quant=quant)))
    engines.append(("transformers", bench_transformers))
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    table: list[tuple[str, str, list[Run], list[Run]]] = []
    for dname in args.dtypes.split(","):
        runs: dict[str, list[Run]] = {engine: [] for engine, _ in engines}
        for _ in range(args.repeats):  # interleaved: A B A B
            for engine, fn in engines:
                runs[engine].append(run := fn(model_dir, dtypes[dname], ids))
                print(f"{dname} {engine}: decode {run[1]:.1f} tok/s", file=sys.stderr, flush=True)
        ref = runs["transformers"]
        for engine, _ in engines:
            table.append((dname, engine, runs[engine], ref))
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
    if tuner.chosen:
        print("tuned plans: " + "; ".join(tuner.report()) + "\n")
    print(
        "| dtype | engine | prefill ms | decode tok/s | vs transformers "
        "| by CPU time | vs transformers | tokens as reference |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for dname, engine, runs_, ref in table:
        cells = [f"| {dname} | {engine} | {statistics.median(r[0] for r in runs_) * 1e3:.0f} "]
        for k in (1, 2):  # decode by wall clock, by CPU time
            d_ours, d_ref = (statistics.median(_rate(r, k) for r in x) for x in (runs_, ref))
            cells.append(f"| {d_ours:.1f} ({_spread(runs_, k)}) | {d_ours / d_ref:.2f}x ")
        cells.append(f"| {_agreement(engine, runs_, table, dname)} |")
        print("".join(cells))


def _agreement(
    engine: str, runs: list[Run], table: list[tuple[str, str, list[Run], list[Run]]], dname: str
) -> str:
    """How many of the first run's tokens match the reference's before the first difference:
    transformers' for unquantized rows, our unquantized row's (same plan) for int8/int4."""
    quantized = engine.endswith(("int8", "int4"))
    want = engine.rsplit(" ", 1)[0] if quantized else "transformers"
    ref = next(r for d, e, r, _ in table if d == dname and e == want)
    same = 0
    for a, b in zip(runs[0][3], ref[0][3], strict=True):
        if a != b:
            break
        same += 1
    stable = all(r[3] == runs[0][3] for r in runs)  # every repeat gave the same tokens
    return f"{same}/{NEW_TOKENS}" + ("" if stable else " (repeats differ)")


def _rate(run: Run, k: int) -> float:
    """Decode tok/s of a run: by wall clock (k = 1) or by CPU time (k = 2)."""
    return run[1] if k == 1 else run[2]


def _spread(runs: list[Run], k: int) -> str:
    return value_range([_rate(r, k) for r in runs], ".1f")


if __name__ == "__main__":
    main()
