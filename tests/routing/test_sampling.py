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


def test_logprobs_are_noted_for_each_chosen_token_only_when_asked() -> None:
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    quiet = Sampler(SamplingConfig())
    quiet(logits, [])
    assert quiet.logprobs == []
    greedy = Sampler(SamplingConfig(logprobs=2))
    assert greedy(logits, []) == 0
    (note,) = greedy.logprobs
    expected = torch.log_softmax(logits, dim=-1)  # greedy: the distribution at temperature 1
    assert note.token == 0 and note.logprob == pytest.approx(float(expected[0]))
    assert [t for t, _ in note.top] == [0, 1]
    assert note.top[1][1] == pytest.approx(float(expected[1]))


def test_sampled_logprobs_are_those_of_the_processed_distribution() -> None:
    config = SamplingConfig(temperature=0.5, top_k=2, presence_penalty=1.0, logprobs=3, seed=1)
    sampler = Sampler(config, prompt_tokens=1)
    logits = torch.tensor([2.0, 1.5, 0.0, -1.0])
    token = sampler(logits, [3, 0])  # the reply so far: [0], so 0 loses 1.0 before temperature
    (note,) = sampler.logprobs
    kept = torch.log_softmax(torch.tensor([1.0, 1.5]) / 0.5, dim=-1)  # top-k keeps 0 and 1
    assert note.token == token
    assert [t for t, _ in note.top[:2]] == [1, 0]
    assert [lp for _, lp in note.top[:2]] == pytest.approx([float(kept[1]), float(kept[0])])
    assert note.top[2][1] == float("-inf")  # cut by top-k


def test_speculative_verification_notes_the_tokens_it_yields() -> None:
    from layerswarm.routing.speculative import Draft, verify

    sampler = Sampler(SamplingConfig(logprobs=0))
    logits = torch.full((4, 10), -1.0)
    for row, best in enumerate([5, 6, 1, 2]):
        logits[row, best] = 1.0
    assert verify(sampler, logits, [0], Draft([5, 6, 7])) == [5, 6, 1]
    assert [n.token for n in sampler.logprobs] == [5, 6, 1]
    assert all(n.top == [] for n in sampler.logprobs)
