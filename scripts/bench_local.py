"""Benchmark the local engine against transformers on the same weights, in the same run.

Prefill of a 128-token prompt and greedy decode of 64 tokens at batch 1, fp32 and bf16.
Prints a table with the ratios (ours / transformers). transformers is a dev dependency:
`pip install -e .[dev]`.

    python scripts/bench_local.py [--model smollm2-135m] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from layerswarm.cli.common import default_cache_dir, resolve_model_cli
from layerswarm.kernels.cpu_linear import pack_linears
from layerswarm.routing.local import LocalPipeline
from layerswarm.shards.config import ModelConfig, Span
from layerswarm.shards.weights import load_client_head, load_span

PROMPT_TOKENS = 128
NEW_TOKENS = 64


def bench_ours(model_dir: Path, dtype: torch.dtype, ids: torch.Tensor) -> tuple[float, float]:
    config = ModelConfig.from_file(model_dir)
    head = pack_linears(load_client_head(model_dir, dtype, config))
    span = pack_linears(load_span(model_dir, Span(0, config.num_layers), dtype, config))
    pipe = LocalPipeline(span, PROMPT_TOKENS + NEW_TOKENS)
    t0 = time.perf_counter()
    logits = head.logits(pipe.forward(head.embed_tokens(ids), 0)[:, -1:])
    t1 = time.perf_counter()
    token = logits[0, 0].argmax()
    for i in range(NEW_TOKENS):
        h = pipe.forward(head.embed_tokens(token.view(1, 1)), PROMPT_TOKENS + i)
        token = head.logits(h)[0, 0].argmax()
    t2 = time.perf_counter()
    pipe.close()
    return t1 - t0, NEW_TOKENS / (t2 - t1)


def bench_transformers(
    model_dir: Path, dtype: torch.dtype, ids: torch.Tensor
) -> tuple[float, float]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    with torch.inference_mode():
        t0 = time.perf_counter()
        model(ids)
        t1 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
        t2 = time.perf_counter()
        model.generate(
            ids, max_new_tokens=NEW_TOKENS + 1, min_new_tokens=NEW_TOKENS + 1, do_sample=False
        )
        t3 = time.perf_counter()
    # Decode rate: the full generate minus a generate of one token (its prefill and set-up).
    return t1 - t0, NEW_TOKENS / ((t3 - t2) - (t2 - t1))


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
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        cells = {}
        for engine, fn in (("layerswarm", bench_ours), ("transformers", bench_transformers)):
            runs = [fn(model_dir, dtype, ids) for _ in range(args.repeats)]
            cells[engine] = (
                statistics.median(r[0] for r in runs),
                statistics.median(r[1] for r in runs),
            )
        ours, ref = cells["layerswarm"], cells["transformers"]
        rows.append((name, ours, ref))
    print(
        f"\nSmolLM2 local engine vs transformers, {torch.get_num_threads()} threads, "
        f"prompt {PROMPT_TOKENS} tokens, decode {NEW_TOKENS} tokens, median of {args.repeats}\n"
    )
    print(
        "| dtype | prefill ms (ours) | prefill ms (transformers) | prefill speed-up "
        "| decode tok/s (ours) | decode tok/s (transformers) | decode speed-up |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, ours, ref in rows:
        print(
            f"| {name} | {ours[0] * 1e3:.0f} | {ref[0] * 1e3:.0f} | {ref[0] / ours[0]:.2f}x "
            f"| {ours[1]:.1f} | {ref[1]:.1f} | {ours[1] / ref[1]:.2f}x |"
        )


if __name__ == "__main__":
    main()
