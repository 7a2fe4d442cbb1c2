"""Benchmark failover: time from a `kill -9` of the peer in use to the next token.

Four peer processes on loopback (two replicas of each half of SmolLM2's layers). Each run
generates a greedy reply of `kill_at + 8` tokens (EOS switched off, so the reply never ends
before the kill, as in `scripts/bench_swarm.py`), kills the second hop's peer after `kill_at`
tokens, and measures the time from the kill to the next token and the reroute's own cost
(opening the new session and replaying the kept inputs). The killed peer is restarted between
runs. Every kill point goes into one table: runs recovered (the reply went on to its last
token, equal to the same reply with no kill, generated first), kill to next token (median,
max), reroute + replay (median), tokens replayed.

    python scripts/bench_failover.py [--runs 5] [--kill-at 32 500 1000]
"""

from __future__ import annotations

import argparse
import signal
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from benchlib import restart_dead

from layerswarm.cli.common import default_cache_dir, resolve_model_cli
from layerswarm.peer.launch import LocalSwarm, start_peers
from layerswarm.routing.generate import Generator
from layerswarm.routing.sampling import SamplingConfig
from layerswarm.routing.session import RemoteSession
from layerswarm.routing.swarm_client import open_swarm_generator
from layerswarm.shards.config import Span

STORY = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]
TAIL = 8  # unit: tokens generated after the kill
TARGETS = {32: 1.0, 1000: 3.0}  # unit: s from the kill to the next token, by kill point (issue 10)


@dataclass
class Run:
    """One reply with a kill in it."""

    recovered: bool = False  # every token came, equal to the undisturbed reply's
    gap: float = float("nan")  # unit: s from the kill to the next token
    reroute: float = float("nan")  # unit: s the reroute took, replay included
    replayed: int = 0  # unit: tokens replayed into the new hop


def undisturbed(gen: Generator, kill_at: int) -> list[int]:
    """The greedy reply of `kill_at + TAIL` tokens with no kill: what every run must give."""
    cfg = SamplingConfig(max_new_tokens=kill_at + TAIL, temperature=0.0)
    return list(gen.tokens(gen.tokenizer.encode_chat(STORY), cfg))


def one_run(gen: Generator, kill_at: int, swarm: LocalSwarm, reference: list[int]) -> Run:
    """Generate `kill_at + TAIL` tokens, killing the second hop's peer after `kill_at`."""
    prompt = gen.tokenizer.encode_chat(STORY)
    cfg = SamplingConfig(max_new_tokens=kill_at + TAIL, temperature=0.0)
    run, t_kill = Run(), 0.0
    tokens: list[int] = []
    session: RemoteSession | None = None
    try:
        for n, token in enumerate(gen.tokens(prompt, cfg), start=1):
            tokens.append(token)
            if n == kill_at:
                assert isinstance(gen.active, RemoteSession)
                session = gen.active
                victim_id = session.hops[1].view.peer_id
                victim = next(p for p in swarm.peers if p.peer_id == victim_id)
                # What the new hop must rebuild: every input kept at its boundary, but the one
                # of the step now being sent, which goes to it next.
                kept = session.history.get(session.hops[1].span.start, [])
                run.replayed = sum(int(h.shape[1]) for _, h in kept)
                t_kill = time.perf_counter()
                victim.stop(signal.SIGKILL)
            elif n == kill_at + 1:
                run.gap = time.perf_counter() - t_kill
                if session is not None and session.reroute_seconds:
                    run.reroute = session.reroute_seconds[-1]
    except Exception:  # a run that did not recover is a result, not the end of the benchmark
        traceback.print_exc()
    run.recovered = tokens == reference  # a reply cut short or changed did not recover
    return run


def ms(x: float) -> str:
    return "-" if x != x else f"{x * 1e3:.0f}"  # NaN: no token came after the kill


def table_row(kill_at: int, runs: list[Run]) -> str:
    gaps = [r.gap for r in runs if r.gap == r.gap]
    reroutes = [r.reroute for r in runs if r.reroute == r.reroute]
    target = TARGETS.get(kill_at)
    worst = max(gaps, default=float("nan"))
    if target is None:
        verdict = ""
    else:
        met = len(gaps) == len(runs) and worst <= target
        verdict = f"{target * 1e3:.0f} ms: {'met' if met else 'missed'}"
    replayed = sorted({r.replayed for r in runs if r.replayed})
    return (
        f"| {kill_at} | {sum(r.recovered for r in runs)} / {len(runs)} "
        f"| {ms(statistics.median(gaps)) if gaps else '-'} | {ms(worst)} "
        f"| {ms(statistics.median(reroutes)) if reroutes else '-'} "
        f"| {', '.join(map(str, replayed)) or '-'} | {verdict} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--runs", type=int, default=5, help="runs per kill point")
    ap.add_argument(
        "--kill-at", type=int, nargs="+", default=[32], help="tokens generated before the kill"
    )
    args = ap.parse_args()
    model_dir = resolve_model_cli(args.model, default_cache_dir())
    spans = [Span(0, 15), Span(0, 15), Span(15, 30), Span(15, 30)]
    results: dict[int, list[Run]] = {}
    with tempfile.TemporaryDirectory() as tmp, start_peers(model_dir, spans, Path(tmp)) as swarm:
        for kill_at in args.kill_at:
            gen = open_swarm_generator(model_dir, swarm.addresses)
            gen.tokenizer.eos_ids = frozenset()
            reference = undisturbed(gen, kill_at)
            gen.client.close()  # type: ignore[attr-defined]
            for i in range(args.runs):
                gen = open_swarm_generator(model_dir, swarm.addresses)
                gen.tokenizer.eos_ids = frozenset()  # the reply must reach the kill and go on
                run = one_run(gen, kill_at, swarm, reference)
                gen.client.close()  # type: ignore[attr-defined]
                print(f"kill at {kill_at}, run {i + 1}: {run}", file=sys.stderr)
                results.setdefault(kill_at, []).append(run)
                restart_dead(swarm, model_dir, Path(tmp))
    print(
        f"\nfailover on loopback, {datetime.now():%Y-%m-%d %H:%M}, SmolLM2 fp32, 4 peers "
        f"(2 replicas per half), kill -9 of the second hop after `kill at` tokens of a greedy "
        f"reply of kill at + {TAIL}, {args.runs} runs per kill point\n"
    )
    print(
        "| kill at (tokens) | runs recovered | kill -> next token, median ms | max ms "
        "| reroute + replay, median ms | tokens replayed | target (max) |"
    )
    print("|---|---|---|---|---|---|---|")
    for kill_at, runs in results.items():
        print(table_row(kill_at, runs))


if __name__ == "__main__":
    main()
