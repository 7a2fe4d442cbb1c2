"""Benchmark many sessions at once: aggregate decode tok/s and time between tokens.

For the local engine and a 2-peer swarm on loopback (SmolLM2-135M, layers 0:15 and 15:30), in
fp32 and bf16, in one run: 1, 2, 4, 8 and 16 sessions decode at the same time through one
client (`AsyncClient`-style, every reply on the client's one event loop), and a last row has a
few sessions decoding while another client (on the local engine: another session) prefills a
2,000-token prompt. Every session decodes exactly `--tokens` tokens (EOS is switched off, as in
`scripts/bench_swarm.py`). Each measurement runs in a fresh child process; the local engine and
the swarm alternate (A B A B) over `--repeats`.

Columns, per row:
- aggregate decode tok/s: tokens produced by all sessions while every one of them is decoding
  (from the last session's first token to the first session's last token), over that time;
  median over repeats (min-max);
- x 1 session: that over the same child's 1-session rate (the target: >= 4x at 8 sessions, bf16);
- p50 / p99 gap: time between consecutive tokens of a session, every decode gap of every session
  pooled (median over repeats);
- longest gap: the largest such gap; in the prefill row, the largest gap of a decoding session
  that overlaps the other client's prefill, and its ratio to the decoders' median gap before the
  prefill began (the target: under 3x);
- failures: sessions that raised or stopped short, summed over repeats (the target: none).

A second table says what batching can give on this machine at most: the time of SmolLM2's
linear layers (one layer's q/k/v, o, gate/up and down matmuls) for 1 to 16 rows, relative to
one row, in each dtype. A decode step of n sessions cannot be cheaper than its matmuls at n rows.

    python scripts/bench_concurrency.py [--sessions 1 2 4 8 16] [--tokens 32] [--repeats 2]
        [--dtypes float32 bfloat16] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from benchlib import child_json, percentile, spread
from torch import nn

from layerswarm import Client
from layerswarm.cli.common import default_cache_dir, resolve_model_cli
from layerswarm.kernels.cpu_linear import pack_linears
from layerswarm.peer.launch import start_peers
from layerswarm.routing.sampling import SamplingConfig
from layerswarm.shards.config import Span

# What the peers use (layerswarm/cli/peer.py): spin briefly, then sleep. A swarm client waits on
# its peers; on one shared machine its OpenMP threads must not spin meanwhile (bench_swarm.py).
SPIN_ENV = {"GOMP_SPINCOUNT": "20000"}
SPANS = [Span(0, 15), Span(15, 30)]
SHORT = {"float32": "fp32", "bfloat16": "bf16"}
CHILD_TIMEOUT = 3600.0  # unit: s one child may take before it counts as hung


def random_prompt(n: int, seed: int) -> list[int]:
    """`n` token ids of ordinary vocabulary, the same for a seed."""
    ids = torch.randint(1000, 20000, (n,), generator=torch.Generator().manual_seed(seed))
    return [int(t) for t in ids]


async def one_session(
    client: Client, ids: list[int], tokens: int, times: list[float], stop: asyncio.Event | None
) -> None:
    """Decode up to `tokens` tokens after `ids`, appending each token's arrival time to `times`.

    With `stop`, the session ends early once `stop` is set and 4 more tokens came after it.
    Runs on the caller's own loop; the session itself runs on the client's loop.
    """
    gen = client.generator
    cfg = SamplingConfig(max_new_tokens=tokens, temperature=0.0)
    replies = gen.net.iterate(gen.atokens(ids, cfg))
    after_stop = 0
    try:
        async for _token in replies:
            times.append(time.perf_counter())
            if stop is not None and stop.is_set():
                after_stop += 1
                if after_stop >= 4:
                    break
    finally:
        await replies.aclose()  # type: ignore[attr-defined]


async def run_sessions(
    client: Client,
    prompts: list[list[int]],
    tokens: int,
    times: list[list[float]],
    stop: asyncio.Event | None = None,
) -> int:
    """Run one session per prompt at once, arrival times into `times`; returns the failures."""
    results = await asyncio.gather(
        *(one_session(client, p, tokens, t, stop) for p, t in zip(prompts, times, strict=True)),
        return_exceptions=True,
    )
    failures = 0
    for result, t in zip(results, times, strict=True):
        if isinstance(result, BaseException):
            print(f"a session failed: {result!r}", file=sys.stderr)
            failures += 1
        elif stop is None and len(t) != tokens:
            print(f"a session stopped after {len(t)} of {tokens} tokens", file=sys.stderr)
            failures += 1
    return failures


def gaps_of(times: list[list[float]]) -> list[float]:
    return [b - a for t in times for a, b in itertools.pairwise(t)]


def aggregate_rate(times: list[list[float]]) -> float:
    """Tokens per second of all sessions while every one of them is decoding."""
    live = [t for t in times if len(t) >= 2]
    if not live:
        return 0.0
    t0, t1 = max(t[0] for t in live), min(t[-1] for t in live)
    if t1 <= t0:  # the sessions hardly overlapped: take the whole decode instead
        t0, t1 = min(t[0] for t in live), max(t[-1] for t in live)
        return sum(len(t) - 1 for t in live) / (t1 - t0) if t1 > t0 else 0.0
    return sum(1 for t in live for x in t if t0 < x <= t1) / (t1 - t0)


async def concurrency_rows(client: Client, args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for n in args.sessions:
        prompts = [random_prompt(args.prompt_tokens, seed=s) for s in range(n)]
        times: list[list[float]] = [[] for _ in prompts]
        failures = await run_sessions(client, prompts, args.tokens, times)
        gaps = gaps_of(times)
        rows.append(
            {
                "sessions": n,
                "rate": aggregate_rate(times),
                "p50": percentile(gaps, 0.5),
                "p99": percentile(gaps, 0.99),
                "max": max(gaps, default=float("nan")),
                "failures": failures,
            }
        )
        print(f"  {n} sessions: {rows[-1]}", file=sys.stderr)
    return rows


async def stall_row(client: Client, other: Client, args: argparse.Namespace) -> dict[str, Any]:
    """Decoders' gaps while `other` prefills a long prompt (and samples one token after it)."""
    n = args.stall_sessions
    prompts = [random_prompt(args.prompt_tokens, seed=100 + s) for s in range(n)]
    times: list[list[float]] = [[] for _ in prompts]
    stop = asyncio.Event()
    cap = 4096  # tokens: far more than the prefill takes, well within the 8192 context
    decoding = asyncio.ensure_future(run_sessions(client, prompts, cap, times, stop))
    failures = 0
    try:
        # Every decoder first gets going: the median gap before the prefill needs a few gaps.
        while not decoding.done() and min(len(t) for t in times) < args.warm_tokens:
            await asyncio.sleep(0.02)
        t_p0 = time.perf_counter()
        long_prompt = [random_prompt(args.prefill_tokens, seed=999)]
        failures += await run_sessions(other, long_prompt, 1, [[]])
        t_p1 = time.perf_counter()
    finally:
        stop.set()
        failures += await decoding
    before = [b - a for t in times for a, b in itertools.pairwise(t) if b <= t_p0]
    during = [b - a for t in times for a, b in itertools.pairwise(t) if b > t_p0 and a < t_p1]
    median = statistics.median(before) if before else float("nan")
    longest = max(during, default=float("nan"))
    return {
        "sessions": f"{n} + prefill {args.prefill_tokens}",
        "rate": sum(1 for t in times for x in t if t_p0 < x <= t_p1) / (t_p1 - t_p0),
        "p50": median,
        "p99": percentile(before, 0.99),
        "max": longest,
        "ratio": longest / median,
        "prefill_s": t_p1 - t_p0,
        "failures": failures,
    }


async def child_main(args: argparse.Namespace) -> dict[str, Any]:
    local = args.child == "local"
    connect: dict[str, Any] = {"local": True} if local else {"peers": args.peer}
    client = Client.connect(args.model, dtype=args.dtype, temperature=0, **connect)
    # Random prompts make SmolLM2 emit EOS after ~20 tokens; with none, every session decodes
    # exactly the tokens asked, so that every rate is taken over the same number of steps.
    client.generator.tokenizer.eos_ids = frozenset()
    # The prefill comes from another person: on the swarm, another client with its own
    # connections; on the local engine, another session of the same engine (a second copy of
    # the model would only be a second process fighting for the same cores).
    other = client if local else Client.connect(args.model, dtype=args.dtype, peers=args.peer)
    other.generator.tokenizer.eos_ids = frozenset()
    try:
        rows = await concurrency_rows(client, args)
        rows.append(await stall_row(client, other, args))
    finally:
        if other is not client:
            other.close()
        client.close()
    # What the client's head ran in: `Client.connect(peers=..., dtype=...)` may not pass the
    # dtype on to a swarm client's head (the peers' --dtype decides the layers').
    return {"rows": rows, "head_dtype": str(next(client.generator.head.parameters()).dtype)}


def child(args: argparse.Namespace) -> None:
    """Measure one engine in this process; print the results as JSON on the last line."""
    try:
        result = asyncio.run(child_main(args))
    except Exception as e:  # the parent counts it as a failed repeat
        traceback.print_exc()
        result = {"error": repr(e)}
    print(json.dumps(result))


def run_child(
    args: argparse.Namespace, engine: str, dtype: str, peers: list[str]
) -> dict[str, Any]:
    """One engine's measurement in a fresh process; {"error": ...} when it failed."""
    argv = [
        "--child",
        engine,
        "--dtype",
        dtype,
        "--model",
        args.model,
        "--tokens",
        str(args.tokens),
        "--prompt-tokens",
        str(args.prompt_tokens),
        "--stall-sessions",
        str(args.stall_sessions),
        "--prefill-tokens",
        str(args.prefill_tokens),
        "--warm-tokens",
        str(args.warm_tokens),
        "--sessions",
        *map(str, args.sessions),
        *(f"--peer={p}" for p in peers),
    ]
    env = SPIN_ENV if engine == "swarm" else {}
    result, stderr = child_json(argv, env, CHILD_TIMEOUT)
    if "error" in result:
        print(f"{engine} {dtype} failed; its stderr ends:\n{stderr[-3000:]}", file=sys.stderr)
    return result


def measure_dtype(
    args: argparse.Namespace, model_dir: Path, dtype: str, workdir: Path
) -> dict[str, list[dict[str, Any]]]:
    """Every repeat of both engines in one dtype, alternating: local, swarm, local, swarm."""
    results: dict[str, list[dict[str, Any]]] = {"local": [], "swarm": []}
    with start_peers(model_dir, SPANS, workdir, ["--dtype", dtype]) as swarm:
        for r in range(args.repeats):
            for engine in ("local", "swarm"):
                print(f"{dtype} {engine}, repeat {r + 1}/{args.repeats}", file=sys.stderr)
                peers = swarm.addresses if engine == "swarm" else []
                results[engine].append(run_child(args, engine, dtype, peers))
    return results


def table_rows(dtype: str, engine: str, runs: list[dict[str, Any]]) -> list[str]:
    """Markdown rows of one engine and dtype, over its repeats (failed repeats are counted)."""
    name = "local engine" if engine == "local" else "2 peers"
    good = [run["rows"] for run in runs if "rows" in run]
    crashed = len(runs) - len(good)
    if not good:
        return [
            f"| {SHORT[dtype]} | {name} | - | every repeat failed | | | | | {crashed} repeats |"
        ]
    out = []
    for i, first in enumerate(good[0]):
        rows = [g[i] for g in good]
        gap_max = [r["max"] * 1e3 for r in rows]
        longest = spread(gap_max, ".0f")
        if "ratio" in first:
            longest += f" = {spread([r['ratio'] for r in rows], '.1f')}x p50"
            scale = f"prefill {spread([r['prefill_s'] for r in rows], '.1f')} s"
        else:
            scale = spread(
                [r["rate"] / g[0]["rate"] for r, g in zip(rows, good, strict=True)], ".1f"
            )
            scale += "x"
        failures = sum(r["failures"] for r in rows) + crashed
        out.append(
            f"| {SHORT[dtype]} | {name} | {first['sessions']} "
            f"| {spread([r['rate'] for r in rows], '.1f')} | {scale} "
            f"| {spread([r['p50'] * 1e3 for r in rows], '.0f')} "
            f"| {spread([r['p99'] * 1e3 for r in rows], '.0f')} | {longest} | {failures} |"
        )
    return out


def print_table(
    args: argparse.Namespace, results: dict[str, dict[str, list[dict[str, Any]]]]
) -> None:
    print(
        f"\nSmolLM2-135M, {datetime.now():%Y-%m-%d %H:%M}, {os.cpu_count()} cores, every "
        f"process on this machine, peers on loopback (TLS). Each session: a {args.prompt_tokens}-"
        f"token prompt, then {args.tokens} greedy tokens; {args.repeats} repeats, median "
        f"(min-max). Last rows: {args.stall_sessions} sessions decode while another client "
        f"prefills {args.prefill_tokens} tokens.\n"
    )
    print(
        "| dtype | engine | sessions | aggregate decode tok/s | x 1 session "
        "| p50 gap ms | p99 gap ms | longest gap ms | failures |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for dtype, by_engine in results.items():
        for engine in ("local", "swarm"):
            for line in table_rows(dtype, engine, by_engine[engine]):
                print(line)
    for dtype, by_engine in results.items():
        for engine, runs in by_engine.items():
            heads = {run["head_dtype"] for run in runs if "head_dtype" in run}
            if heads - {f"torch.{dtype}"}:
                print(f"\nNote: the {engine} client's head ran in {', '.join(sorted(heads))}.")
    print(
        "\nTargets: at 8 sessions, aggregate decode >= 4x one session's (bf16); the longest "
        "gap during the prefill under 3x the median gap; no failures."
    )


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--sessions", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--tokens", type=int, default=32, help="tokens each session decodes")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=list(SHORT))
    ap.add_argument("--prompt-tokens", type=int, default=32, help="each session's prompt")
    ap.add_argument("--prefill-tokens", type=int, default=2000, help="the other client's prompt")
    ap.add_argument("--stall-sessions", type=int, default=4, help="decoding during the prefill")
    ap.add_argument("--warm-tokens", type=int, default=8, help="decoded before the prefill")
    ap.add_argument(
        "--quick", action="store_true", help="smoke run: 1 2 4 sessions, 16 tokens, 1 repeat"
    )
    ap.add_argument("--child", choices=["local", "swarm"], help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    ap.add_argument("--peer", action="append", default=[], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.sessions, args.tokens, args.repeats = [1, 2, 4], 16, 1
    if 1 not in args.sessions:
        args.sessions = [1, *args.sessions]  # the rates are compared with one session's
    args.sessions = sorted(set(args.sessions))
    return args


def gemm_scaling(dtypes: list[str], rows: list[int], repeats: int = 50) -> None:
    """Print how one decoder layer's matmuls scale with rows (sessions), per dtype."""
    shapes = [(576, 960), (576, 576), (576, 3072), (1536, 576)]  # SmolLM2: (in, out) per matmul
    print("\n| dtype | " + " | ".join(f"{n} rows" for n in rows) + " |")
    print("|---|" + "---|" * len(rows))
    for name in dtypes:
        dtype = getattr(torch, name)
        # The layouts the peers use (`pack_linears`): a huge-page arena in fp32, oneDNN's packed
        # weights in bf16.
        layers = pack_linears(
            nn.Sequential(*(nn.Linear(i, o, bias=False) for i, o in shapes)).to(dtype)
        )
        times: dict[int, float] = {}
        for _ in range(3):  # rounds, the row counts interleaved; the best round of each counts
            for n in rows:
                xs = [torch.randn(n, i).to(dtype) for i, _ in shapes]
                t0 = time.perf_counter()
                for _ in range(repeats):
                    for x, layer in zip(xs, layers, strict=True):
                        layer(x)
                took = (time.perf_counter() - t0) / repeats
                times[n] = min(times.get(n, took), took)
        cells = [f"{times[n] * 1e3:.2f} ms ({times[n] / times[rows[0]]:.1f}x)" for n in rows]
        print(f"| {SHORT[name]} | " + " | ".join(cells) + " |")


def main() -> None:
    args = parse_args()
    if args.child:
        child(args)
        return
    gemm_scaling(args.dtypes, [1, 2, 4, 8, 16])
    model_dir = resolve_model_cli(args.model, default_cache_dir())
    args.model = str(model_dir)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in args.dtypes:
            results[dtype] = measure_dtype(args, model_dir, dtype, Path(tmp))
    print_table(args, results)


if __name__ == "__main__":
    main()
