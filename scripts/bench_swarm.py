"""Benchmark generation through local swarms against the local engine, in the same run.

Decode tok/s (batch 1, greedy) and prefill time of a 128-token prompt, for the local engine and
swarms of 2 and 3 peer processes on loopback, with each one's ratio to local.

    python scripts/bench_swarm.py [--model smollm2-135m] [--repeats 3] [--insecure-plaintext]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

from layerswarm.cli.common import default_cache_dir, resolve_model_cli
from layerswarm.peer.launch import even_spans, start_peers
from layerswarm.routing.generate import Generator
from layerswarm.routing.local import open_local_generator
from layerswarm.routing.sampling import SamplingConfig
from layerswarm.routing.swarm_client import open_swarm_generator
from layerswarm.shards.config import ModelConfig

PROMPT_TOKENS = 128
NEW_TOKENS = 64


def measure(gen: Generator, prompt: list[int], repeats: int) -> tuple[float, float]:
    """Median prefill seconds and decode tok/s over `repeats` greedy replies."""
    cfg = SamplingConfig(max_new_tokens=NEW_TOKENS, temperature=0.0)
    prefill, decode = [], []
    for _ in range(repeats):
        for _token in gen.tokens(prompt, cfg):
            pass
        prefill.append(gen.last_stats.prefill_seconds)
        decode.append(gen.last_stats.decode_tokens_per_second)
    return statistics.median(prefill), statistics.median(decode)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--insecure-plaintext", action="store_true", help="also measure without TLS")
    args = ap.parse_args()
    model_dir = resolve_model_cli(args.model, default_cache_dir())
    num_layers = ModelConfig.from_file(model_dir).num_layers
    gen = torch.Generator().manual_seed(0)
    # Token ids from the middle of the vocabulary, and no EOS: every run decodes NEW_TOKENS.
    prompt = torch.randint(1000, 20000, (PROMPT_TOKENS,), generator=gen).tolist()
    rows = [("local engine", *measure(open_local_generator(model_dir), prompt, args.repeats))]
    modes = [False, True] if args.insecure_plaintext else [False]
    with tempfile.TemporaryDirectory() as tmp:
        for n in (2, 3):
            for plain in modes:
                extra = ["--insecure-plaintext"] if plain else []
                with start_peers(model_dir, even_spans(num_layers, n), Path(tmp), extra) as swarm:
                    client = open_swarm_generator(model_dir, swarm.addresses, plain)
                    name = f"{n} peers, {'plaintext' if plain else 'TLS'}"
                    rows.append((name, *measure(client, prompt, args.repeats)))
    local_decode = rows[0][2]
    print(
        f"\nSmolLM2 fp32, prompt {PROMPT_TOKENS} tokens, {NEW_TOKENS} new tokens, "
        f"median of {args.repeats}, peers on loopback\n"
    )
    print("| setup | prefill ms | decode tok/s | decode vs local |")
    print("|---|---|---|---|")
    for name, prefill, decode in rows:
        print(f"| {name} | {prefill * 1e3:.0f} | {decode:.1f} | {decode / local_decode:.2f}x |")


if __name__ == "__main__":
    main()
