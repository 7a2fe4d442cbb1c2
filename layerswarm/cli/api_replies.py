"""`swarm-api`'s replies: generated on the client's event loop, admitted a bounded few at a
time (the rest wait in a bounded queue, then hear 429), and shaped as OpenAI JSON or events."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from layerswarm.cli.api_server import ApiError
from layerswarm.errors import (
    ContextOverflow,
    LayerswarmError,
    ModelFormatError,
    NoRouteError,
    PeerUnavailable,
)
from layerswarm.metrics import (
    CLIENT_REPLIES,
    CLIENT_REPLIES_IN_FLIGHT,
    CLIENT_TOKEN_SECONDS,
    CLIENT_TOKENS,
    TOKEN_RATE,
)
from layerswarm.routing.generate import Generator
from layerswarm.routing.hops import SwarmBusy
from layerswarm.routing.sampling import SamplingConfig
from layerswarm.routing.text import TextStream

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Finished:
    """The end of a reply: how many tokens it took and why it ended."""

    completion_tokens: int
    reason: str  # "stop" (EOS or a stop string) or "length"


async def generate(
    gen: Generator, prompt: list[int], sampling: SamplingConfig
) -> AsyncIterator[str | Finished]:
    """Text pieces, then a `Finished`. The reply runs on the generator's loop with every other
    reply (no thread of its own); closing this iterator early ends its session."""
    pieces = gen.net.iterate(_reply(gen, prompt, sampling))
    try:
        async for item in pieces:
            yield item
    finally:
        await pieces.aclose()  # type: ignore[attr-defined]


async def _reply(
    gen: Generator, prompt: list[int], sampling: SamplingConfig
) -> AsyncIterator[str | Finished]:
    """`generate` on the generator's loop; counts tokens itself (`last_stats` is shared)."""
    text = TextStream(gen.tokenizer, sampling.stop)
    tokens = gen.atokens(prompt, sampling)
    count, reason, finished = 0, "length", False
    CLIENT_TOKENS.labels(kind="prompt").inc(len(prompt))
    CLIENT_REPLIES_IN_FLIGHT.inc()
    last = time.perf_counter()
    try:
        async for token in tokens:
            count += 1
            now = time.perf_counter()
            CLIENT_TOKEN_SECONDS.observe(now - last)
            CLIENT_TOKENS.labels(kind="completion").inc()
            TOKEN_RATE.add(1)
            last = now
            piece, stop = gen.text_piece(text, token)
            if piece:
                yield piece
            if stop:  # EOS (its piece flushed the text) or a stop string
                reason = "stop"
                break
        else:
            if tail := text.flush():
                yield tail
        finished = True
        CLIENT_REPLIES.labels(reason=reason).inc()
        yield Finished(count, reason)
    except (GeneratorExit, asyncio.CancelledError):
        # Closed or cancelled before its end: the client went away (a server cancels the
        # response's task; the cancellation reaches this loop through `net.call`).
        if not finished:
            CLIENT_REPLIES.labels(reason="gone").inc()
            log.info("a client went away; its reply stopped after %d tokens", count)
        raise
    finally:
        CLIENT_REPLIES_IN_FLIGHT.dec()
        await tokens.aclose()


class Admission:
    """At most `max_active` replies at once, `max_waiting` more in a queue; past that, 429.

    The peers batch every reply in flight, so more at once costs each little; the bound keeps
    a flood of requests from piling sessions onto the swarm, and tells the caller when to come
    back (the `openai` client retries a 429 on its own, after `Retry-After`).
    """

    def __init__(self, max_active: int, max_waiting: int) -> None:
        self.max_waiting = max_waiting
        self.waiting = 0
        self._slots = asyncio.Semaphore(max_active)

    async def enter(self) -> None:
        """Wait for a turn.

        Raises:
            ApiError: 429 when the queue is full.
        """
        if self._slots.locked() and self.waiting >= self.max_waiting:
            raise ApiError(
                429,
                f"the swarm is busy ({self.waiting} replies waiting): retry in a few seconds",
                code="rate_limit_exceeded",
                headers={"Retry-After": "2"},
            )
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1

    def leave(self) -> None:
        self._slots.release()


async def admitted(
    admission: Admission, pieces: AsyncIterator[str | Finished]
) -> AsyncIterator[str | Finished]:
    """`pieces`, holding a turn of `admission` (taken already) until they end or are closed."""
    try:
        async for item in pieces:
            yield item
    finally:
        admission.leave()
        await pieces.aclose()  # type: ignore[attr-defined]


def as_api_error(e: Exception) -> ApiError:
    """Our errors as the HTTP status and OpenAI error body a client understands."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, ContextOverflow):
        return ApiError(400, str(e), code="context_length_exceeded")
    if isinstance(e, SwarmBusy):
        return ApiError(429, str(e), code="rate_limit_exceeded", headers={"Retry-After": "5"})
    if isinstance(e, NoRouteError | PeerUnavailable):
        return ApiError(503, f"the swarm cannot serve this now: {e}", code="no_route")
    if isinstance(e, ModelFormatError | ValueError):
        return ApiError(400, str(e))
    if isinstance(e, LayerswarmError):
        return ApiError(502, f"the swarm failed: {e}", code="swarm_error")
    raise e


@dataclass(frozen=True)
class ReplyShape:
    """The JSON of replies and chunks, chat or plain completion."""

    chat: bool
    model: str
    prompt_tokens: int
    id: str = ""
    created: int = 0

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

    def whole(self, text: str, done: Finished) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "finish_reason": done.reason, "logprobs": None}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        obj = "chat.completion" if self.chat else "text_completion"
        return self.envelope(obj) | {"choices": [choice], "usage": self.usage(done)}

    def chunk(self, text: str | None, reason: str | None = None) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "finish_reason": reason, "logprobs": None}
        if self.chat:
            choice["delta"] = {} if text is None else {"content": text}
        else:
            choice["text"] = text or ""
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return self.envelope(obj) | {"choices": [choice]}


async def stream_events(
    first: str | Finished,
    pieces: AsyncIterator[str | Finished],
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
            yield shape.chunk(item)
            item = await anext(pieces)
    except Exception as e:
        yield as_api_error(e).body()
    finally:  # shielded: a client that went away cancels this task, and its reply must stop
        with anyio.CancelScope(shield=True):
            await pieces.aclose()  # type: ignore[attr-defined]


class EventStream(StreamingResponse):
    """Server-sent events that stop their reply when the client goes away.

    Starlette cancels a streaming response whose client disconnected, but leaves its iterator
    suspended (to be closed whenever it is garbage-collected): closed here at once, so the
    reply's session ends and its turn is freed.
    """

    def __init__(self, events: AsyncIterator[dict[str, Any]]) -> None:
        super().__init__(
            server_sent(events),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()  # type: ignore[attr-defined]


async def server_sent(events: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    """Server-sent events: `data: {json}` each, then `data: [DONE]`."""
    try:
        async for event in events:
            yield f"data: {json.dumps(event)}\n\n".encode()
        yield b"data: [DONE]\n\n"
    finally:
        with anyio.CancelScope(shield=True):
            await events.aclose()  # type: ignore[attr-defined]
