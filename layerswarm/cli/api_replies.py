"""`swarm-api`'s replies: generated on the client's event loop, and admitted a bounded few at a
time (the rest wait in a bounded queue, then hear 429)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from layerswarm.cli.api_server import ApiError
from layerswarm.routing.generate import Generator
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
    try:
        async for token in tokens:
            count += 1
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
        yield Finished(count, reason)
    except GeneratorExit:
        if not finished:  # closed before its end: the client went away
            log.info("a client went away; its reply stopped after %d tokens", count)
        raise
    finally:
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
