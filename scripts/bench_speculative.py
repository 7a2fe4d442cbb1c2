"""Benchmark speculative decoding through a swarm on loopback: tokens per pass and tok/s.

Two peer processes (halves of SmolLM2's layers, fp32) on loopback, and one client that decodes
greedy replies to two kinds of prompt:
- edit: a paragraph to return with its spelling fixed (the reply repeats most of its input);
- chat: a free question (the reply repeats little).
Each with: no speculation, prompt lookup, and a draft model in the client (by default SmolLM2
itself, fp32, whole in the client: the best guesser this CPU has; `--draft-quant int8` for a
cheaper one). Systems are interleaved within each round (A B C A B C), and each speculative
reply is checked against the plain one of its round (greedy: they must be identical).

Loopback is speculation's worst case: a round trip costs ~1 ms, so a pass costs its compute,
and a pass of k+1 positions costs more than one of 1. Over a real link every pass saves
`2 x hops` crossings per extra token (`scripts/bench_network.py` measures that).

    python scripts/bench_speculative.py [--rounds 3] [--max-new-tokens 96] [--draft-quant none]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchlib import spread

from layerswarm.cli.common import default_cache_dir, resolve_model_cli
from layerswarm.peer.launch import start_peers
from layerswarm.routing.drafters import open_speculator
from layerswarm.routing.generate import Generator
from layerswarm.routing.sampling import SamplingConfig
from layerswarm.routing.speculative import Speculator
from layerswarm.routing.swarm_client import open_swarm_generator
from layerswarm.shards.config import Span

PARAGRAPH = (
    "The lighthouse keeper climbed the stairs every evening at dusk. He checked the lamp, "
    "wiped the glas, and wrote the weather in his log. One nigth a storm came from the west, "
    "and the waves rose higher than the rocks. He kept the light burning until the morning, "
    "when the fishing boats came home safely."
)
PROMPTS = {
    "edit": "Fix the spelling mistakes in this paragraph and write it out in full:\n\n" + PARAGRAPH,
    "chat": "What should I pack for a weekend of hiking in the mountains?",
}


@dataclass
class Result:
    """Replies of one system to one prompt, a round each."""

    speeds: list[float] = field(default_factory=list)  # unit: tokens/s, whole reply
    per_pass: list[float] = field(default_factory=list)  # unit: tokens a pipeline pass
    ratios: list[float] = field(default_factory=list)  # unit: x plain's speed, same round
    identical: int = 0  # unit: replies equal to plain's of the same round


def reply(gen: Generator, prompt: str, cfg: SamplingConfig) -> tuple[list[int], float]:
    ids = gen.tokenizer.encode_chat([{"role": "user", "content": prompt}])
    t0 = time.perf_counter()
    tokens = list(gen.tokens(ids, cfg))
    return tokens, len(tokens) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--draft-quant", choices=("none", "int8", "int4"), default="none")
    args = ap.parse_args()
    model_dir = resolve_model_cli(args.model, default_cache_dir())
    cfg = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=0.0)
    spans = [Span(0, 15), Span(15, 30)]
    with tempfile.TemporaryDirectory() as tmp, start_peers(model_dir, spans, Path(tmp)) as swarm:
        gen = open_swarm_generator(model_dir, swarm.addresses)
        systems: dict[str, Speculator | None] = {
            "plain": None,
            "lookup": open_speculator(gen, "lookup", model_dir),
            f"draft ({args.draft_quant})": open_speculator(
                gen, "draft", model_dir, None, args.draft_quant
            ),
        }
        results = {(p, s): Result() for p in PROMPTS for s in systems}
        for prompt in PROMPTS.values():  # warm-up: first replies pay one-off costs
            reply(gen, prompt, SamplingConfig(max_new_tokens=4, temperature=0.0))
        for r in range(args.rounds):
            for kind, prompt in PROMPTS.items():
                plain: list[int] = []
                plain_speed = 0.0
                for name, speculator in systems.items():
                    gen.speculator = speculator
                    tokens, speed = reply(gen, prompt, cfg)
                    if speculator is None:
                        plain, plain_speed = tokens, speed
                    res = results[kind, name]
                    res.speeds.append(speed)
                    res.per_pass.append(gen.last_stats.tokens_per_pass)
                    res.ratios.append(speed / plain_speed)
                    res.identical += tokens == plain
                    print(
                        f"round {r + 1} {kind} {name}: {len(tokens)} tokens, {speed:.1f} tok/s, "
                        f"{gen.last_stats.tokens_per_pass:.2f} a pass",
                        file=sys.stderr,
                    )
        gen.client.close()  # type: ignore[attr-defined]
    print(
        f"\n{args.model} fp32, 2 peers on loopback, greedy replies of up to "
        f"{args.max_new_tokens} tokens, {args.rounds} rounds (median [min..max])\n"
    )
    print("| prompt | system | tok/s | x plain (same round) | tokens a pass | identical |")
    print("|---|---|---|---|---|---|")
    for (kind, name), res in results.items():
        print(
            f"| {kind} | {name} | {_spread(res.speeds, '.1f')} | {_spread(res.ratios, '.2f')} "
            f"| {statistics.median(res.per_pass):.2f} | {res.identical}/{args.rounds} |"
        )


def _spread(values: list[float], fmt: str) -> str:
    return spread(values, fmt, brackets="[]", alone=False)


if __name__ == "__main__":
    main()
