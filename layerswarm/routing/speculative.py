"""Speculative decoding in the client: draft k tokens, verify them in one pass, keep what agrees.

The client holds the head, so it can guess the next tokens cheaply (`drafters`: prompt lookup, or
a small local model) and send the last token plus k guesses through the pipeline as one step of
k+1 positions. Each position's logits say whether its guess was right:
- greedy: a guess stands while it is the argmax; the first argmax that differs (or the one after
  the last guess) comes for free. The reply is the one plain greedy decoding gives.
- sampling: the rejection scheme of Leviathan et al. and Chen et al. (2023): a guess `d` drawn
  from the draft's distribution `q` stands with probability `min(1, p(d) / q(d))`; the first one
  that falls is replaced by a draw from `max(0, p - q)`, renormalized. Every token of the reply
  then follows the target distribution `p` (the sampler's: penalty, temperature, top-k, top-p).
Rejected positions are rolled back on the next step (`Pipeline.aforward` starting before the
session's end: `Step.truncate_to` on every peer). k adapts to how many guesses stand.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, NamedTuple, Protocol

import torch

from layerswarm.errors import LayerswarmError
from layerswarm.routing.sampling import Sampler, SamplingConfig

if TYPE_CHECKING:
    from concurrent.futures import Executor

    from layerswarm.routing.pipeline import GenerationStats, Pipeline
    from layerswarm.routing.text import ChatTokenizer
    from layerswarm.shards.blocks import ClientHead


class HeadHolder(Protocol):
    """What speculation needs of the generator (`generate.Generator`): its head, its
    tokenizer and the thread the head runs on."""

    head: ClientHead
    tokenizer: ChatTokenizer
    compute: Executor


log = logging.getLogger(__name__)

Mode = Literal["lookup", "draft"]
MODES: tuple[Mode, ...] = ("lookup", "draft")


@dataclass(frozen=True)
class SpeculationConfig:
    """How the client drafts and how many tokens it guesses a pass."""

    mode: Mode = "lookup"  # "lookup": n-grams of the context; "draft": a local draft model
    first_draft: int = 4  # unit: tokens guessed in a reply's first pass
    max_draft: int = 8  # unit: tokens guessed a pass at most
    max_ngram: int = 3  # unit: tokens, the longest end of the context lookup matches
    min_ngram: int = 1  # unit: tokens, the shortest

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown speculation {self.mode!r}; choose one of {MODES}")
        if not 1 <= self.first_draft <= self.max_draft:
            raise ValueError("need 1 <= first_draft <= max_draft")
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise ValueError("need 1 <= min_ngram <= max_ngram")


class Draft(NamedTuple):
    """Guessed tokens, and the distribution `(k, vocab)` each was drawn from (None: each was
    chosen for sure, as lookup and greedy drafting do)."""

    tokens: list[int]
    probs: torch.Tensor | None = None


class Drafter(Protocol):
    """Guesses the tokens that follow a context; one per reply."""

    async def draft(self, context: Sequence[int], k: int, sampler: Sampler) -> Draft: ...

    async def aclose(self) -> None: ...


OpenDrafter = Callable[[int], Awaitable[Drafter]]  # max_length -> a drafter for one reply
Forward = Callable[[Sequence[int], int], Awaitable[torch.Tensor]]


@dataclass
class Speculator:
    """What a `Generator` needs to speculate: the settings, and a drafter per reply."""

    config: SpeculationConfig
    open_drafter: OpenDrafter


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens `a` and `b` share."""
    if len(a) <= len(b) and list(a) == list(b[: len(a)]):  # the common case, at C speed
        return len(a)
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class HeldSequence:
    """A pipeline and the token ids whose keys it holds: each call runs what a sequence adds,
    after rolling back where it differs from what is held."""

    def __init__(self, pipeline: Pipeline, embed: Callable[[Sequence[int]], torch.Tensor]) -> None:
        self.pipeline = pipeline
        self.embed = embed
        self.held: list[int] = []

    async def __call__(self, seq: Sequence[int], n: int) -> torch.Tensor:
        """Hidden states `(1, n, hidden)` of the last `n` tokens of `seq` after every layer."""
        start = min(common_prefix(self.held, seq), len(seq) - n)
        hidden = await self.pipeline.aforward(self.embed(seq[start:]), start)
        self.held = list(seq)
        return hidden[:, -n:]


class DraftLength:
    """k, adapted to the acceptance: two more after a pass whose guesses all stood, one fewer
    after one that lost some (the schedule of transformers' assisted generation)."""

    def __init__(self, config: SpeculationConfig) -> None:
        self.k = config.first_draft
        self.most = config.max_draft

    def update(self, drafted: int, accepted: int) -> None:
        if drafted == 0:
            return
        self.k = min(self.k + 2, self.most) if accepted == drafted else max(1, self.k - 1)


def verify(
    sampler: Sampler, logits: torch.Tensor, context: Sequence[int], draft: Draft
) -> list[int]:
    """The tokens a verification pass yields: the guesses that stand, then one more.

    Args:
        logits: `(k + 1, vocab)`: row i is the model's next-token logits after
            `context + draft.tokens[:i]`.
    Returns:
        Between 1 and k + 1 tokens.
    """
    greedy = sampler.config.temperature == 0
    out: list[int] = []
    seen = list(context)
    for i, guess in enumerate([*draft.tokens, None]):
        # Masked by the constraint's state after out[:i]: a forbidden guess cannot stand.
        row = sampler.constrained(logits[i])
        if greedy:
            token = sampler.greedy(row, seen)
            out.append(token)
            sampler.settle(token, row, seen)
            if token != guess:
                return out
        else:
            p = sampler.probs(row, seen)
            if guess is None:
                out.append(_draw(p, sampler))
                sampler.settle(out[-1], row, seen, p)
                return out
            q = 1.0 if draft.probs is None else float(draft.probs[i, guess])
            if float(torch.rand((), generator=sampler.generator)) * q < float(p[guess]):
                out.append(guess)
                sampler.settle(guess, row, seen, p)
            else:
                out.append(_draw(_residual(p, draft, i, guess), sampler))
                sampler.settle(out[-1], row, seen, p)
                return out
        seen.append(out[-1])
    raise AssertionError("unreachable: the last row always yields a token")


def _residual(p: torch.Tensor, draft: Draft, i: int, guess: int) -> torch.Tensor:
    """`max(0, p - q)` for a rejected guess (q a point mass on it when no distribution)."""
    if draft.probs is None:
        rest = p.clone()
        rest[guess] = 0.0
    else:
        rest = (p - draft.probs[i].to(p.device, p.dtype)).clamp_(min=0.0)
    return rest if float(rest.sum()) > 0 else p  # only rounding empties it


def _draw(probs: torch.Tensor, sampler: Sampler) -> int:
    return int(torch.multinomial(probs.cpu(), 1, generator=sampler.generator))


async def speculative_tokens(
    gen: HeadHolder,
    drafter: Drafter,
    config: SpeculationConfig,
    forward: Forward,
    prompt: Sequence[int],
    steps: int,
    sampling: SamplingConfig,
    stats: GenerationStats,
    sampler: Sampler | None = None,
) -> AsyncGenerator[int, None]:
    """Up to `steps` new tokens after `prompt` (EOS included, then stop), several a pass.

    `forward(seq, n)` runs `seq` through the layers (what the pipeline does not hold of it,
    rolling back where it differs) and returns the last `n` positions' hidden states.
    `sampler`: the reply's (its logprobs, its grammar); None: a new one for `sampling`.
    """
    sampler = sampler or Sampler(sampling, len(prompt))
    context = list(prompt)
    end = len(context) + steps
    draft_length = DraftLength(config)
    drafting = True
    loop = asyncio.get_running_loop()
    t0 = time.perf_counter()
    while len(context) < end:
        k = min(draft_length.k, end - len(context) - 1)  # a pass yields up to k + 1 tokens
        draft = Draft([])
        if k > 0 and drafting:
            try:
                draft = await drafter.draft(context, k, sampler)
            except LayerswarmError as e:  # the draft model's cache is full, say: go on without
                log.warning("speculation stops for this reply: the drafter failed (%s)", e)
                drafting = False
        n = len(draft.tokens) + 1
        hidden = await forward([*context, *draft.tokens], n)  # (1, n, hidden)
        tokens = await loop.run_in_executor(
            gen.compute, _verify_on_head, gen, sampler, hidden, context, draft
        )
        draft_length.update(len(draft.tokens), len(tokens) - 1)
        stats.passes += 1
        stats.drafted_tokens += len(draft.tokens)
        stats.accepted_tokens += len(tokens) - 1
        for token in tokens:
            t0 = _count(stats, t0)
            context.append(token)
            yield token
            if token in gen.tokenizer.eos_ids:
                return


def _verify_on_head(
    gen: HeadHolder, sampler: Sampler, hidden: torch.Tensor, context: list[int], draft: Draft
) -> list[int]:
    logits = gen.head.logits(hidden)[0]  # (k + 1, vocab) fp32
    return verify(sampler, logits, context, draft)


def _count(stats: GenerationStats, t0: float) -> float:
    """A token that came `t0` .. now (its pass's later tokens come at no extra time)."""
    now = time.perf_counter()
    if stats.new_tokens == 0:
        stats.prefill_seconds = now - t0
    else:
        stats.decode_seconds += now - t0
    stats.new_tokens += 1
    return now
