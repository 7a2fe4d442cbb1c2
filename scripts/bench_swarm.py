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
from benchlib import run_self

from layerswarm.cli.common import default_cache_dir, resolve_model_cli
from layerswarm.peer.launch import even_spans, start_peers
from layerswarm.routing.generate import Generator
from layerswarm.routing.local import open_local_generator
from layerswarm.routing.sampling import SamplingConfig
from layerswarm.routing.swarm_client import open_swarm_generator
from layerswarm.shards.config import ModelConfig

# What the peers use (layerswarm/cli/peer.py): spin briefly, then sleep.
SPIN_ENV = {"GOMP_SPINCOUNT": "20000"}
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


def child(args: argparse.Namespace) -> None:
    """Measure one setup in this process and print `prefill decode` on the last line."""
    model_dir = resolve_model_cli(args.model, default_cache_dir())
    prompt = torch.randint(
        1000, 20000, (PROMPT_TOKENS,), generator=torch.Generator().manual_seed(0)
    )
    if args.child == "local":
        gen = open_local_generator(model_dir)
    else:
        gen = open_swarm_generator(model_dir, args.peer, args.child == "plaintext")
    # Random prompt tokens make SmolLM2 emit EOS after ~20 tokens; every setup decodes exactly
    # NEW_TOKENS instead, so that each decode rate is taken over the same 63 steps.
    gen.tokenizer.eos_ids = frozenset()
    prefill, decode = measure(gen, prompt.tolist(), args.repeats)
    print(f"{prefill} {decode}")


def run_child(
    args: argparse.Namespace, mode: str, peers: list[str], brief_spin: bool
) -> tuple[float, float]:
    argv = ["--child", mode, "--model", args.model, "--repeats", str(args.repeats)]
    argv += [f"--peer={p}" for p in peers]
    out = run_self(argv, SPIN_ENV if brief_spin else None, check=True).stdout
    prefill, decode = out.strip().splitlines()[-1].split()
    return float(prefill), float(decode)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--insecure-plaintext", action="store_true", help="also measure without TLS")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--peer", action="append", default=[], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    model_dir = resolve_model_cli(args.model, default_cache_dir())
    num_layers = ModelConfig.from_file(model_dir).num_layers
    rows = [("local engine", *run_child(args, "local", [], brief_spin=False))]
    modes = ["tls", "plaintext"] if args.insecure_plaintext else ["tls"]
    with tempfile.TemporaryDirectory() as tmp:
        for n in (2, 3):
            for mode in modes:
                extra = ["--insecure-plaintext"] if mode == "plaintext" else []
                with start_peers(model_dir, even_spans(num_layers, n), Path(tmp), extra) as swarm:
                    # The client waits on its peers: on one shared machine its OpenMP threads
                    # must not spin long meanwhile (on a laptop of its own it would not matter).
                    result = run_child(args, mode, swarm.addresses, brief_spin=True)
                    rows.append(
                        (f"{n} peers, {'plaintext' if mode == 'plaintext' else 'TLS'}", *result)
                    )
    local_decode = rows[0][2]
    print(
        f"\nSmolLM2 fp32, prompt {PROMPT_TOKENS} tokens, {NEW_TOKENS} new tokens, "
        f"median of {args.repeats}, peers on loopback, every process on this machine\n"
    )
    print("| setup | prefill ms | decode tok/s | decode vs local |")
    print("|---|---|---|---|")
    for name, prefill, decode in rows:
        print(f"| {name} | {prefill * 1e3:.0f} | {decode:.1f} | {decode / local_decode:.2f}x |")


if __name__ == "__main__":
    main()
