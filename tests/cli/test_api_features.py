"""`swarm-api --local` driven by the official `openai` client: logprobs (checked against the
local engine's own logits), structured output and tool calls."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from layerswarm.cli.api_logprobs import TokenTexts
from layerswarm.routing.generate import Generator
from layerswarm.routing.local import open_local_generator

openai = pytest.importorskip("openai")

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
STORY = [{"role": "user", "content": "Tell me a short story about a cat."}]


@pytest.fixture(scope="module")
def local_url(smollm2_dir: Path, open_api: Any) -> Iterator[str]:
    with open_api(smollm2_dir, [], ("--local",)) as url:
        yield url


@pytest.fixture(scope="module")
def client(local_url: str) -> Any:
    return openai.OpenAI(base_url=local_url, api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(client: Any) -> str:
    return str(client.models.list().data[0].id)


@pytest.fixture(scope="module")
def engine(smollm2_dir: Path) -> Generator:
    return open_local_generator(smollm2_dir)


def reference_logits(engine: Generator, ids: list[int]) -> torch.Tensor:
    """The local engine's next-token logits `(len(ids), vocab)` after each prefix of `ids`."""

    async def run() -> torch.Tensor:
        pipeline = await engine.open_pipeline(len(ids) + 1)
        try:
            return await pipeline.aforward(engine._embed(ids), 0)
        finally:
            await pipeline.aclose()

    hidden = engine.net.run(run())
    return engine.head.logits(hidden)[0].float()


def token_ids(engine: Generator) -> dict[bytes, int]:
    texts = TokenTexts(engine.tokenizer)
    vocab = engine.tokenizer.tokenizer.get_vocab_size()
    return {texts.bytes_of(i): i for i in reversed(range(vocab))}


def expected_logprobs(
    logits: torch.Tensor, reply: list[int], temperature: float, presence: float
) -> torch.Tensor:
    """OpenAI's sampling distribution at each reply position, as log-probabilities."""
    rows = []
    for i, row in enumerate(logits):
        seen = torch.zeros_like(row)
        seen[list(set(reply[:i]))] = 1.0
        rows.append(torch.log_softmax((row - presence * seen) / temperature, dim=-1))
    return torch.stack(rows)


def test_chat_logprobs_are_the_sampled_distributions(
    client: Any, model: str, engine: Generator
) -> None:
    args: dict[str, Any] = {
        "model": model,
        "messages": STORY,
        "max_tokens": 12,
        "temperature": 0.8,
        "presence_penalty": 0.5,
        "seed": 7,
        "logprobs": True,
        "top_logprobs": 5,
    }
    whole = client.chat.completions.create(**args)
    content = whole.choices[0].logprobs.content
    assert len(content) == whole.usage.completion_tokens == 12
    assert "".join(e.token for e in content) == whole.choices[0].message.content
    ids = token_ids(engine)
    reply = [ids[bytes(e.bytes)] for e in content]
    prompt = engine.tokenizer.encode_chat(STORY)
    logits = reference_logits(engine, prompt + reply)[len(prompt) - 1 : -1]
    expected = expected_logprobs(logits, reply, 0.8, 0.5)
    for i, entry in enumerate(content):
        assert entry.logprob == pytest.approx(float(expected[i, reply[i]]), abs=2e-3)
        top = torch.topk(expected[i], 5)
        assert [ids[bytes(t.bytes)] for t in entry.top_logprobs][:2] == top.indices[:2].tolist()
        got = [t.logprob for t in entry.top_logprobs]
        assert got == pytest.approx(top.values.tolist(), abs=2e-3)
    # Streamed, with the same seed: the same tokens, their logprobs in the chunks.
    chunks = list(client.chat.completions.create(**args, stream=True))
    streamed = [
        e
        for c in chunks
        if c.choices and c.choices[0].logprobs
        for e in c.choices[0].logprobs.content
    ]
    assert [e.token for e in streamed] == [e.token for e in content]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content], abs=1e-4)


def test_completion_logprobs_under_greedy_decoding(client: Any, model: str) -> None:
    reply = client.completions.create(
        model=model, prompt="The capital of France is", max_tokens=6, temperature=0, logprobs=3
    )
    choice = reply.choices[0]
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert "".join(lp.tokens) == choice.text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(top) == 3 and max(top.values()) == pytest.approx(logprob)  # greedy: the top
        assert top[token] == pytest.approx(logprob)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model, messages=FRANCE, top_logprobs=21, logprobs=True)
    assert e.value.body["param"] == "top_logprobs"


def test_no_logprobs_unless_asked(client: Any, model: str) -> None:
    reply = client.chat.completions.create(
        model=model, messages=FRANCE, max_tokens=4, temperature=0
    )
    assert reply.choices[0].logprobs is None
