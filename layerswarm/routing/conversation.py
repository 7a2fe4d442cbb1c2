"""A conversation's session kept open between turns, so each turn sends only its new tokens.

A chat turn re-renders the whole conversation with the model's template. When those token ids
extend the ones already in the open pipeline's KV cache, only the new suffix is forwarded;
otherwise (a new system message, a reply cut by a stop string, a reply whose text tokenizes
differently) the session starts over from the first token. If the pipeline breaks (a peer is
lost and no failover is possible) it is rebuilt once per step by replaying the conversation.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import torch

from layerswarm.errors import ContextOverflow, LayerswarmError
from layerswarm.routing.generate import GenerationStats, Generator, Pipeline
from layerswarm.routing.sampling import SamplingConfig
from layerswarm.routing.speculative import common_prefix
from layerswarm.routing.text import Message
from layerswarm.shards.config import Span

log = logging.getLogger(__name__)

Route = list[tuple[str, Span]]  # (peer address, its layers); [] for the local engine


class ChatSession:
    """One conversation's pipeline, held open across turns, and the token ids it holds."""

    def __init__(self, gen: Generator, max_context: int | None = None) -> None:
        limit = gen.head.config.max_position_embeddings
        self.gen = gen
        self.max_context = min(max_context or limit, limit)  # unit: tokens at most
        self.pipeline: Pipeline | None = None
        self.length = 0  # unit: tokens the open pipeline was opened for
        self.sent: list[int] = []  # token ids whose keys and values the pipeline holds
        self.forwarded = 0  # unit: tokens sent through the pipeline, all turns together
        self.opened = 0  # pipelines opened: the first, then each restart or rebuild
        self.last_route: Route | None = None  # the route of the last reply's pipeline

    def chat(self, messages: Sequence[Message], sampling: SamplingConfig) -> Iterator[str]:
        """Stream the reply to a conversation, reusing what the open session already holds."""
        ids = self.gen.tokenizer.encode_chat(messages)
        return self.gen.stream_text(self.tokens(ids, sampling), sampling)

    def tokens(self, prompt: Sequence[int], sampling: SamplingConfig) -> Iterator[int]:
        """Yield new token ids one by one (EOS included, then stop), like `Generator.tokens`.

        Raises:
            ContextOverflow: the prompt does not fit `max_context` (with room for one token).
        """
        if not prompt:
            raise ValueError("the prompt is empty")
        if len(prompt) >= self.max_context:
            raise ContextOverflow(
                f"the conversation has {len(prompt)} tokens; the session holds "
                f"{self.max_context}: /reset to start over, or raise --max-context"
            )
        if self.sent != list(prompt[: len(self.sent)]):
            self.drop()  # the conversation changed before its end: start over
        steps = min(sampling.max_new_tokens, self.max_context - len(prompt))
        self.gen.last_stats = GenerationStats(prompt_tokens=len(prompt))
        if steps <= 0:
            return
        self.gen.net.run(self._ensure_room(len(prompt) + steps))
        self.gen.last_stats.reused_tokens = len(self.sent)
        try:
            if self.gen.speculator is not None:
                yield from self._speculate(prompt, steps, sampling)
            else:
                yield from self.gen.sample(list(prompt), steps, sampling, self._forward)
        except GeneratorExit:  # the caller stopped reading: the cache holds what `sent` says
            raise
        except BaseException:
            # Stopped inside a forward (Ctrl-C, an error): what the cache holds is unknown.
            self.drop()
            raise
        finally:
            self.last_route = self.route

    @property
    def route(self) -> Route | None:
        """The open pipeline's hops (`[]` for one in this process); None with none open."""
        if self.pipeline is None:
            return None
        return list(getattr(self.pipeline, "route", []))

    def _speculate(
        self, prompt: Sequence[int], steps: int, sampling: SamplingConfig
    ) -> Iterator[int]:
        """The reply with the generator's speculator, through this session's pipeline."""
        context = list(prompt)
        stats = self.gen.last_stats
        replies = self.gen.aspeculate(self._aforward, prompt, len(prompt) + steps, sampling, stats)
        try:
            for token in self.gen.net.iterate_sync(replies):
                context.append(token)
                yield token
        finally:
            # The pipeline may hold guesses that fell after the reply's last token: the next
            # turn rolls them back, as a token it holds that the conversation lacks.
            self.sent = self.sent[: common_prefix(self.sent, context)]

    def _forward(self, context: Sequence[int]) -> torch.Tensor:
        """Run the tokens of `context` not in the cache; rebuild a broken pipeline once."""
        return self.gen.net.run(self._aforward(context, 1))

    async def _aforward(self, seq: Sequence[int], n: int) -> torch.Tensor:
        """Hidden states `(1, n, hidden)` of the last `n` tokens of `seq` after every layer.

        Runs what the pipeline lacks of `seq` (rolling back where it holds other tokens, such
        as guesses that fell); rebuilds a broken pipeline once, replaying all of `seq`.
        """
        for attempt in range(2):
            await self._ensure_room(len(seq))
            assert self.pipeline is not None
            start = min(common_prefix(self.sent, seq), len(seq) - n)
            ids = torch.tensor([list(seq[start:])], dtype=torch.long)
            try:
                hidden = await self.pipeline.aforward(self.gen.head.embed_tokens(ids), start)
            except ContextOverflow:
                raise
            except LayerswarmError as e:
                if attempt:
                    raise
                log.debug("the session broke (%s); replaying the conversation", e)
                await self._drop()
                continue
            self.sent = list(seq)
            self.forwarded += len(seq) - start
            return hidden[:, -n:]
        raise AssertionError("unreachable")

    async def _ensure_room(self, needed: int) -> None:
        """Open a pipeline for up to `max_context` tokens unless one is open.

        Peers take KV pages as a session grows, so asking for the whole context costs nothing
        up front, and the session never has to be reopened (and replayed) to grow.
        """
        if self.pipeline is not None and needed <= self.length:
            return
        await self._drop()
        self.length = self.max_context
        self.pipeline = self.gen.active = await self.gen.open_pipeline(self.length)
        self.opened += 1

    def drop(self) -> None:
        """Close the pipeline (if open) and forget what it held; the next turn starts over."""
        self.gen.net.run(self._drop())

    async def _drop(self) -> None:
        pipeline, self.pipeline = self.pipeline, None
        self.sent = []
        if self.gen.active is pipeline:
            self.gen.active = None
        if pipeline is not None:
            try:
                await pipeline.aclose()
            except LayerswarmError as e:  # the session is gone either way
                log.debug("closing a chat session: %s", e)

    def close(self) -> None:
        """End the conversation's session (also on /reset)."""
        self.drop()
        self.length = 0
