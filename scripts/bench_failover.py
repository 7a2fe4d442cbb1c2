"""Benchmark failover: time from a `kill -9` of the peer in use to the next token.

Four peer processes on loopback (two replicas of each half of SmolLM2's layers). Each run
generates a greedy reply, kills the second hop's peer after `--kill-at` tokens, and measures
the time from the kill to the next token and the reroute's own cost (opening the new session
and replaying the kept inputs). The killed peer is restarted between runs.

    python scripts/bench_failover.py [--runs 5] [--kill-at 32]
"""

from __future__ import annotations

import argparse
import signal
import statistics
import tempfile
import time
from pathlib import Path

from layerswarm.cli.common import default_cache_dir, resolve_model_cli
from layerswarm.peer.launch import start_peer, start_peers
from layerswarm.routing.generate import Generator
from layerswarm.routing.sampling import SamplingConfig
from layerswarm.routing.session import RemoteSession
from layerswarm.routing.swarm_client import open_swarm_generator
from layerswarm.shards.config import Span

STORY = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]


def one_run(gen: Generator, kill_at: int, swarm_peers: list) -> tuple[float, float, int]:  # type: ignore[type-arg]
    """(seconds from kill to next token, seconds of the reroute, tokens replayed)."""
    prompt = gen.tokenizer.encode_chat(STORY)
    cfg = SamplingConfig(max_new_tokens=kill_at + 8, temperature=0.0)
    t_kill = gap = 0.0
    for n, _token in enumerate(gen.tokens(prompt, cfg), start=1):
        if n == kill_at:
            session = gen.active
            assert isinstance(session, RemoteSession)
            victim_id = session.hops[1].view.peer_id
            victim = next(p for p in swarm_peers if p.peer_id == victim_id)
            t_kill = time.perf_counter()
            victim.stop(signal.SIGKILL)
        elif n == kill_at + 1:
            gap = time.perf_counter() - t_kill
            reroute = session.reroute_seconds[-1] if session.reroute_seconds else float("nan")
    return gap, reroute, len(prompt) + kill_at


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--kill-at", type=int, default=32, help="tokens generated before the kill")
    args = ap.parse_args()
    model_dir = resolve_model_cli(args.model, default_cache_dir())
    spans = [Span(0, 15), Span(0, 15), Span(15, 30), Span(15, 30)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp, start_peers(model_dir, spans, Path(tmp)) as swarm:
        for _ in range(args.runs):
            gen = open_swarm_generator(model_dir, swarm.addresses)
            rows.append(one_run(gen, args.kill_at, swarm.peers))
            gen.client.close()  # type: ignore[attr-defined]
            for i, p in enumerate(swarm.peers):  # bring the killed replica back
                if p.process.poll() is not None:
                    swarm.peers[i] = start_peer(model_dir, p.span, Path(tmp))
    print(
        f"\nfailover on loopback, SmolLM2 fp32, 4 peers (2 replicas per half), kill -9 of the "
        f"second hop after {args.kill_at} tokens, {args.runs} runs\n"
    )
    print("| run | kill -> next token (ms) | reroute + replay (ms) | tokens replayed |")
    print("|---|---|---|---|")
    for i, (gap, reroute, replayed) in enumerate(rows, start=1):
        print(f"| {i} | {gap * 1e3:.0f} | {reroute * 1e3:.0f} | {replayed} |")
    gaps = [r[0] for r in rows]
    print(
        f"| median | {statistics.median(gaps) * 1e3:.0f} | "
        f"{statistics.median(r[1] for r in rows) * 1e3:.0f} | |"
    )
    print(f"\nworst kill -> next token: {max(gaps) * 1e3:.0f} ms (target: under 1000 ms)")


if __name__ == "__main__":
    main()
