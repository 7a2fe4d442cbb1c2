"""Grammar-constrained sampling over SmolLM2's tokenizer, on random logits: what comes out
follows the grammar, however the logits lean, and speculation never keeps a forbidden guess."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import torch

from layerswarm.routing.grammar import (
    Grammar,
    GrammarError,
    GrammarTokenizer,
    choice_grammar,
    grammar_tokenizer,
    json_schema_grammar,
)
from layerswarm.routing.sampling import Sampler, SamplingConfig
from layerswarm.routing.speculative import Draft, verify
from layerswarm.routing.text import ChatTokenizer

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "kind": {"enum": ["cat", "dog"]},
        "ages": {"type": "array", "items": {"type": "integer"}, "maxItems": 3},
    },
    "required": ["name", "kind", "ages"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir: Path) -> ChatTokenizer:
    return ChatTokenizer(smollm2_dir)


@pytest.fixture(scope="module")
def gtok(tokenizer: ChatTokenizer) -> GrammarTokenizer:
    return grammar_tokenizer(tokenizer)


def sample(tokenizer: ChatTokenizer, sampler: Sampler, vocab: int, steps: int = 200) -> str:
    out: list[int] = []
    rng = torch.Generator().manual_seed(0)
    for _ in range(steps):
        token = sampler(torch.randn(vocab, generator=rng) * 3, out)
        if token in tokenizer.eos_ids:
            break
        out.append(token)
    return tokenizer.decode(out)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_random_logits_under_a_schema_give_json_that_validates(
    tokenizer: ChatTokenizer, gtok: GrammarTokenizer, temperature: float
) -> None:
    grammar = Grammar(gtok, json_schema_grammar(SCHEMA))
    sampler = Sampler(SamplingConfig(temperature=temperature, seed=3), 0, grammar)
    text = sample(tokenizer, sampler, gtok.vocab)
    jsonschema.validate(json.loads(text), SCHEMA)
    assert grammar.complete


def test_a_choice_grammar_gives_one_of_the_choices(
    tokenizer: ChatTokenizer, gtok: GrammarTokenizer
) -> None:
    grammar = Grammar(gtok, choice_grammar(["yes", "no", "maybe"]))
    text = sample(tokenizer, Sampler(SamplingConfig(), 0, grammar), gtok.vocab)
    assert text in ("yes", "no", "maybe")


def test_speculation_never_keeps_a_guess_the_grammar_forbids(
    tokenizer: ChatTokenizer, gtok: GrammarTokenizer
) -> None:
    brace = tokenizer.encode("{")
    assert len(brace) == 1
    plain = tokenizer.encode("Hello")[0]
    for temperature in (0.0, 1.0):
        grammar = Grammar(gtok, json_schema_grammar({"type": "object"}))
        sampler = Sampler(SamplingConfig(temperature=temperature, seed=1), 0, grammar)
        logits = torch.zeros(2, gtok.vocab)
        logits[:, plain] = 50.0  # the model (and the guess) would say "Hello"
        out = verify(sampler, logits, [], Draft([plain]))
        assert out[0] != plain and len(out) == 1
        assert tokenizer.decode(out).startswith("{")


def test_a_bad_schema_is_refused(gtok: GrammarTokenizer) -> None:
    with pytest.raises(GrammarError):
        Grammar(gtok, json_schema_grammar({"type": "no-such-type"}))
