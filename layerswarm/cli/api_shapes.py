"""The JSON of `swarm-api`'s replies: a whole reply, or the chunks of a streamed one."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio

from layerswarm.cli.api_logprobs import TokenTexts, chat_logprobs, completion_logprobs
from layerswarm.cli.api_replies import Finished, Piece, as_api_error
from layerswarm.cli.api_server import ApiError
from layerswarm.cli.api_tools import ToolCall, ToolStream, parse_tool_calls
from layerswarm.routing.sampling import TokenLogprob


@dataclass(frozen=True)
class ReplyShape:
    """The JSON of replies and chunks, chat or plain completion, of one or more choices."""

    chat: bool
    model: str
    prompt_tokens: int
    texts: TokenTexts | None = None  # set when the request asked for logprobs
    id: str = ""
    created: int = 0
    _offsets: dict[int, int] = field(default_factory=dict)  # completions' text_offset a choice

    def __post_init__(self) -> None:
        prefix = "chatcmpl-" if self.chat else "cmpl-"
        object.__setattr__(self, "id", prefix + uuid.uuid4().hex)
        object.__setattr__(self, "created", int(time.time()))

    def envelope(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def usage(self, completion_tokens: int) -> dict[str, int]:
        """The prompt once (its choices share it), and every choice's tokens."""
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": self.prompt_tokens + completion_tokens,
        }

    def logprobs(self, notes: Sequence[TokenLogprob], index: int = 0) -> dict[str, Any] | None:
        """`choice.logprobs` for `notes`, the tokens that follow those shaped before."""
        if self.texts is None:
            return None
        if self.chat:
            return chat_logprobs(self.texts, notes)
        shaped = completion_logprobs(self.texts, notes, self._offsets.get(index, 0))
        self._offsets[index] = self._offsets.get(index, 0) + sum(len(t) for t in shaped["tokens"])
        return shaped

    def choice(
        self,
        index: int,
        text: str,
        done: Finished,
        notes: Sequence[TokenLogprob] = (),
        calls: Sequence[ToolCall] = (),
    ) -> dict[str, Any]:
        """One choice of a whole reply."""
        choice: dict[str, Any] = {
            "index": index,
            "finish_reason": "tool_calls" if calls else done.reason,
            "logprobs": self.logprobs(notes, index),
        }
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text or (None if calls else "")}
            if calls:
                choice["message"]["tool_calls"] = [_without_index(c.json(0)) for c in calls]
        else:
            choice["text"] = text
        return choice

    def whole(self, choices: list[dict[str, Any]], completion_tokens: int) -> dict[str, Any]:
        obj = "chat.completion" if self.chat else "text_completion"
        return self.envelope(obj) | {"choices": choices, "usage": self.usage(completion_tokens)}

    def chunk(
        self,
        text: str | None,
        reason: str | None = None,
        notes: Sequence[TokenLogprob] = (),
        index: int = 0,
    ) -> dict[str, Any]:
        logprobs = self.logprobs(notes, index) if notes else None
        choice: dict[str, Any] = {"index": index, "finish_reason": reason, "logprobs": logprobs}
        if self.chat:
            choice["delta"] = {} if text is None else {"content": text}
        else:
            choice["text"] = text or ""
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return self.envelope(obj) | {"choices": [choice]}


def _without_index(call: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in call.items() if k != "index"}


Reply = AsyncIterator[Piece | Finished]


async def collect(
    replies: list[Reply], shape: ReplyShape, tools: list[str] | None = None, keep: int = 0
) -> dict[str, Any]:
    """The whole reply of every choice (generated at once), each closed at its end (the last
    frees the request's turn); with `tools` (their names), the calls parsed out of the text.
    `keep` > 0: only the `keep` choices of the highest log-probability (`best_of`; the replies
    must have been sampled with logprobs noted), as OpenAI ranks them."""
    try:
        done = await asyncio.gather(
            *(_collect_one(r, shape, i, tools) for i, r in enumerate(replies))
        )
    finally:
        for reply in replies:
            await reply.aclose()  # type: ignore[attr-defined]
    choices = [c for c, _, _ in done]
    if keep:
        best = sorted(range(len(done)), key=lambda i: -done[i][2])[:keep]
        choices = [choices[i] | {"index": n} for n, i in enumerate(best)]
    return shape.whole(choices, sum(n for _, n, _ in done))


async def _collect_one(
    pieces: Reply, shape: ReplyShape, index: int, tools: list[str] | None
) -> tuple[dict[str, Any], int, float]:
    """One choice, its tokens, and their log-probability per token."""
    text: list[str] = []
    notes: list[TokenLogprob] = []
    try:
        async for item in pieces:
            if isinstance(item, Finished):
                whole = "".join(text)
                content, calls = parse_tool_calls(whole, tools) if tools else (whole, [])
                if tools and not calls and item.raw != whole:  # calls in special tokens?
                    content, calls = parse_tool_calls(item.raw, tools)
                    content = content if calls else whole
                score = sum(n.logprob for n in notes) / max(len(notes), 1)
                return (
                    shape.choice(index, content, item, notes, calls),
                    item.completion_tokens,
                    score,
                )
            text.append(item.text)
            notes += item.logprobs
    except Exception as e:
        raise as_api_error(e) from None
    finally:
        await pieces.aclose()  # type: ignore[attr-defined]
    raise ApiError(500, "the reply ended without finishing")


async def stream_events(
    firsts: list[Piece | Finished],
    replies: list[Reply],
    shape: ReplyShape,
    include_usage: bool,
    tools: list[str] | None = None,
) -> AsyncIterator[dict[str, Any]]:
    """The chunks of a streamed reply, its choices' interleaved; a failure mid-reply becomes
    an error event.

    With `tools` (their names) a choice's text goes through a `ToolStream`: content as it
    comes, each call as `delta.tool_calls` once it is whole.
    """
    if shape.chat:
        for index in range(len(replies)):
            yield shape.chunk("", index=index) | {
                "choices": [{"index": index, "delta": {"role": "assistant", "content": ""}}]
            }
    streams = [_ChoiceStream(shape, i, tools) for i in range(len(replies))]
    tokens = 0
    try:
        async for index, item in _merged(
            [_after(f, r) for f, r in zip(firsts, replies, strict=True)]
        ):
            if isinstance(item, Finished):
                tokens += item.completion_tokens
            for event in streams[index].events(item):
                yield event
        if include_usage:
            yield shape.envelope(shape.chunk(None)["object"]) | {
                "choices": [],
                "usage": shape.usage(tokens),
            }
    except Exception as e:
        yield as_api_error(e).told().body()
    finally:  # shielded: a client that went away cancels this task, and its reply must stop
        with anyio.CancelScope(shield=True):
            for reply in replies:
                await reply.aclose()  # type: ignore[attr-defined]


async def _after(first: Piece | Finished, rest: Reply) -> Reply:
    yield first
    if not isinstance(first, Finished):
        async for item in rest:
            yield item


async def _merged(streams: list[Reply]) -> AsyncIterator[tuple[int, Piece | Finished]]:
    """The items of every stream as they come, with the stream's index. One task a stream,
    owned here: cancelled and awaited when the merge ends or is closed."""
    if len(streams) == 1:  # the common case: no task
        try:
            async for item in streams[0]:
                yield 0, item
        finally:
            await streams[0].aclose()  # type: ignore[attr-defined]
        return
    queue: asyncio.Queue[tuple[int, Piece | Finished | BaseException | None]] = asyncio.Queue()

    async def pump(index: int, stream: Reply) -> None:
        try:
            async for item in stream:
                await queue.put((index, item))
        except Exception as e:
            await queue.put((index, e))
            return
        await queue.put((index, None))

    tasks = [asyncio.get_running_loop().create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        live = len(streams)
        while live:
            index, got = await queue.get()
            if got is None:
                live -= 1
            elif isinstance(got, BaseException):
                raise got
            else:
                yield index, got
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for stream in streams:
            await stream.aclose()  # type: ignore[attr-defined]


class _ChoiceStream:
    """One choice's chunks, as its pieces come."""

    def __init__(self, shape: ReplyShape, index: int, tools: list[str] | None) -> None:
        self.shape = shape
        self.index = index
        self.tools = None if tools is None else ToolStream(tools)
        self.notes: list[TokenLogprob] = []  # not yet sent with a chunk
        self.calls = 0  # tool calls sent

    def events(self, item: Piece | Finished) -> list[dict[str, Any]]:
        shape, index = self.shape, self.index
        if self.tools is None:
            if isinstance(item, Finished):
                return [shape.chunk(None, item.reason, index=index)]
            return [shape.chunk(item.text, None, item.logprobs, index)]
        if isinstance(item, Finished):
            out = self._chunks(self.tools.finish())
            if not self.calls and item.raw != self.tools.text:  # calls in special tokens?
                _, calls = parse_tool_calls(item.raw, self.tools.names)
                out += self._chunks(list(calls))
            reason = "tool_calls" if self.calls else item.reason
            return [*out, shape.chunk(None, reason, self.notes, index)]
        self.notes += item.logprobs
        return self._chunks(self.tools.push(item.text))

    def _chunks(self, sent: list[str | ToolCall]) -> list[dict[str, Any]]:
        out = []
        for part in sent:
            notes, self.notes = self.notes, []
            if isinstance(part, str):
                out.append(self.shape.chunk(part, None, notes, self.index))
                continue
            head = part.json(self.calls) | {"function": {"name": part.name, "arguments": ""}}
            out.append(_tool_chunk(self.shape, head, self.index))
            args = {"index": self.calls, "function": {"arguments": part.arguments}}
            out.append(_tool_chunk(self.shape, args, self.index))
            self.calls += 1
        return out


def _tool_chunk(shape: ReplyShape, call: dict[str, Any], index: int) -> dict[str, Any]:
    chunk = shape.chunk(None, index=index)
    chunk["choices"][0]["delta"] = {"tool_calls": [call]}
    return chunk
