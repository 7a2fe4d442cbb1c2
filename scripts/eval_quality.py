"""Measure what weight quantization costs in quality: perplexity and top-1 agreement per mode.

Runs the whole model (one span of all layers, plus the client's head) over a plain-text file
in non-overlapping windows, for the unquantized model and for each quantized mode, and prints a
markdown table: perplexity, the share of positions whose top-1 next token matches the
unquantized model's, and the span's weight memory.

    python scripts/eval_quality.py [--model smollm2-135m] [--dtype bf16] [--window 512]
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from layerswarm.cli.common import default_cache_dir, resolve_model_cli
from layerswarm.routing.text import ChatTokenizer
from layerswarm.shards.blocks import ClientHead, SpanModel
from layerswarm.shards.config import ModelConfig, Span
from layerswarm.shards.quantize import memory_bytes, quantize
from layerswarm.shards.weights import load_client_head, load_span

DEFAULT_TEXT = Path(__file__).parent / "data" / "quality_text.txt"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def windows(ids: list[int], size: int) -> list[torch.Tensor]:
    """Non-overlapping `(1, size)` windows; the last may be shorter (one of 1 token is dropped)."""
    return [torch.tensor([ids[i : i + size]]) for i in range(0, len(ids), size) if len(ids) - i > 1]


@torch.inference_mode()
def score(
    span: SpanModel, head: ClientHead, chunks: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position negative log-likelihood and top-1 prediction, over all windows, flattened."""
    nll, top1 = [], []
    for ids in chunks:
        t = ids.shape[1]
        cache = span.new_cache(t)
        hidden = span(head.embed_tokens(ids), [0], cache, [cache.allocate(t)])
        logits = head.logits(hidden)[0, :-1]  # (t - 1, vocab) fp32, predicting ids[1:]
        nll.append(F.cross_entropy(logits, ids[0, 1:], reduction="none"))
        top1.append(logits.argmax(dim=-1))
    return torch.cat(nll), torch.cat(top1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="model name, folder or GGUF file")
    p.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="plain-text file to score")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="model dtype")
    p.add_argument("--window", type=int, default=512, help="tokens per scored window")
    p.add_argument("--group-size", type=int, default=128, help="int4 inputs per group")
    p.add_argument(
        "--modes", default="int8,int4,int4:32", help="quantized modes, int4:G for a group size G"
    )
    args = p.parse_args()

    model_dir = resolve_model_cli(args.model, default_cache_dir())
    config = ModelConfig.from_file(model_dir)
    dtype = DTYPES[args.dtype]
    ids = ChatTokenizer(model_dir).encode(args.text.read_text())
    chunks = windows(ids, args.window)
    head = load_client_head(model_dir, dtype, config)
    print(
        f"{model_dir.name}, {args.dtype}, {len(ids)} tokens of {args.text.name}, "
        f"windows of {args.window}, int4 group size {args.group_size} unless named\n"
    )
    print("| weights | perplexity | top-1 agreement | span weight MiB | eval s |")
    print("|---|---|---|---|---|")
    base_top1: torch.Tensor | None = None
    for mode in [args.dtype, *[m for m in args.modes.split(",") if m]]:
        span = load_span(model_dir, Span(0, config.num_layers), dtype, config)
        if mode != args.dtype:
            kind, _, group = mode.partition(":")
            quantize(span, kind, int(group or args.group_size))
        t0 = time.perf_counter()
        nll, top1 = score(span, head, chunks)
        elapsed = time.perf_counter() - t0
        base_top1 = top1 if base_top1 is None else base_top1
        agree = (top1 == base_top1).float().mean().item()
        mib = memory_bytes(span) / 2**20
        ppl = math.exp(nll.mean().item())
        print(f"| {mode} | {ppl:.3f} | {agree:.1%} | {mib:.1f} | {elapsed:.1f} |", flush=True)


if __name__ == "__main__":
    main()
