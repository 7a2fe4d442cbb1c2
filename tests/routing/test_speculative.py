"""Speculative decoding: the guesses, their verification, and replies equal to plain decoding."""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import torch

from layerswarm.errors import CacheFull, ModelFormatError
from layerswarm.routing import speculative
from layerswarm.routing.conversation import ChatSession
from layerswarm.routing.drafters import lookup, open_speculator
from layerswarm.routing.generate import Generator
from layerswarm.routing.kept_inputs import truncate_inputs
from layerswarm.routing.local import open_local_generator
from layerswarm.routing.sampling import Sampler, SamplingConfig
from layerswarm.routing.speculative import (
    Draft,
    Drafter,
    DraftLength,
    SpeculationConfig,
    Speculator,
    verify,
)

GREEDY = SamplingConfig(max_new_tokens=40, temperature=0.0)


def prompts(n: int = 3) -> list[list[int]]:
    """Token ids of the tiny model: random ones, with a repeat for lookup to find."""
    out = []
    for seed in range(n):
        rnd = random.Random(seed)
        ids = [rnd.randrange(3, 256) for _ in range(12)]
        out.append(ids + ids[:6])
    return out


def test_lookup_continues_the_latest_match_of_the_longest_end() -> None:
    context = [1, 2, 3, 9, 9, 5, 2, 3, 7, 8, 6, 2, 3]
    assert lookup(context, 2, max_ngram=3) == [7, 8]  # "2 3" last seen before "7 8"
    assert lookup([*context, 7], 4, max_ngram=3) == [8, 6, 2, 3]  # "2 3 7" matched
    assert lookup([5, 6, 7], 3, max_ngram=3) == []
    assert lookup([4, 4], 3, max_ngram=3) == [4]  # no more than the context holds


def test_greedy_verification_keeps_the_guesses_that_are_the_argmax_then_corrects() -> None:
    sampler = Sampler(GREEDY)
    logits = torch.full((4, 10), -1.0)
    for row, best in enumerate([5, 6, 1, 2]):
        logits[row, best] = 1.0
    assert verify(sampler, logits, [0], Draft([5, 6, 7])) == [5, 6, 1]
    assert verify(sampler, logits, [0], Draft([5, 6, 1])) == [5, 6, 1, 2]  # all, and one more
    assert verify(sampler, logits[:1], [0], Draft([])) == [5]


def test_draft_length_grows_while_guesses_stand_and_shrinks_when_they_fall() -> None:
    length = DraftLength(SpeculationConfig(first_draft=4, max_draft=8))
    length.update(4, 4)
    assert length.k == 6
    length.update(6, 6)
    length.update(8, 8)
    assert length.k == 8
    length.update(8, 2)
    assert length.k == 7
    length.update(0, 0)  # nothing guessed: no news
    assert length.k == 7


def test_kept_inputs_are_cut_at_a_rollback() -> None:
    a, b = torch.randn(1, 5, 2), torch.randn(1, 3, 2)
    cut = truncate_inputs([(0, a), (5, b)], 6)
    assert [(s, h.shape[1]) for s, h in cut] == [(0, 5), (5, 1)]
    assert torch.equal(cut[1][1], b[:, :1])
    assert truncate_inputs([(0, a), (5, b)], 5)[-1][0] == 0


# --- speculative sampling keeps the target distribution ---------------------------------------

VOCAB = 3
# The target's and the draft's next-token distributions, given the previous token (a Markov
# chain, so the joint of a reply's first tokens is a product of rows).
TARGET = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6], [0.35, 0.45, 0.2]])
DRAFT = torch.tensor([[0.2, 0.5, 0.3], [0.5, 0.4, 0.1], [0.3, 0.4, 0.3]])
SAMPLING = SamplingConfig(temperature=0.8, top_k=2, seed=7)  # the target: processed as sampled
REPLIES = 4000
LENGTH = 2  # tokens of each reply compared: 9 cells


def target_row(sampler: Sampler, prev: int, seen: list[int]) -> torch.Tensor:
    return sampler.probs(TARGET[prev].log(), seen)


def speculative_replies(guesses: str) -> Counter[tuple[int, ...]]:
    """The first `LENGTH` tokens of `REPLIES` replies, each in passes of 2 guesses verified.

    guesses: "draft" (drawn from DRAFT, with its distribution) or "lookup" (always token 1,
    a point mass).
    """
    sampler = Sampler(SAMPLING)
    counts: Counter[tuple[int, ...]] = Counter()
    for _ in range(REPLIES):
        context = [0]
        while len(context) <= LENGTH:
            tokens, rows = [], []
            for _ in range(2):
                if guesses == "lookup":
                    tokens.append(1)
                    continue
                q = DRAFT[[*context, *tokens][-1]]
                rows.append(q)
                tokens.append(int(torch.multinomial(q, 1, generator=sampler.generator)))
            seq = [*context, *tokens]
            logits = torch.stack([TARGET[seq[len(context) - 1 + i]].log() for i in range(3)])
            probs = torch.stack(rows) if rows else None
            context += verify(sampler, logits, context, Draft(tokens, probs))
        counts[tuple(context[1 : LENGTH + 1])] += 1
    return counts


def chi_square(counts: Counter[tuple[int, ...]]) -> tuple[float, float]:
    """(the statistic against the target's joint, the 1-in-10,000 critical value)."""
    sampler = Sampler(SAMPLING)
    stat, df = 0.0, -1
    for cell in itertools.product(range(VOCAB), repeat=LENGTH):
        p, prev, seen = 1.0, 0, [0]
        for token in cell:
            p *= float(target_row(sampler, prev, seen)[token])
            prev, seen = token, [*seen, token]
        expected = REPLIES * p
        if expected > 0:
            stat, df = stat + (counts[cell] - expected) ** 2 / expected, df + 1
        else:  # top-k left it out
            assert counts[cell] == 0, f"{cell} has no probability but came {counts[cell]} times"
    z = 3.72  # the normal quantile of 1e-4; Wilson-Hilferty's approximation of chi-square's
    return stat, df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize("guesses", ["draft", "lookup"])
def test_speculative_sampling_keeps_the_target_distribution(guesses: str) -> None:
    stat, critical = chi_square(speculative_replies(guesses))
    assert stat < critical, f"chi-square {stat:.1f} >= {critical:.1f}"


def test_the_distribution_test_catches_a_rejection_that_resamples_from_the_target(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A classic slip: after a rejected guess, draw from p instead of max(0, p - q).
    monkeypatch.setattr(speculative, "_residual", lambda p, *rest: p)
    stat, critical = chi_square(speculative_replies("draft"))
    assert stat > critical


# --- replies through the local engine ---------------------------------------------------------


@pytest.fixture(scope="module")
def local(tiny_words_dir: Path) -> Iterator[Generator]:
    yield open_local_generator(tiny_words_dir)


SPECULATORS = [("lookup", None), ("draft", None), ("draft", "int8")]


@pytest.mark.parametrize(("mode", "quant"), SPECULATORS)
def test_speculative_greedy_equals_plain_greedy_on_the_local_engine(
    local: Generator, tiny_words_dir: Path, mode: str, quant: str | None
) -> None:
    local.speculator = None
    plain = [list(local.tokens(p, GREEDY)) for p in prompts()]
    local.speculator = open_speculator(local, mode, tiny_words_dir, None, quant)
    try:
        passes = drafted = 0
        for p, expected in zip(prompts(), plain, strict=True):
            assert list(local.tokens(p, GREEDY)) == expected
            stats = local.last_stats
            passes += stats.passes
            drafted += stats.drafted_tokens
            assert stats.new_tokens == len(expected) and stats.tokens_per_pass > 1
        assert passes < sum(map(len, plain)) and drafted > 0
    finally:
        local.speculator = None


def test_a_speculative_conversation_reuses_its_session_and_equals_a_plain_one(
    local: Generator, tiny_words_dir: Path
) -> None:
    turns = [p[:10] for p in prompts(2)]

    def converse() -> tuple[list[list[int]], ChatSession]:
        chat, context, replies = ChatSession(local), [], []
        for turn in turns:
            context += turn
            reply = list(chat.tokens(context, GREEDY))
            replies.append(reply)
            context += reply
        return replies, chat

    local.speculator = None
    plain, chat = converse()
    chat.close()
    local.speculator = open_speculator(local, "lookup", tiny_words_dir)
    try:
        speculative, chat = converse()
        assert speculative == plain
        # The first turn and its reply are reused (its last token too, if it was a guess).
        assert chat.opened == 1
        assert local.last_stats.reused_tokens >= len(turns[0]) + len(plain[0]) - 1
        chat.close()
    finally:
        local.speculator = None


def test_a_draft_model_with_another_tokenizer_is_refused(
    local: Generator, smollm2_dir: Path
) -> None:
    with pytest.raises(ModelFormatError, match="another tokenizer"):
        open_speculator(local, "draft", smollm2_dir, smollm2_dir)


class DrafterThatFillsUp:
    """Test double: prompt lookup whose cache is full from its second call on."""

    def __init__(self) -> None:
        self.calls = 0

    async def draft(self, context: Sequence[int], k: int, sampler: Sampler) -> Draft:
        self.calls += 1
        if self.calls > 1:
            raise CacheFull("cache full: the draft model has no room")
        return Draft(lookup(context, k, 3))

    async def aclose(self) -> None:
        return None


def test_a_reply_goes_on_without_guesses_when_the_drafter_fails(local: Generator) -> None:
    drafter = DrafterThatFillsUp()

    async def open_drafter(max_length: int) -> Drafter:
        return drafter

    local.speculator = None
    expected = list(local.tokens(prompts(1)[0], GREEDY))
    local.speculator = Speculator(SpeculationConfig(), open_drafter)
    try:
        assert list(local.tokens(prompts(1)[0], GREEDY)) == expected
        assert drafter.calls == 2 and local.last_stats.passes > len(expected) / 2
    finally:
        local.speculator = None


@pytest.mark.parametrize(("mode", "quant"), [("lookup", None), ("draft", "int8")])
def test_speculative_sampling_through_the_local_engine_is_reproducible_with_a_seed(
    local: Generator, tiny_words_dir: Path, mode: str, quant: str | None
) -> None:
    sampling = SamplingConfig(max_new_tokens=24, temperature=0.9, top_p=0.95, seed=5)
    local.speculator = open_speculator(local, mode, tiny_words_dir, None, quant)
    try:
        first = list(local.tokens(prompts(1)[0], sampling))
        assert local.last_stats.drafted_tokens > 0
        assert list(local.tokens(prompts(1)[0], sampling)) == first
        assert len(first) == 24 or first[-1] in local.tokenizer.eos_ids
    finally:
        local.speculator = None
