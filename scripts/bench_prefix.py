"""Benchmark the peers' shared KV pages over an emulated home link: a long system prompt sent
again, `n` choices, and decoding under a JSON schema.

Two peer processes (SmolLM2's layers in halves), each behind the link emulator
(`layerswarm/devtools/linkemu.py`, `--delay-ms` one way, 10 by default; pushes between the
peers cross it too). Three tables, every reply checked before its time counts:

1. **A shared prefix** of about 1,000 and 4,000 tokens (a system prompt; each round has one of
   its own, so no round finds another's pages). In turn: a client with the prefix cache asks a
   first question (`cold`: nothing kept yet), then another question after the same system
   prompt (`cached`), and a client with `prefix_cache=False` asks that second question; the
   greedy replies of the last two must be equal. Time to the first token, the prompt tokens
   sent, and the activation bytes the prefill put on the links (tokens sent x hidden size x 4
   bytes x 3 crossings by push: client, peer to peer, back for the last position only; derived
   from the tokens sent, not counted on the wire).
2. **`n` choices** of one prompt (a new one each round) as one request, the peers forking the
   session, against `n = 1`: time until every choice has its first token, and the tokens the
   peers computed (their `computed_tokens` counter). Every greedy choice must equal the `n = 1`
   reply.
3. **Decoding under a JSON schema** against free text: decode tok/s of 48-token greedy replies.

    python scripts/bench_prefix.py [--rounds 3] [--delay-ms 10] [--prefix 1000 4000] [--n 4]
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

from bench_network import Link, links
from benchlib import spread

from layerswarm.cli.common import default_cache_dir, resolve_model_cli
from layerswarm.peer.launch import start_peers
from layerswarm.routing.generate import Choices, Generator
from layerswarm.routing.grammar import Grammar, grammar_tokenizer, json_schema_grammar
from layerswarm.routing.sampling import Sampler, SamplingConfig
from layerswarm.routing.swarm_client import ClientConfig, SwarmClient, open_swarm_generator
from layerswarm.shards.config import Span
from layerswarm.swarm.protocol import InfoReply, InfoRequest

RULE = "Rule {}: keep every answer short, polite and about the question asked."
QUESTIONS = ("What is the capital of France?", "Name a large animal.")
REPLY = 8  # unit: tokens of each greedy reply in tables 1 and 2
DECODE = 48  # unit: tokens of table 3's replies
SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "steps": {"type": "array", "items": {"type": "string"}, "minItems": 6},
    },
    "required": ["title", "steps"],
}


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


def first_token(gen: Generator, prompt: Sequence[int]) -> tuple[float, list[int], int]:
    """Seconds to the first token, the greedy reply, and the prompt tokens sent."""
    sampling = SamplingConfig(max_new_tokens=REPLY, temperature=0.0)

    async def run() -> tuple[float, list[int]]:
        t0 = time.perf_counter()
        first, tokens = float("nan"), []
        async for token in gen.atokens(prompt, sampling):
            if not tokens:
                first = time.perf_counter() - t0
            tokens.append(token)
        return first, tokens

    first, tokens = gen.net.run(run())
    return first, tokens, len(prompt) - gen.last_stats.reused_tokens


def choices(gen: Generator, prompt: Sequence[int], n: int) -> tuple[float, list[list[int]]]:
    """Seconds until each of `n` greedy choices has its first token, and the choices."""
    sampling = SamplingConfig(max_new_tokens=REPLY, temperature=0.0)
    firsts: list[float] = []

    async def one(group: Choices | None, t0: float) -> list[int]:
        out = []
        async for token in gen.atokens(prompt, sampling, Sampler(sampling, len(prompt)), group):
            if not out:
                firsts.append(time.perf_counter() - t0)
            out.append(token)
        return out

    async def run() -> list[list[int]]:
        group, t0 = (Choices(n) if n > 1 else None), time.perf_counter()
        return list(await asyncio.gather(*(one(group, t0) for _ in range(n))))

    replies = gen.net.run(run())
    return max(firsts), replies


def decode_rate(gen: Generator, prompt: Sequence[int], grammar: str | None) -> tuple[float, str]:
    """Decode tok/s of a greedy `DECODE`-token reply, and its text."""
    sampling = SamplingConfig(max_new_tokens=DECODE, temperature=0.0)
    constraint = Grammar(grammar_tokenizer(gen.tokenizer), grammar) if grammar else None

    async def run() -> list[int]:
        sampler = Sampler(sampling, len(prompt), constraint)
        return [t async for t in gen.atokens(prompt, sampling, sampler)]

    tokens = gen.net.run(run())
    stats = gen.last_stats
    return stats.decode_tokens_per_second, gen.tokenizer.decode(tokens)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--delay-ms", type=float, default=10.0)
    ap.add_argument("--prefix", type=int, nargs="+", default=[1000, 4000])
    ap.add_argument("--n", type=int, default=4)
    args = ap.parse_args()
    model_dir = resolve_model_cli(args.model, default_cache_dir())
    out: list[str] = []
    wrong = 0
    with (
        tempfile.TemporaryDirectory() as tmp,
        start_peers(model_dir, [Span(0, 15), Span(15, 30)], Path(tmp)) as swarm,
        links(swarm, Link(args.delay_ms)) as addresses,
    ):
        on = open_swarm_generator(model_dir, addresses, config=ClientConfig())
        off = open_swarm_generator(model_dir, addresses, config=ClientConfig(prefix_cache=False))
        hidden = on.head.config.hidden_size
        for gen in (on, off):
            gen.tokenizer.eos_ids = frozenset()  # every reply runs to its length
        out += [
            "| shared prefix | prompt tokens | cold ms | cached ms | speedup | tokens sent "
            "cold / cached | prefill MB on the links cold / cached |",
            "|---|---|---|---|---|---|---|",
        ]
        for size in args.prefix:
            cold, cached, sent = [], [], (0, 0)
            prompt_len = 0
            for r in range(args.rounds):
                rules = " ".join(RULE.format(i) for i in range(size // 14))
                system = f"Benchmark conversation {size}-{r}. {rules}"
                asks = [
                    on.tokenizer.encode_chat(
                        [{"role": "system", "content": system}, {"role": "user", "content": q}]
                    )
                    for q in QUESTIONS
                ]
                prompt_len = len(asks[1])
                s_cold, _, sent_cold = first_token(on, asks[0])
                s_cached, warm, sent_cached = first_token(on, asks[1])
                _, plain, _ = first_token(off, asks[1])
                if warm != plain:
                    wrong += 1
                    print(f"{size}/{r}: the cached reply differs", file=sys.stderr)
                    continue
                cold.append(s_cold)
                cached.append(s_cached)
                sent = (sent_cold, sent_cached)
                print(f"{size}/{r}: {s_cold:.2f} s cold, {s_cached:.2f} s cached", file=sys.stderr)
            mb = [3 * t * hidden * 4 / 1e6 for t in sent]
            ratio = [c / w for c, w in zip(cold, cached, strict=True)]
            out.append(
                f"| ~{size} | {prompt_len} | {spread(cold, '.0f', 1e3)} | "
                f"{spread(cached, '.0f', 1e3)} | {spread(ratio, '.1f')}x | {sent[0]} / "
                f"{sent[1]} | {mb[0]:.1f} / {mb[1]:.2f} |"
            )
        out += [
            "",
            "| choices | every first token ms | x n=1 | tokens the peers computed |",
            "|---|---|---|---|",
        ]
        times: dict[int, list[float]] = {1: [], args.n: []}
        tokens: dict[int, list[float]] = {1: [], args.n: []}
        for r in range(args.rounds):
            for n in (1, args.n):  # a prompt of its own each time: no page kept
                story = f"Story {r}-{n}. " + "Tell me a story about a lighthouse. " * 20
                ask = on.tokenizer.encode_chat([{"role": "user", "content": story}])
                _, single, _ = first_token(off, ask)
                before = computed(on)
                seconds, replies = choices(on, ask, n)
                if any(reply != single for reply in replies):
                    wrong += 1
                    print(f"n={n}: a choice differs from the single reply", file=sys.stderr)
                    continue
                times[n].append(seconds)
                tokens[n].append(float(computed(on) - before))
        for n in (1, args.n):
            ratio = [a / b for a, b in zip(times[n], times[1], strict=False)]
            out.append(
                f"| n={n} | {spread(times[n], '.0f', 1e3)} | {spread(ratio, '.2f')}x | "
                f"{spread(tokens[n])} |"
            )
        out += ["", "| reply | decode tok/s | x free text |", "|---|---|---|"]
        ask = on.tokenizer.encode_chat(
            [{"role": "user", "content": "List the steps to bake bread, as JSON."}]
        )
        rates: dict[str, list[float]] = {"free text": [], "JSON schema": []}
        grammar = json_schema_grammar(SCHEMA)
        for _ in range(args.rounds):
            for name, g in (("free text", None), ("JSON schema", grammar)):
                rate, text = decode_rate(off, ask, g)
                if g is not None and not text.lstrip().startswith("{"):
                    wrong += 1
                    print(f"the schema's reply is not JSON: {text!r}", file=sys.stderr)
                    continue
                rates[name].append(rate)
        for name, values in rates.items():
            ratio = [a / b for a, b in zip(values, rates["free text"], strict=False)]
            out.append(f"| {name} | {spread(values, '.1f')} | {spread(ratio, '.2f')}x |")
        for gen in (on, off):
            gen.client.close()  # type: ignore[attr-defined]
    print(
        f"\n### bench_prefix ({datetime.now():%Y-%m-%d %H:%M}, SmolLM2-135M, 2 peers behind "
        f"{args.delay_ms:g} ms one-way links, {args.rounds} rounds, median (min-max); wrong "
        f"replies: {wrong})\n"
    )
    print("\n".join(out))


if __name__ == "__main__":
    main()
