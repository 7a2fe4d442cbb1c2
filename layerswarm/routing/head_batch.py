"""The client's head for every reply in flight at once: logits of many sessions in one matmul.

SmolLM2's head is a 576 x 49,152 matrix, 113 MB in fp32: one session's next-token logits read
all of it, so 16 sessions each asking alone read it 16 times a round. Gathering the sessions
that wait for logits into one `(sessions, hidden) @ head` reads it once for all of them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

import torch

from layerswarm.routing.sampling import Sampler
from layerswarm.shards.blocks import ClientHead


@dataclass
class _Ask:
    sampler: Sampler
    hidden: torch.Tensor  # (1, 1, hidden): the last position's output
    context: Sequence[int]
    done: asyncio.Future[int]


class HeadBatcher:
    """Picks next tokens on the compute thread, a batch of the waiting sessions at a time."""

    def __init__(self, head: ClientHead, compute: Executor) -> None:
        self.head = head
        self.compute = compute
        self._waiting: list[_Ask] = []
        # The task that drains `_waiting` while there is any; it ends when nothing is left,
        # so it is started by whichever call finds it gone, and owned here.
        self._draining: asyncio.Task[None] | None = None

    async def pick(self, sampler: Sampler, hidden: torch.Tensor, context: Sequence[int]) -> int:
        """The next token after `context`, from the hidden state `(1, 1, hidden)` of its end."""
        loop = asyncio.get_running_loop()
        ask = _Ask(sampler, hidden, context, loop.create_future())
        self._waiting.append(ask)
        if self._draining is None or self._draining.done():
            self._draining = loop.create_task(self._drain())
        return await ask.done

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._waiting:
            batch = [a for a in self._waiting if not a.done.done()]  # cancelled ones: dropped
            self._waiting = []
            if not batch:
                continue
            try:
                picks = await loop.run_in_executor(self.compute, self._pick_all, batch)
            except Exception as e:  # each waiter hears of it; the next batch goes on
                picks = [e] * len(batch)
            for ask, pick in zip(batch, picks, strict=True):
                if ask.done.done():
                    continue
                if isinstance(pick, BaseException):
                    ask.done.set_exception(pick)
                else:
                    ask.done.set_result(pick)

    def _pick_all(self, batch: list[_Ask]) -> list[int | Exception]:
        hidden = torch.cat([a.hidden.reshape(1, 1, -1) for a in batch])  # (sessions, 1, hidden)
        logits = self.head.logits(hidden)[:, 0]  # (sessions, vocab) fp32
        picks: list[int | Exception] = []
        for row, ask in enumerate(batch):
            try:
                picks.append(ask.sampler(logits[row], ask.context))
            except Exception as e:  # one session's sampling error is its own
                picks.append(e)
        return picks
