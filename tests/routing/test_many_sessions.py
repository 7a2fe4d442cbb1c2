"""Many sessions at once through a real 2-peer swarm: each gets the tokens it gets alone, and
sessions that decode go on while another client's long prompt prefills."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from layerswarm import AsyncClient, Client
from layerswarm.peer.launch import LocalSwarm, start_peers
from layerswarm.routing.sampling import SamplingConfig
from layerswarm.shards.config import Span

TOPICS = [
    "the sea", "a mountain", "the moon", "a city", "bread", "a river", "winter", "a violin",
    "the desert", "a library", "rain", "a garden", "the stars", "a train", "coffee", "a forest",
]  # fmt: skip


@pytest.fixture(scope="module")
def two_peers(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSwarm]:
    spans = [Span(0, 15), Span(15, 30)]
    with start_peers(smollm2_dir, spans, tmp_path_factory.mktemp("many")) as swarm:
        yield swarm


@pytest.fixture(scope="module")
def client(smollm2_dir: Path, two_peers: LocalSwarm) -> Iterator[Client]:
    with Client.connect(str(smollm2_dir), peers=two_peers.addresses, temperature=0) as c:
        yield c


def test_sixteen_sessions_at_once_get_the_tokens_they_get_alone(client: Client) -> None:
    prompts = [f"Write one sentence about {topic}." for topic in TOPICS]
    alone = [client.generate(p, max_new_tokens=12) for p in prompts]

    async def together() -> list[str]:
        return await AsyncClient(client).generate_batch(prompts, max_new_tokens=12)

    assert asyncio.run(together()) == alone
    assert len(set(alone)) > 8  # different replies: a mix-up between sessions would show


def test_sessions_keep_decoding_while_another_client_prefills_2000_tokens(
    client: Client,
) -> None:
    gen = client.generator
    long_prompt = gen.tokenizer.encode("The sea was calm and the sky was grey. " * 250)[:2000]
    assert len(long_prompt) == 2000
    short = [gen.tokenizer.encode(f"A long story about {topic}:") for topic in TOPICS[:4]]
    endless = SamplingConfig(max_new_tokens=1000, temperature=0)
    stamps: list[list[float]] = [[] for _ in short]
    prefill: dict[str, float] = {}
    done = asyncio.Event()

    async def decode(ids: list[int], times: list[float]) -> None:
        tokens = gen.net.iterate(gen.atokens(ids, endless))
        try:
            async for _ in tokens:
                times.append(time.monotonic())
                if done.is_set():
                    return
        finally:
            await tokens.aclose()  # type: ignore[attr-defined]

    async def prefill_long() -> None:
        while min(len(t) for t in stamps) < 3:  # every decoder is under way
            await asyncio.sleep(0.01)
        prefill["start"] = time.monotonic()
        tokens = gen.net.iterate(gen.atokens(long_prompt, SamplingConfig(max_new_tokens=1)))
        async for _ in tokens:
            prefill["first_token"] = time.monotonic()
        done.set()

    async def main() -> None:
        await asyncio.gather(
            prefill_long(), *(decode(i, t) for i, t in zip(short, stamps, strict=True))
        )

    asyncio.run(main())
    during = [sum(prefill["start"] < t < prefill["first_token"] for t in times) for times in stamps]
    # Each decoder got tokens while the 2,000-token prompt went through: chunked prefill beside
    # decode, not a 2,000-token step that freezes everyone behind it.
    assert min(during) >= 3, during
