"""Benchmark output verification: honest replicas' differences, overhead, and detection.

Three tables:

1. `tolerance`: how far two honest computations of the same step differ (SmolLM2-135M, all 30
   layers, in this process): a session fed one token at a time against a shadow fed the same
   context in one chunk, as a verifier's shadow session is. The largest relative error per
   dtype, against the tolerance the client allows (`verify.tolerance`).
2. `overhead`: greedy decode tok/s through 3 replicas of SmolLM2 (peer processes on loopback)
   with 0%, 2% and 10% of steps checked, interleaved (A B C A B C ...), median and spread.
3. `detection`: steps until a liar is caught and banned, with the liar as the session's hop and
   2 honest replicas (tiny random model: its steps are fast), at corruption rates of 1% and 10%
   and the default check rate of 2%; beside it, the median of the geometric wait after the 2
   first steps (always checked): `2 + ln 2 / (check * corrupt)`, and its mean `2 + 1 / (...)`.

    python scripts/bench_verify.py [--tables tolerance overhead detection] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import benchlib
import torch

from layerswarm.cli.common import default_cache_dir, resolve_model_cli
from layerswarm.peer.launch import PeerProcess, start_peer, start_peers
from layerswarm.routing.loop import BackgroundLoop
from layerswarm.routing.sampling import SamplingConfig
from layerswarm.routing.session import RemoteSession
from layerswarm.routing.swarm_client import ClientConfig, SwarmClient, open_swarm_generator
from layerswarm.routing.verify import relative_error, tolerance
from layerswarm.shards.config import ModelConfig, Span
from layerswarm.shards.weights import load_span

STORY = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]


def spread(values: list[float]) -> str:
    return benchlib.spread(values, ".3g", alone=False)


# --- 1. tolerance ------------------------------------------------------------------------------


def bench_tolerance(model_dir: Path) -> None:
    from layerswarm.routing.local import LocalEngine, LocalPipeline

    config = ModelConfig.from_file(model_dir)
    print("\n| dtype | largest relative error, honest replicas | tolerance |")
    print("|---|---|---|")
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        model = load_span(model_dir, Span(0, config.num_layers), dtype, config)
        net = BackgroundLoop()
        engine = LocalEngine(model, 64 * 2**20, ThreadPoolExecutor(1), net)
        gen = torch.Generator().manual_seed(0)
        inputs = [torch.randn(1, 32, config.hidden_size, generator=gen)]
        inputs += [torch.randn(1, 1, config.hidden_size, generator=gen) for _ in range(40)]
        inputs = [x.to(dtype) for x in inputs]
        worst = 0.0
        for check_at in (8, 20, 40):
            steady, shadow = LocalPipeline(engine, 128), LocalPipeline(engine, 128)
            at = 0
            for x in inputs[:check_at]:
                net.run(steady.aforward(x, at))
                at += x.shape[1]
            net.run(shadow.aforward(torch.cat(inputs[:check_at], dim=1), 0))  # one chunk
            step = inputs[check_at]
            a = net.run(steady.aforward(step, at))
            b = net.run(shadow.aforward(step, at))
            worst = max(worst, relative_error(a, b))
            net.run(steady.aclose())
            net.run(shadow.aclose())

        async def stop_serving(serving: asyncio.Task[None]) -> None:
            serving.cancel()

        net.run(stop_serving(engine._serving))
        net.stop()
        print(f"| {name} | {worst:.2e} | {tolerance(name):.2e} |")


# --- 2. overhead -------------------------------------------------------------------------------


def bench_overhead(model_dir: Path, runs: int, tokens: int) -> None:
    fractions = (0.0, 0.02, 0.10)
    with tempfile.TemporaryDirectory() as tmp:
        swarm = start_peers(model_dir, [Span(0, 30)] * 3, Path(tmp))
        try:
            gens = {
                f: open_swarm_generator(
                    model_dir, swarm.addresses, config=ClientConfig(verify_fraction=f)
                )
                for f in fractions
            }
            cfg = SamplingConfig(max_new_tokens=tokens, temperature=0.0)
            speeds: dict[float, list[float]] = {f: [] for f in fractions}
            for run in range(runs + 1):  # the first round warms every peer and client up
                for f, gen in gens.items():
                    gen.tokenizer.eos_ids = frozenset()  # every run decodes all its tokens
                    list(gen.tokens(gen.tokenizer.encode_chat(STORY), cfg))
                    if run:
                        speeds[f].append(gen.last_stats.decode_tokens_per_second)
                print(f"  round {run}/{runs} done", file=sys.stderr)
            checks = {f: dict(gen.client.verify_counts) for f, gen in gens.items()}  # type: ignore[attr-defined]
        finally:
            swarm.stop()
    base = statistics.median(speeds[0.0])
    print(f"\n| steps checked | decode tok/s, median (min-max) of {runs} | vs 0% | checks |")
    print("|---|---|---|---|")
    for f in fractions:
        ratio = statistics.median(speeds[f]) / base
        print(f"| {f:.0%} | {spread(speeds[f])} | {ratio:.2f}x | {checks[f]} |")


# --- 3. detection ------------------------------------------------------------------------------


def steps_until_caught(model_dir: Path, liar: PeerProcess, honest: list[str], limit: int) -> int:
    client = SwarmClient(model_dir, [liar.address], ClientConfig(verify_fraction=0.02))
    try:
        session = RemoteSession(client, limit + 8)
        client.net.run(session.open())
        client.net.run(client.add_peers(honest))
        hidden = torch.randn(1, 1, ModelConfig.from_file(model_dir).hidden_size)
        for n in range(limit):
            session.forward(hidden, n)
            if liar.peer_id in client.trust.liars:
                return n + 1
        return limit
    finally:
        client.close()


def bench_detection(model_dir: Path, runs: int, limit: int) -> None:
    head = f"steps until banned, median (min-max) of {runs}"
    print(f"\n| corrupted steps | checked | {head} | expected median | expected mean |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        long = ["--max-session-length", str(limit + 8)]
        honest = start_peers(model_dir, [Span(0, 4)] * 2, Path(tmp), long)
        try:
            for rate in (0.10, 0.01):
                spec = f"perturb={rate},seed={int(time.time())}"
                faulty = [*long, "--test-fault-injector", spec]
                liar = start_peer(model_dir, Span(0, 4), Path(tmp), faulty)
                try:
                    found = [
                        steps_until_caught(model_dir, liar, honest.addresses, limit)
                        for _ in range(runs)
                    ]
                finally:
                    liar.stop()
                mean = 2 + 1 / (0.02 * rate)
                median = 2 + math.log(2) / (0.02 * rate)
                found_text = spread([float(x) for x in found])
                print(f"| {rate:.0%} | 2% | {found_text} | {median:.0f} | {mean:.0f} |")
                sys.stdout.flush()
        finally:
            honest.stop()


def tiny_model(folder: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=65536,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--tables", nargs="+", default=["tolerance", "overhead", "detection"], metavar="NAME"
    )
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64, help="decode tokens per overhead run")
    ap.add_argument("--limit", type=int, default=30000, help="most steps per detection run")
    args = ap.parse_args()
    model_dir = resolve_model_cli("smollm2-135m", default_cache_dir())
    torch.set_num_threads(2)
    if "tolerance" in args.tables:
        bench_tolerance(model_dir)
    if "overhead" in args.tables:
        bench_overhead(model_dir, args.runs, args.tokens)
    if "detection" in args.tables:
        with tempfile.TemporaryDirectory() as tmp:
            bench_detection(tiny_model(Path(tmp) / "tiny"), args.runs, args.limit)


if __name__ == "__main__":
    main()
