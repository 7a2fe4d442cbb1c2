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
        self, text: str, done: Finished, notes: Sequence[TokenLogprob] = ()
    ) -> dict[str, Any]:
        choice: dict[str, Any] = {
            "index": 0,
            "finish_reason": done.reason,
            "logprobs": self.logprobs(notes),
        }
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
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


async def collect(pieces: AsyncIterator[Piece | Finished], shape: ReplyShape) -> dict[str, Any]:
    """The whole reply of `pieces`, closed at its end (which frees the reply's turn at once)."""
    text: list[str] = []
    notes: list[TokenLogprob] = []
    try:
        async for item in pieces:
            if isinstance(item, Finished):
                return shape.whole("".join(text), item, notes)
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
) -> AsyncIterator[dict[str, Any]]:
    """The chunks of a streamed reply; a failure mid-reply becomes an error event."""
    if shape.chat:
        yield shape.chunk("") | {
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]
        }
    item = first
    try:
        while True:
            if isinstance(item, Finished):
                yield shape.chunk(None, item.reason)
                if include_usage:
                    yield shape.envelope(shape.chunk(None)["object"]) | {
                        "choices": [],
                        "usage": shape.usage(item),
                    }
                return
            yield shape.chunk(item.text, None, item.logprobs)
            item = await anext(pieces)
    except Exception as e:
        yield as_api_error(e).told().body()
    finally:  # shielded: a client that went away cancels this task, and its reply must stop
        with anyio.CancelScope(shield=True):
            await pieces.aclose()  # type: ignore[attr-defined]
