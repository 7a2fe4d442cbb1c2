"""`swarm-api --local` driven by the official `openai` client: logprobs (checked against the
local engine's own logits), structured output and tool calls."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
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


# --- structured output ----------------------------------------------------------------------

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer"},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 40}, "zip": {"type": "string"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "address"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "object",
    "properties": {
        "sky": {"enum": ["sunny", "cloudy", "rainy", "snowy"]},
        "celsius": {"type": "number"},
        "windy": {"type": "boolean"},
    },
    "required": ["sky", "celsius", "windy"],
    "additionalProperties": False,
}
SHOPPING = {
    "type": "object",
    "properties": {
        "items": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "item": {"type": "string", "maxLength": 30},
                    "count": {"type": "integer", "minimum": 1},
                },
                "required": ["item", "count"],
                "additionalProperties": False,
            },
            "minItems": 1,
            "maxItems": 4,
        },
        "store": {"enum": ["market", "bakery", "pharmacy"]},
    },
    "required": ["items", "store"],
    "additionalProperties": False,
}
SCHEMA_PROMPTS = [
    (PERSON, "Describe a person who lives in Paris, as JSON."),
    (PERSON, "Make up a character for a novel. Answer in JSON."),
    (WEATHER, "What is the weather like in London in winter? Answer in JSON."),
    (WEATHER, "Describe a summer day at the beach as JSON."),
    (SHOPPING, "Write a shopping list for a birthday cake, as JSON."),
    (SHOPPING, "I have a cold. What should I buy? Answer in JSON."),
]


def ask_json(client: Any, model: str, schema: dict[str, Any], prompt: str, **extra: Any) -> Any:
    fmt = {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": schema, "strict": True},
    }
    return client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        response_format=fmt,
        max_tokens=160,
        **extra,
    )


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_replies_validate(client: Any, model: str, temperature: float) -> None:
    import jsonschema

    def ask(case: tuple[dict[str, Any], str]) -> tuple[dict[str, Any], Any]:
        schema, prompt = case
        return schema, ask_json(client, model, schema, prompt, temperature=temperature, seed=5)

    with ThreadPoolExecutor(len(SCHEMA_PROMPTS)) as pool:
        replies = list(pool.map(ask, SCHEMA_PROMPTS))
    for schema, reply in replies:
        choice = reply.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), schema)


def test_json_object_and_streamed_json_schema(client: Any, model: str) -> None:
    reply = client.chat.completions.create(
        model=model,
        messages=FRANCE,
        response_format={"type": "json_object"},
        temperature=0,
        max_tokens=80,
    )
    assert isinstance(json.loads(reply.choices[0].message.content), dict)
    whole = ask_json(client, model, WEATHER, SCHEMA_PROMPTS[2][1], temperature=0)
    chunks = list(
        client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": SCHEMA_PROMPTS[2][1]}],
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "w", "schema": WEATHER, "strict": True},
            },
            max_tokens=160,
            temperature=0,
            stream=True,
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content


def test_parse_with_a_pydantic_model(client: Any, model: str) -> None:
    from enum import Enum

    from pydantic import BaseModel, Field

    class Color(str, Enum):
        red = "red"
        green = "green"
        blue = "blue"

    class Fruit(BaseModel):
        name: str = Field(max_length=20)
        color: Color
        seeds: list[int] = Field(max_length=3)

    completion = client.chat.completions.parse(
        model=model,
        messages=[{"role": "user", "content": "Describe an apple."}],
        response_format=Fruit,
        temperature=0,
        max_tokens=120,
    )
    fruit = completion.choices[0].message.parsed
    assert isinstance(fruit, Fruit) and isinstance(fruit.color, Color)


def test_guided_choice_and_a_bad_schema(client: Any, model: str) -> None:
    reply = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Is Paris in France?"}],
        extra_body={"guided_choice": ["yes", "no"]},
        temperature=0,
        max_tokens=8,
    )
    assert reply.choices[0].message.content in ("yes", "no")
    with pytest.raises(openai.BadRequestError) as e:
        ask_json(client, model, {"type": "no-such-type"}, "Hi")
    assert e.value.body["param"] == "response_format"


def test_speculation_under_a_grammar_gives_the_plain_greedy_reply(engine: Generator) -> None:
    from layerswarm.routing.drafters import lookup_speculator
    from layerswarm.routing.grammar import Grammar, grammar_tokenizer, json_schema_grammar
    from layerswarm.routing.sampling import Sampler, SamplingConfig
    from layerswarm.routing.speculative import SpeculationConfig

    prompt = engine.tokenizer.encode_chat([{"role": "user", "content": SCHEMA_PROMPTS[4][1]}])
    sampling = SamplingConfig(max_new_tokens=120)
    gtok = grammar_tokenizer(engine.tokenizer)

    def reply() -> list[int]:
        grammar = Grammar(gtok, json_schema_grammar(SHOPPING))
        sampler = Sampler(sampling, len(prompt), grammar)
        return list(engine.net.iterate_sync(engine.atokens(prompt, sampling, sampler)))

    plain = reply()
    engine.speculator = lookup_speculator(SpeculationConfig(first_draft=4))
    try:
        speculated = reply()
        drafted = engine.last_stats.drafted_tokens
    finally:
        engine.speculator = None
    assert speculated == plain
    assert drafted > 0
    json.loads(engine.tokenizer.decode(plain))


# --- tool calls -----------------------------------------------------------------------------

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 40},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
SEARCH_TOOL = {
    "type": "function",
    "function": {
        "name": "search",
        "description": "Search the web.",
        "parameters": {
            "type": "object",
            "properties": {"query": {"type": "string", "maxLength": 60}},
            "required": ["query"],
            "additionalProperties": False,
        },
    },
}
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]


def check_calls(calls: list[Any], tools: list[dict[str, Any]]) -> None:
    import jsonschema

    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])


@pytest.mark.parametrize(
    "choice", ["required", {"type": "function", "function": {"name": "search"}}]
)
def test_forced_tool_calls_validate_streamed_or_not(client: Any, model: str, choice: Any) -> None:
    tools = [WEATHER_TOOL, SEARCH_TOOL]
    args: dict[str, Any] = {
        "model": model,
        "messages": ASK_WEATHER,
        "tools": tools,
        "tool_choice": choice,
        "temperature": 0,
        "max_tokens": 100,
    }
    reply = client.chat.completions.create(**args)
    choice0 = reply.choices[0]
    assert choice0.finish_reason == "tool_calls"
    check_calls(choice0.message.tool_calls, tools)
    if isinstance(choice, dict):
        assert [c.function.name for c in choice0.message.tool_calls] == ["search"]
    chunks = list(client.chat.completions.create(**args, stream=True))
    deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []]
    assert deltas[0].id and deltas[0].function.name == choice0.message.tool_calls[0].function.name
    arguments = "".join(d.function.arguments or "" for d in deltas if d.index == 0)
    assert arguments == choice0.message.tool_calls[0].function.arguments
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


def test_a_tool_result_goes_back_into_the_conversation(client: Any, model: str) -> None:
    first = client.chat.completions.create(
        model=model,
        messages=ASK_WEATHER,
        tools=[WEATHER_TOOL],
        tool_choice="required",
        temperature=0,
        max_tokens=60,
    )
    call = first.choices[0].message.tool_calls[0]
    messages = [
        *ASK_WEATHER,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.function.name, "arguments": call.function.arguments},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call.id, "content": '{"celsius": 21, "sky": "sunny"}'},
    ]
    reply = client.chat.completions.create(
        model=model, messages=messages, tools=[WEATHER_TOOL], temperature=0, max_tokens=40
    )
    choice = reply.choices[0]
    assert choice.finish_reason in ("stop", "length", "tool_calls")
    assert choice.message.content or choice.message.tool_calls


# --- several choices ------------------------------------------------------------------------


def test_n_choices_sampled_apart_streamed_as_whole(client: Any, model: str) -> None:
    args: dict[str, Any] = {
        "model": model,
        "messages": STORY,
        "max_tokens": 10,
        "temperature": 1.0,
        "seed": 11,
        "n": 3,
    }
    whole = client.chat.completions.create(**args)
    assert [c.index for c in whole.choices] == [0, 1, 2]
    texts = [c.message.content for c in whole.choices]
    assert len(set(texts)) > 1  # each choice has a seed of its own
    assert whole.usage.completion_tokens == 30
    chunks = list(
        client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True})
    )
    streamed = ["", "", ""]
    for chunk in chunks:
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
    assert streamed == texts  # the same seeds, the same replies
    assert chunks[-1].usage.completion_tokens == 30


def test_n_choices_under_a_schema_all_validate(client: Any, model: str) -> None:
    import jsonschema

    reply = ask_json(client, model, WEATHER, SCHEMA_PROMPTS[3][1], temperature=1.0, seed=2, n=2)
    assert len(reply.choices) == 2
    for choice in reply.choices:
        jsonschema.validate(json.loads(choice.message.content), WEATHER)


def test_best_of_returns_the_likeliest_of_its_choices(client: Any, model: str) -> None:
    args: dict[str, Any] = {
        "model": model,
        "prompt": "Once upon a time",
        "max_tokens": 6,
        "temperature": 1.0,
        "seed": 4,
    }
    every = client.completions.create(**args, n=3, logprobs=0)
    mean = [sum(c.logprobs.token_logprobs) / 6 for c in every.choices]
    best = client.completions.create(**args, n=1, best_of=3)
    assert len(best.choices) == 1 and best.choices[0].logprobs is None
    assert best.choices[0].text == every.choices[mean.index(max(mean))].text
    assert best.usage.completion_tokens == 18
    with pytest.raises(openai.BadRequestError):
        client.completions.create(**args, n=2, best_of=1)
