"""`swarm-api`'s replies: generated on the client's event loop, admitted a bounded few at a
time (the rest wait in a bounded queue, then hear 429), and sent as server-sent events (their
JSON is `api_shapes`')."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

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
from layerswarm.routing.failures import SwarmBusy
from layerswarm.routing.generate import Choices, Generator
from layerswarm.routing.sampling import Constraint, Sampler, SamplingConfig, TokenLogprob
from layerswarm.routing.text import TextStream

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Piece:
    """Text of a reply, and the sampler's notes on the tokens it completes (when asked)."""

    text: str
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Finished:
    """The end of a reply: how many tokens it took and why it ended."""

    completion_tokens: int
    reason: str  # "stop" (EOS or a stop string) or "length"
    raw: str = ""  # the reply's text with its special tokens (gpt-oss writes calls in them)


async def generate(
    gen: Generator,
    prompt: list[int],
    sampling: SamplingConfig,
    constraint: Constraint | None = None,
    choices: Choices | None = None,
) -> AsyncIterator[Piece | Finished]:
    """Text pieces, then a `Finished`. The reply runs on the generator's loop with every other
    reply (no thread of its own); closing this iterator early ends its session. `constraint`:
    what may come next (a grammar), this reply's own; `choices`: the replies to the same
    prompt that share its prefill (`n`)."""
    pieces = gen.net.iterate(_reply(gen, prompt, sampling, constraint, choices))
    try:
        async for item in pieces:
            yield item
    finally:
        await pieces.aclose()  # type: ignore[attr-defined]


async def _reply(
    gen: Generator,
    prompt: list[int],
    sampling: SamplingConfig,
    constraint: Constraint | None,
    choices: Choices | None,
) -> AsyncIterator[Piece | Finished]:
    """`generate` on the generator's loop; counts tokens itself (`last_stats` is shared)."""
    text = TextStream(gen.tokenizer, sampling.stop)
    sampler = Sampler(sampling, len(prompt), constraint)
    tokens = gen.atokens(prompt, sampling, sampler, choices)
    count, reason, finished = 0, "length", False
    notes: list[TokenLogprob] = []  # of tokens whose text is not out yet
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
            if count <= len(sampler.logprobs) and token not in gen.tokenizer.eos_ids:
                notes.append(sampler.logprobs[count - 1])  # this token's (logprobs asked)
            piece, stop = gen.text_piece(text, token)
            if piece:
                yield Piece(piece, tuple(notes))
                notes = []
            if stop:  # EOS (its piece flushed the text) or a stop string
                reason = "stop"
                break
        else:
            if tail := text.flush():
                yield Piece(tail, tuple(notes))
                notes = []
        if notes:
            yield Piece("", tuple(notes))
        finished = True
        CLIENT_REPLIES.labels(reason=reason).inc()
        raw = str(gen.tokenizer.tokenizer.decode(text.ids, skip_special_tokens=False))
        yield Finished(count, reason, raw)
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


class Turn(Protocol):
    """A turn taken (of `Admission`, or a share of one), given back by `leave`."""

    def leave(self) -> None: ...


class Admitted:
    """`pieces`, holding a turn of `admission` (taken already) until they end or are closed.

    A class, not an async generator: closing a generator that never started runs none of its
    body, so a reply closed before its first piece (the request failed on another choice)
    would keep its turn for good.
    """

    def __init__(self, admission: Turn, pieces: AsyncIterator[Piece | Finished]) -> None:
        self.admission: Turn | None = admission
        self.pieces = pieces

    def __aiter__(self) -> Admitted:
        return self

    async def __anext__(self) -> Piece | Finished:
        try:
            return await anext(self.pieces)
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        if self.admission is not None:
            self.admission.leave()
            self.admission = None
            await self.pieces.aclose()  # type: ignore[attr-defined]


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
