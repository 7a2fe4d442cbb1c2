"""The JSON of `swarm-api`'s replies: a whole reply, or the chunks of a streamed one."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio

from layerswarm.cli.api_logprobs import TokenTexts, chat_logprobs, completion_logprobs
from layerswarm.cli.api_replies import Finished, Piece, as_api_error
from layerswarm.cli.api_server import ApiError
from layerswarm.cli.api_tools import ToolCall, parse_tool_calls
from layerswarm.routing.sampling import TokenLogprob


@dataclass(frozen=True)
class ReplyShape:
    """The JSON of replies and chunks, chat or plain completion."""

    chat: bool
    model: str
    prompt_tokens: int
    texts: TokenTexts | None = None  # set when the request asked for logprobs
    id: str = ""
    created: int = 0
    _offset: list[int] = field(default_factory=lambda: [0])  # completions' text_offset so far

    def __post_init__(self) -> None:
        prefix = "chatcmpl-" if self.chat else "cmpl-"
        object.__setattr__(self, "id", prefix + uuid.uuid4().hex)
        object.__setattr__(self, "created", int(time.time()))

    def envelope(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def usage(self, done: Finished) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": done.completion_tokens,
            "total_tokens": self.prompt_tokens + done.completion_tokens,
        }

    def logprobs(self, notes: Sequence[TokenLogprob]) -> dict[str, Any] | None:
        """`choice.logprobs` for `notes`, the tokens that follow those shaped before."""
        if self.texts is None:
            return None
        if self.chat:
            return chat_logprobs(self.texts, notes)
        shaped = completion_logprobs(self.texts, notes, self._offset[0])
        self._offset[0] += sum(len(t) for t in shaped["tokens"])
        return shaped

    def whole(
        self,
        text: str,
        done: Finished,
        notes: Sequence[TokenLogprob] = (),
        calls: Sequence[ToolCall] = (),
    ) -> dict[str, Any]:
        choice: dict[str, Any] = {
            "index": 0,
            "finish_reason": "tool_calls" if calls else done.reason,
            "logprobs": self.logprobs(notes),
        }
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text or (None if calls else "")}
            if calls:
                choice["message"]["tool_calls"] = [_without_index(c.json(0)) for c in calls]
        else:
            choice["text"] = text
        obj = "chat.completion" if self.chat else "text_completion"
        return self.envelope(obj) | {"choices": [choice], "usage": self.usage(done)}

    def chunk(
        self,
        text: str | None,
        reason: str | None = None,
        notes: Sequence[TokenLogprob] = (),
    ) -> dict[str, Any]:
        logprobs = self.logprobs(notes) if notes else None
        choice: dict[str, Any] = {"index": 0, "finish_reason": reason, "logprobs": logprobs}
        if self.chat:
            choice["delta"] = {} if text is None else {"content": text}
        else:
            choice["text"] = text or ""
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return self.envelope(obj) | {"choices": [choice]}


def _without_index(call: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in call.items() if k != "index"}


async def collect(
    pieces: AsyncIterator[Piece | Finished], shape: ReplyShape, tools: list[str] | None = None
) -> dict[str, Any]:
    """The whole reply of `pieces`, closed at its end (which frees the reply's turn at once);
    with `tools` (their names), the calls it makes parsed out of its text."""
    text: list[str] = []
    notes: list[TokenLogprob] = []
    try:
        async for item in pieces:
            if isinstance(item, Finished):
                content, calls = parse_tool_calls("".join(text), tools) if tools else ("", [])
                if not calls:
                    content = "".join(text)
                return shape.whole(content, item, notes, calls)
            text.append(item.text)
            notes += item.logprobs
    except Exception as e:
        raise as_api_error(e) from None
    finally:
        await pieces.aclose()  # type: ignore[attr-defined]
    raise ApiError(500, "the reply ended without finishing")


async def stream_events(
    first: Piece | Finished,
    pieces: AsyncIterator[Piece | Finished],
    shape: ReplyShape,
    include_usage: bool,
    tools: list[str] | None = None,
) -> AsyncIterator[dict[str, Any]]:
    """The chunks of a streamed reply; a failure mid-reply becomes an error event.

    With `tools` (their names) the text is held to its end, then sent as content or as the
    `delta.tool_calls` of the calls parsed out of it.
    """
    if shape.chat:
        yield shape.chunk("") | {
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]
        }
    item = first
    held: list[Piece] = []
    try:
        while True:
            if isinstance(item, Finished):
                reason: str = item.reason
                if tools is not None:
                    events = _held_events(shape, held, tools)
                    reason = (
                        "tool_calls"
                        if any("tool_calls" in e["choices"][0]["delta"] for e in events)
                        else reason
                    )
                    for event in events:
                        yield event
                yield shape.chunk(None, reason)
                if include_usage:
                    yield shape.envelope(shape.chunk(None)["object"]) | {
                        "choices": [],
                        "usage": shape.usage(item),
                    }
                return
            if tools is not None:
                held.append(item)
            else:
                yield shape.chunk(item.text, None, item.logprobs)
            item = await anext(pieces)
    except Exception as e:
        yield as_api_error(e).told().body()
    finally:  # shielded: a client that went away cancels this task, and its reply must stop
        with anyio.CancelScope(shield=True):
            await pieces.aclose()  # type: ignore[attr-defined]


def _held_events(shape: ReplyShape, held: list[Piece], tools: list[str]) -> list[dict[str, Any]]:
    """A held reply's chunks: its text, or its tool calls as OpenAI streams them (the name and
    id first, then the arguments)."""
    text = "".join(p.text for p in held)
    notes = [n for p in held for n in p.logprobs]
    content, calls = parse_tool_calls(text, tools)
    if not calls:
        return [shape.chunk(text, None, notes)] if text or notes else []
    events = [shape.chunk(content, None, notes)] if content else []
    for index, call in enumerate(calls):
        head = call.json(index) | {"function": {"name": call.name, "arguments": ""}}
        events.append(_tool_chunk(shape, head))
        events.append(
            _tool_chunk(shape, {"index": index, "function": {"arguments": call.arguments}})
        )
    return events


def _tool_chunk(shape: ReplyShape, call: dict[str, Any]) -> dict[str, Any]:
    chunk = shape.chunk(None)
    chunk["choices"][0]["delta"] = {"tool_calls": [call]}
    return chunk
