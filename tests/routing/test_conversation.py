"""A chat session kept open between turns sends only each turn's new tokens, and replies as a
fresh generation over the whole conversation would."""

from __future__ import annotations

from pathlib import Path

import pytest

from layerswarm.errors import PeerUnavailable
from layerswarm.routing.conversation import ChatSession
from layerswarm.routing.generate import Generator
from layerswarm.routing.local import open_local_generator
from layerswarm.routing.sampling import SamplingConfig
from layerswarm.routing.text import Message

GREEDY = SamplingConfig(max_new_tokens=24, temperature=0.0)


@pytest.fixture(scope="module")
def local(smollm2_dir: Path) -> Generator:
    return open_local_generator(smollm2_dir)


def two_turns(chat: ChatSession) -> tuple[list[Message], str]:
    messages: list[Message] = [{"role": "user", "content": "The secret word is 'banana'."}]
    messages.append({"role": "assistant", "content": "".join(chat.chat(messages, GREEDY))})
    messages.append({"role": "user", "content": "What is the secret word?"})
    return messages, "".join(chat.chat(messages, GREEDY))


def test_second_turn_sends_only_new_tokens_and_matches_a_fresh_generation(
    local: Generator,
) -> None:
    chat = ChatSession(local)
    messages: list[Message] = [{"role": "user", "content": "The secret word is 'banana'."}]
    first = "".join(chat.chat(messages, GREEDY))
    held = len(chat.sent)
    forwarded = chat.forwarded
    messages += [
        {"role": "assistant", "content": first},
        {"role": "user", "content": "What is the secret word?"},
    ]
    ids = local.tokenizer.encode_chat(messages)
    assert ids[:held] == chat.sent  # the reply re-tokenizes as generated: the cache is reused
    second = "".join(chat.chat(messages, GREEDY))
    assert chat.opened == 1
    assert local.last_stats.reused_tokens == held
    # The new turn's suffix once, then one token per decode step after the first.
    assert chat.forwarded - forwarded == len(ids) - held + local.last_stats.new_tokens - 1
    assert second == "".join(local.chat(messages, GREEDY))
    assert "banana" in second  # SmolLM2-135M answers it from the first turn only
    chat.close()
    assert chat.pipeline is None


def test_changed_conversation_starts_over(local: Generator) -> None:
    chat = ChatSession(local)
    messages, _ = two_turns(chat)
    system: list[Message] = [{"role": "system", "content": "Answer in one word."}]
    reply = "".join(chat.chat(system + messages, GREEDY))
    assert chat.opened == 2
    assert local.last_stats.reused_tokens == 0
    assert reply == "".join(local.chat(system + messages, GREEDY))


class BreaksOnce:
    """A pipeline that fails (as if its peer were lost for good) on its second forward."""

    def __init__(self, inner: object, calls: list[int]) -> None:
        self.inner = inner
        self.calls = calls

    async def aforward(self, hidden, start):  # type: ignore[no-untyped-def]
        self.calls.append(start)
        if len(self.calls) == 2:
            raise PeerUnavailable("peer gone")
        return await self.inner.aforward(hidden, start)  # type: ignore[attr-defined]

    async def aclose(self) -> None:
        await self.inner.aclose()  # type: ignore[attr-defined]


def test_broken_pipeline_is_rebuilt_by_replaying(local: Generator) -> None:
    calls: list[int] = []

    async def open_flaky(n: int) -> BreaksOnce:
        return BreaksOnce(await local.open_pipeline(n), calls)

    flaky = Generator(local.head, local.tokenizer, open_flaky)
    chat = ChatSession(flaky)
    messages: list[Message] = [{"role": "user", "content": "What is the capital of France?"}]
    reply = "".join(chat.chat(messages, GREEDY))
    assert reply == "".join(local.chat(messages, GREEDY))
    assert chat.opened == 2
    assert 0 in calls[2:]  # the rebuilt pipeline got the conversation from its first token
