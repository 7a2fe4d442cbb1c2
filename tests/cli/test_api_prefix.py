"""The peers' shared KV pages as `swarm-api`'s users meet them, through the official `openai`
client in front of two SmolLM2 peers: a long system prompt sent again costs no prefill of it,
`n` choices cost one prefill, and the replies equal the local engine's, which computes all."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from layerswarm.peer.launch import LocalSwarm, start_peers
from layerswarm.routing.generate import Generator
from layerswarm.routing.local import open_local_generator
from layerswarm.routing.sampling import SamplingConfig
from layerswarm.shards.config import Span
from layerswarm.swarm.dial import open_connection
from layerswarm.swarm.identity import generate_identity
from layerswarm.swarm.protocol import InfoReply, InfoRequest
from layerswarm.swarm.transport import TransportConfig, new_event_loop, parse_address

openai = pytest.importorskip("openai")

# About 1,100 tokens of instructions, as an agent's system prompt is.
SYSTEM = " ".join(
    f"Rule {i}: keep every answer short, polite and about the question asked." for i in range(80)
)
QUESTIONS = ["What is the capital of France?", "Name a large animal."]


@pytest.fixture(scope="module")
def swarm(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSwarm]:
    spans = [Span(0, 15), Span(15, 30)]
    with start_peers(smollm2_dir, spans, tmp_path_factory.mktemp("prefix")) as s:
        yield s


@pytest.fixture(scope="module")
def client(smollm2_dir: Path, swarm: LocalSwarm, open_api: Any) -> Iterator[Any]:
    with open_api(smollm2_dir, swarm.addresses) as url:
        yield openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def engine(smollm2_dir: Path) -> Generator:
    return open_local_generator(smollm2_dir)


def counters(swarm: LocalSwarm) -> list[dict[str, Any]]:
    """Each peer's counters (`InfoReply.extra`)."""

    async def ask(address: str) -> dict[str, Any]:
        conn = await open_connection(parse_address(address), generate_identity(), TransportConfig())
        async with conn:
            info = await conn.request(InfoRequest())
        assert isinstance(info, InfoReply)
        return dict(info.extra)

    async def all_of() -> list[dict[str, Any]]:
        return [await ask(a) for a in swarm.addresses]

    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(all_of())


def delta(before: list[dict[str, Any]], after: list[dict[str, Any]], key: str) -> list[int]:
    return [int(a[key]) - int(b[key]) for b, a in zip(before, after, strict=True)]


def local_reply(engine: Generator, messages: list[dict[str, str]], max_tokens: int) -> str:
    sampling = SamplingConfig(max_new_tokens=max_tokens, temperature=0.0)
    return "".join(engine.chat(messages, sampling))


def test_a_long_system_prompt_sent_again_is_taken_from_the_peers_pages(
    client: Any, swarm: LocalSwarm, engine: Generator
) -> None:
    model = str(client.models.list().data[0].id)
    prompt_tokens, cached = [], []
    for question in QUESTIONS:
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
        before = counters(swarm)
        reply = client.chat.completions.create(
            model=model, messages=messages, max_tokens=12, temperature=0
        )
        after = counters(swarm)
        assert reply.choices[0].message.content == local_reply(engine, messages, 12)
        prompt_tokens.append(reply.usage.prompt_tokens)
        cached.append(delta(before, after, "cached_tokens"))
    assert prompt_tokens[0] > 1000
    assert cached[0] == [0, 0]  # nothing kept yet
    # The second question shares the system prompt: every peer took its pages, all but the
    # part of the last page where the questions differ.
    assert all(prompt_tokens[0] - 48 <= c < prompt_tokens[1] for c in cached[1]), cached


def test_n_choices_cost_one_prefill_and_greedy_ones_equal_the_local_engine(
    client: Any, swarm: LocalSwarm, engine: Generator
) -> None:
    model = str(client.models.list().data[0].id)
    messages = [{"role": "user", "content": "Tell me a short story about a cat. " * 8}]
    before = counters(swarm)
    sampled = client.chat.completions.create(
        model=model, messages=messages, max_tokens=10, temperature=1.0, seed=5, n=3
    )
    after = counters(swarm)
    assert len(sampled.choices) == 3
    assert len({c.message.content for c in sampled.choices}) > 1
    assert delta(before, after, "forked_sessions") == [2, 2]  # each peer forked twice
    prompt = sampled.usage.prompt_tokens
    # One prefill of the prompt, then each choice's own decode steps (its first token comes
    # from the shared prefill): well under the 3 prefills that separate sessions would cost.
    computed = delta(before, after, "computed_tokens")
    assert all(c <= prompt + sampled.usage.completion_tokens for c in computed), computed

    greedy = client.chat.completions.create(
        model=model, messages=messages, max_tokens=10, temperature=0, n=2
    )
    expected = local_reply(engine, messages, 10)
    assert [c.message.content for c in greedy.choices] == [expected, expected]
