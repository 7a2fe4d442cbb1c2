"""The sampler's penalties, on hand-made logits."""

from __future__ import annotations

import pytest
import torch

from layerswarm.routing.sampling import Sampler, SamplingConfig


def test_presence_and_frequency_penalties_follow_openai_on_the_reply_only() -> None:
    config = SamplingConfig(presence_penalty=0.5, frequency_penalty=0.25)
    logits = torch.zeros(6)
    # The prompt is [3, 3, 4]; the reply so far [1, 1, 1, 2].
    got = Sampler(config, prompt_tokens=3).penalized(logits, [3, 3, 4, 1, 1, 1, 2])
    # OpenAI: logit[j] -= count[j] * frequency + (count[j] > 0) * presence, counts of the reply.
    expected = torch.tensor([0.0, -(3 * 0.25 + 0.5), -(0.25 + 0.5), 0.0, 0.0, 0.0])
    assert torch.allclose(got, expected)


def test_a_negative_presence_penalty_makes_greedy_repeat_a_token_of_the_reply() -> None:
    logits = torch.tensor([1.0, 0.9, 0.0])
    plain = Sampler(SamplingConfig(), prompt_tokens=1)
    keen = Sampler(SamplingConfig(presence_penalty=-0.5), prompt_tokens=1)
    assert plain.greedy(logits, [0, 1]) == 0
    assert keen.greedy(logits, [0, 1]) == 1  # 0 is the prompt's, so gets no boost


def test_a_frequency_penalty_moves_sampled_mass_away_from_repeated_tokens() -> None:
    sampler = Sampler(SamplingConfig(temperature=1.0, frequency_penalty=2.0), prompt_tokens=0)
    probs = sampler.probs(torch.zeros(4), [0, 0, 0, 1])
    assert probs[0] < probs[1] < probs[2] == probs[3]


@pytest.mark.parametrize("field", ["presence_penalty", "frequency_penalty"])
def test_penalties_out_of_openais_range_are_refused(field: str) -> None:
    with pytest.raises(ValueError):
        SamplingConfig(**{field: 2.5})
