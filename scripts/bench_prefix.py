"""Benchmark the peers' shared KV pages: a long system prompt sent again, and `n` choices.

Two peer processes on loopback (SmolLM2's layers in halves). Each round uses a system prompt of
its own (~1,100 tokens; a new first line, so no round finds another's pages) and takes turns:
- `cache, first`: a client with the prefix cache asks a first question (nothing kept yet);
- `cache, again`: the same client asks another question after the same system prompt;
- `no cache`: a client with `prefix_cache=False` asks that second question.
Each prints the time to the first token and the tokens the peers computed (their
`computed_tokens` counter). The greedy replies of `cache, again` and `no cache` must be equal,
or the round is reported as wrong and its time left out.

Then `n` greedy choices of one prompt (a new one each round): as one request (the peers fork
the session: one prefill) against `n` replies in separate sessions of a client without the
cache (`n` prefills). Every choice must equal the single greedy reply.

    python scripts/bench_prefix.py [--rounds 3] [--n 3]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from benchlib import spread

from layerswarm.cli.common import default_cache_dir, resolve_model_cli
from layerswarm.peer.launch import LocalSwarm, start_peers
from layerswarm.routing.generate import Choices, Generator
from layerswarm.routing.sampling import Sampler, SamplingConfig
from layerswarm.routing.swarm_client import ClientConfig, SwarmClient, open_swarm_generator
from layerswarm.shards.config import Span
from layerswarm.swarm.protocol import InfoReply, InfoRequest

SYSTEM = " ".join(
    f"Rule {i}: keep every answer short, polite and about the question asked." for i in range(80)
)
QUESTIONS = ("What is the capital of France?", "Name a large animal.")
REPLY = 8  # unit: tokens of each greedy reply


def computed(gen: Generator) -> int:
    """Tokens the peers have computed, all together (their counters)."""
    client: SwarmClient = gen.client  # type: ignore[attr-defined]

    async def total() -> int:
        n = 0
        for link in client.links:
            assert link.conn is not None
            info = await link.conn.request(InfoRequest())
            assert isinstance(info, InfoReply)
            n += int(info.extra.get("computed_tokens", 0))  # type: ignore[arg-type]
        return n

    return client.net.run(total())


def timed(gen: Generator, prompt: Sequence[int]) -> tuple[float, list[int], int]:
    """Seconds to the first token, the greedy reply, and the tokens the peers computed."""
    before = computed(gen)
    sampling = SamplingConfig(max_new_tokens=REPLY, temperature=0.0)

    async def run() -> tuple[float, list[int]]:
        t0 = time.perf_counter()
        first, tokens = float("nan"), []
        async for token in gen.atokens(prompt, sampling):
            if not tokens:
                first = time.perf_counter() - t0
            tokens.append(token)
        return first, tokens

    gen.tokenizer.eos_ids = frozenset()  # every reply runs to its length
    first, tokens = gen.net.run(run())
    return first, tokens, computed(gen) - before


def choices(gen: Generator, prompt: Sequence[int], n: int, fork: bool) -> tuple[float, list[Any]]:
    """Seconds for `n` greedy replies of `prompt` in flight at once, and the replies."""
    sampling = SamplingConfig(max_new_tokens=REPLY, temperature=0.0)

    async def one(group: Choices | None) -> list[int]:
        sampler = Sampler(sampling, len(prompt))
        return [t async for t in gen.atokens(prompt, sampling, sampler, group)]

    async def run() -> list[list[int]]:
        group = Choices(n) if fork else None
        return list(await asyncio.gather(*(one(group) for _ in range(n))))

    gen.tokenizer.eos_ids = frozenset()
    t0 = time.perf_counter()
    replies = gen.net.run(run())
    return time.perf_counter() - t0, replies


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--n", type=int, default=3)
    args = ap.parse_args()
    model_dir = resolve_model_cli(args.model, default_cache_dir())
    rows: dict[str, list[tuple[float, int]]] = {
        "cache, first": [],
        "cache, again": [],
        "no cache": [],
    }
    prompt_tokens, wrong = 0, 0
    with tempfile.TemporaryDirectory() as tmp:
        swarm: LocalSwarm
        with start_peers(model_dir, [Span(0, 15), Span(15, 30)], Path(tmp)) as swarm:
            on = open_swarm_generator(model_dir, swarm.addresses, config=ClientConfig())
            off = open_swarm_generator(
                model_dir, swarm.addresses, config=ClientConfig(prefix_cache=False)
            )
            for r in range(args.rounds):
                system = f"Conversation {r} of the benchmark. {SYSTEM}"
                asks = [
                    on.tokenizer.encode_chat(
                        [{"role": "system", "content": system}, {"role": "user", "content": q}]
                    )
                    for q in QUESTIONS
                ]
                prompt_tokens = len(asks[1])
                s, _, c = timed(on, asks[0])
                rows["cache, first"].append((s, c))
                s_on, warm, c_on = timed(on, asks[1])
                s_off, cold, c_off = timed(off, asks[1])
                if warm != cold:
                    wrong += 1
                    print(f"round {r}: the cached reply differs: {warm} != {cold}", file=sys.stderr)
                    continue
                rows["cache, again"].append((s_on, c_on))
                rows["no cache"].append((s_off, c_off))
                print(
                    f"round {r}: {s_on * 1e3:.0f} ms cached, {s_off * 1e3:.0f} ms not",
                    file=sys.stderr,
                )
            forks: list[tuple[float, int]] = []
            apart: list[tuple[float, int]] = []
            for r in range(args.rounds):  # a prompt of its own each round: no page kept
                story = f"Story {r}. " + "Tell me a story. " * 30
                ask = on.tokenizer.encode_chat([{"role": "user", "content": story}])
                _, single, _ = timed(off, ask)
                for gen, fork, out in ((on, True, forks), (off, False, apart)):
                    before = computed(gen)
                    seconds, replies = choices(gen, ask, args.n, fork)
                    if any(reply != single for reply in replies):
                        wrong += 1
                        print("a choice differs from the single greedy reply", file=sys.stderr)
                        continue
                    out.append((seconds, computed(gen) - before))
            for gen in (on, off):
                gen.client.close()  # type: ignore[attr-defined]
    print(
        f"\n### bench_prefix ({datetime.now():%Y-%m-%d %H:%M}, SmolLM2-135M, 2 peers on "
        f"loopback, {args.rounds} rounds, {REPLY}-token greedy replies; wrong replies: {wrong})\n"
    )
    print(
        f"A {prompt_tokens}-token prompt whose system part (all but ~12 tokens) was sent before:\n"
    )
    print("| client | first token ms | tokens the peers computed |")
    print("|---|---|---|")
    for name, values in rows.items():
        print(row(name, values))
    print(f"\n{args.n} greedy choices of a {len(ask)}-token prompt, in flight at once:\n")
    print("| choices | all replies ms | tokens the peers computed |")
    print("|---|---|---|")
    for name, values in ((f"n={args.n}, forked", forks), (f"{args.n} separate sessions", apart)):
        print(row(name, values))


def row(name: str, values: list[tuple[float, int]]) -> str:
    seconds, tokens = [s for s, _ in values], [float(c) for _, c in values]
    return f"| {name} | {spread(seconds, '.0f', 1e3)} | {spread(tokens)} |"


if __name__ == "__main__":
    main()
