"""Tool calls parsed out of recorded model outputs, per family; tools rendered into prompts."""

from __future__ import annotations

import json
from typing import Any

import pytest

from layerswarm.cli.api_params import ChatRequest, parse_tools, validate
from layerswarm.cli.api_server import ApiError
from layerswarm.cli.api_tools import messages_with_tools, parse_tool_calls

NAMES = ["get_weather", "search"]

PARSE_CASES = [
    # (family, model output, expected content, expected [(name, arguments)])
    (
        "hermes",
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
        "",
        [("get_weather", {"city": "Paris"})],
    ),
    (
        "qwen, two calls after some words",
        "Let me check.\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "search", "arguments": {"q": "Paris events"}}\n</tool_call>',
        "Let me check.",
        [("get_weather", {"city": "Paris"}), ("search", {"q": "Paris events"})],
    ),
    (
        "llama 3.1 json",
        '{"name": "get_weather", "parameters": {"city": "Rome"}}',
        "",
        [("get_weather", {"city": "Rome"})],
    ),
    (
        "llama 3.2 python tag, two calls",
        '<|python_tag|>{"name": "search", "parameters": {"q": "a"}}; '
        '{"name": "search", "parameters": {"q": "b"}}',
        "",
        [("search", {"q": "a"}), ("search", {"q": "b"})],
    ),
    (
        "gpt-oss harmony",
        "<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant"
        '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city":"Oslo"}'
        "<|call|>",
        "",
        [("get_weather", {"city": "Oslo"})],
    ),
    (
        "fallback: a JSON list of calls",
        '[{"name": "search", "arguments": {"q": "x"}}]',
        "",
        [("search", {"q": "x"})],
    ),
    ("plain text", "The weather is nice.", "The weather is nice.", []),
    (
        "an unknown tool is text",
        '{"name": "launch_rockets", "arguments": {}}',
        '{"name": "launch_rockets", "arguments": {}}',
        [],
    ),
]


@pytest.mark.parametrize(("family", "text", "content", "calls"), PARSE_CASES)
def test_tool_calls_are_parsed_per_family(
    family: str, text: str, content: str, calls: list[tuple[str, Any]]
) -> None:
    got_content, got = parse_tool_calls(text, NAMES)
    assert got_content == content, family
    assert [(c.name, json.loads(c.arguments)) for c in got] == calls, family
    assert all(c.id.startswith("call_") for c in got)


TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


def chat(**fields: Any) -> ChatRequest:
    return validate(ChatRequest, {"messages": [{"role": "user", "content": "hi"}]} | fields)


def test_tool_choice_says_whether_and_which_tool_must_be_called() -> None:
    assert parse_tools(chat()) is None
    assert parse_tools(chat(tools=[TOOL], tool_choice="none")) is None
    auto = parse_tools(chat(tools=[TOOL]))
    assert auto is not None and auto.forced is None and auto.names == ["get_weather"]
    required = parse_tools(chat(tools=[TOOL], tool_choice="required"))
    assert required is not None and required.forced == required.tools
    named = {"type": "function", "function": {"name": "get_weather"}}
    assert parse_tools(chat(tools=[TOOL], tool_choice=named)) is not None
    with pytest.raises(ApiError) as e:
        parse_tools(chat(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "x"}}))
    assert e.value.param == "tool_choice"


def test_a_template_without_tools_gets_them_and_the_round_trip_as_hermes_text() -> None:
    call = {
        "id": "c1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
    }
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": '{"celsius": 21}', "tool_call_id": "c1"},
    ]
    out = messages_with_tools(messages, [TOOL])
    assert out[0]["role"] == "system" and '"get_weather"' in out[0]["content"]
    assert "<tool_call>" in out[2]["content"] and '"city": "Paris"' in out[2]["content"]
    assert out[3] == {
        "role": "user",
        "content": '<tool_response>\n{"celsius": 21}\n</tool_response>',
    }


def streamed(text: str, size: int = 3) -> list[Any]:
    """`text` through a ToolStream in pieces of `size` characters: content runs merged."""
    from layerswarm.cli.api_tools import ToolStream

    stream = ToolStream(NAMES)
    out: list[Any] = []
    for i in range(0, len(text), size):
        out += stream.push(text[i : i + size])
    out += stream.finish()
    merged: list[Any] = []
    for part in out:
        if isinstance(part, str) and merged and isinstance(merged[-1], str):
            merged[-1] += part
        else:
            merged.append(
                part if isinstance(part, str) else (part.name, json.loads(part.arguments))
            )
    return merged


@pytest.mark.parametrize("size", [1, 3, 50])
def test_streamed_text_shows_content_at_once_and_each_call_when_it_ends(size: int) -> None:
    text = PARSE_CASES[1][1]  # words, then two Hermes calls
    assert streamed(text, size) == [
        "Let me check.\n",
        ("get_weather", {"city": "Paris"}),
        ("search", {"q": "Paris events"}),
    ]
    assert streamed("Just words, <b>bold</b>.", size) == ["Just words, <b>bold</b>."]
    assert streamed(PARSE_CASES[3][1], size) == [("search", {"q": "a"}), ("search", {"q": "b"})]
    assert streamed('{"not": "a call"}', size) == ['{"not": "a call"}']


def test_content_streams_before_the_reply_ends() -> None:
    from layerswarm.cli.api_tools import ToolStream

    stream = ToolStream(NAMES)
    assert stream.push("The weather ") == ["The weather "]
    assert stream.push("is <tool") == ["is "]  # "<tool" may open a call: held
    assert stream.push('_call>\n{"name": "search", ') == []
    calls = stream.push('"arguments": {"q": "x"}}\n</tool_call>')
    assert [c.name for c in calls] == ["search"]  # type: ignore[union-attr]
    assert stream.finish() == []


HARMONY_RAW = PARSE_CASES[4][1]


async def harmony_reply() -> Any:
    """A gpt-oss reply as swarm-api sees it: its visible text without the special tokens that
    carry the call, and the whole text with them at the end."""
    from layerswarm.cli.api_replies import Finished, Piece

    yield Piece("analysisNeed the weather.")
    yield Finished(12, "stop", HARMONY_RAW)


def test_calls_written_in_special_tokens_are_found_whole_and_streamed() -> None:
    import asyncio

    from layerswarm.cli.api_shapes import ReplyShape, collect, stream_events

    shape = ReplyShape(chat=True, model="m", prompt_tokens=3)
    whole = asyncio.run(collect([harmony_reply()], shape, NAMES))
    choice = whole["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["tool_calls"][0]["function"]["name"] == "get_weather"

    async def events() -> list[Any]:
        reply = harmony_reply()
        first = await anext(reply)
        return [e async for e in stream_events([first], [reply], shape, False, NAMES)]

    chunks = asyncio.run(events())
    deltas = [d for c in chunks for d in c["choices"][0]["delta"].get("tool_calls", [])]
    assert deltas[0]["function"]["name"] == "get_weather"
    assert json.loads(deltas[1]["function"]["arguments"]) == {"city": "Oslo"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
