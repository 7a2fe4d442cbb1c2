"""The generation loop: embed, run the layers through a pipeline, sample, stream text.

The loop does not know where the layers run: a `Pipeline` in this process (the local engine) or
a chain of peers (the swarm client) looks the same to it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import aclosing

import torch

from layerswarm.errors import ContextOverflow
from layerswarm.routing.head_batch import HeadBatcher
from layerswarm.routing.loop import BackgroundLoop
from layerswarm.routing.pipeline import GenerationStats as GenerationStats
from layerswarm.routing.pipeline import OpenPipeline as OpenPipeline
from layerswarm.routing.pipeline import Pipeline as Pipeline
from layerswarm.routing.pipeline import Prefix, cached_tokens, fork_pipeline
from layerswarm.routing.sampling import Sampler, SamplingConfig
from layerswarm.routing.speculative import (
    Forward,
    HeldSequence,
    Speculator,
    speculative_tokens,
)
from layerswarm.routing.text import ChatTokenizer, Message, TextStream
from layerswarm.shards.blocks import ClientHead


class Generator:
    """Generate text with a client head, a tokenizer and a way to open pipelines.

    Every reply runs on one event loop (`net`), however many are in flight: a reply waits on
    the network, not on a thread of its own. The head's work (embedding, logits, sampling) runs
    on one compute thread (`compute`), so the loop stays free to move other replies' steps, and
    the logits of every reply waiting for them come from one matmul (`HeadBatcher`).
    """

    def __init__(
        self,
        head: ClientHead,
        tokenizer: ChatTokenizer,
        open_pipeline: OpenPipeline,
        net: BackgroundLoop | None = None,
        compute: Executor | None = None,
    ) -> None:
        self.head = head
        self.tokenizer = tokenizer
        self.open_pipeline = open_pipeline  # a coroutine function, run on `net`
        self.net = net or BackgroundLoop()
        self.compute = compute or ThreadPoolExecutor(1, thread_name_prefix="layerswarm-head")
        self.heads = HeadBatcher(head, self.compute)  # next tokens of all replies, batched
        self.last_stats = GenerationStats()
        self.active: Pipeline | None = None  # the pipeline of the reply begun last
        self.speculator: Speculator | None = None  # drafts several tokens a pass when set

    def chat(self, messages: Sequence[Message], sampling: SamplingConfig) -> Iterator[str]:
        """Stream the reply to a conversation, piece by piece."""
        return self.stream_ids(self.tokenizer.encode_chat(messages), sampling)

    def stream_ids(self, prompt: Sequence[int], sampling: SamplingConfig) -> Iterator[str]:
        """Stream the text that follows the token ids `prompt`."""
        return self.stream_text(self.tokens(prompt, sampling), sampling)

    def stream_text(self, tokens: Iterator[int], sampling: SamplingConfig) -> Iterator[str]:
        """Turn new token ids into text pieces, up to EOS or a stop string; then close `tokens`."""
        text = TextStream(self.tokenizer, sampling.stop)
        try:
            for token in tokens:
                piece, done = self.text_piece(text, token)
                if piece:
                    yield piece
                if done:
                    return
            if tail := text.flush():
                yield tail
        finally:
            close = getattr(tokens, "close", None)
            if close is not None:
                close()

    async def astream(self, prompt: Sequence[int], sampling: SamplingConfig) -> AsyncIterator[str]:
        """`stream_ids` for the client's loop: text pieces of the reply to the ids `prompt`."""
        text = TextStream(self.tokenizer, sampling.stop)
        tokens = self.atokens(prompt, sampling)
        try:
            async for token in tokens:
                piece, done = self.text_piece(text, token)
                if piece:
                    yield piece
                if done:
                    return
            if tail := text.flush():
                yield tail
        finally:
            await tokens.aclose()

    def text_piece(self, text: TextStream, token: int) -> tuple[str, bool]:
        """The text a new token adds, and whether the reply ends (EOS or a stop string)."""
        if token in self.tokenizer.eos_ids:
            return text.flush(), True
        piece = text.push(token)
        return piece, text.stopped

    def tokens(self, prompt: Sequence[int], sampling: SamplingConfig) -> Iterator[int]:
        """Yield new token ids one by one (EOS included, then stop); `atokens` for sync code."""
        return self.net.iterate_sync(self.atokens(prompt, sampling))

    async def atokens(
        self,
        prompt: Sequence[int],
        sampling: SamplingConfig,
        sampler: Sampler | None = None,
        choices: Choices | None = None,
    ) -> AsyncGenerator[int, None]:
        """Yield new token ids one by one (EOS included, then stop). Runs on `net`'s loop.

        `sampler`: the reply's, for a caller that reads what it notes (`Sampler.logprobs`) or
        constrains it; None: a new one for `sampling`. `choices`: the group of replies to the
        same prompt that this one belongs to (they share one prefill).
        """
        limit = self.head.config.max_position_embeddings
        if not prompt:
            raise ValueError("the prompt is empty")
        if len(prompt) >= limit:
            raise ContextOverflow(
                f"the prompt has {len(prompt)} tokens; the model's context holds {limit}"
            )
        # An upper bound, not a reservation: peers take KV-cache pages as the session grows.
        max_length = min(limit, len(prompt) + sampling.max_new_tokens)
        stats = self.last_stats = GenerationStats(prompt_tokens=len(prompt))
        if sampling.max_new_tokens == 0:
            return
        sampler = sampler or Sampler(sampling, len(prompt))
        context, first = list(prompt), None
        if self.speculator is not None:  # its drafter holds the prompt too: no cache, no fork
            pipeline = await self.open_pipeline(max_length)
        elif choices is not None:
            pipeline, first = await choices.join(self, prompt, max_length)
        else:
            pipeline = await self.open_pipeline(max_length, self.prefix(prompt))
        self.active = pipeline
        sent = len(prompt) if first is not None else cached_tokens(pipeline)
        stats.reused_tokens = sent if first is None else 0
        try:
            if self.speculator is not None:
                forward = HeldSequence(pipeline, self._embed)
                reply = self.aspeculate(forward, prompt, max_length, sampling, stats, sampler)
                async with aclosing(reply) as tokens:
                    async for token in tokens:
                        yield token
                return
            t0 = time.perf_counter()
            for step in range(max_length - len(prompt)):
                if first is not None and step == 0:
                    hidden = first  # the prompt's, prefilled once for every choice
                else:
                    # Embedding is a row lookup: on the loop, with no thread hop.
                    hidden = await pipeline.aforward(self._embed(context[sent:]), sent)
                    sent = len(context)
                token = await self.heads.pick(sampler, hidden[:, -1:], context)
                stats.passes += 1
                t0 = _count(stats, step, t0)
                context.append(token)
                yield token
                if token in self.tokenizer.eos_ids:
                    return
        finally:
            if self.active is pipeline:
                self.active = None
            await pipeline.aclose()

    async def aspeculate(
        self,
        forward: Forward,
        prompt: Sequence[int],
        max_length: int,
        sampling: SamplingConfig,
        stats: GenerationStats,
        sampler: Sampler | None = None,
    ) -> AsyncGenerator[int, None]:
        """`atokens` with the speculator's drafts: through `forward` (see `HeldSequence`), up
        to `max_length` tokens with the prompt, with a drafter of its own for the reply."""
        assert self.speculator is not None
        drafter = await self.speculator.open_drafter(max_length)
        try:
            steps = max_length - len(prompt)
            config = self.speculator.config
            reply = speculative_tokens(
                self, drafter, config, forward, prompt, steps, sampling, stats, sampler
            )
            async with aclosing(reply) as tokens:
                async for token in tokens:
                    yield token
        finally:
            await drafter.aclose()

    def _embed(self, ids: Sequence[int]) -> torch.Tensor:
        return self.head.embed_tokens(torch.tensor([list(ids)], dtype=torch.long))

    def prefix(self, prompt: Sequence[int]) -> Prefix:
        """What a pipeline needs to start on pages that peers keep for `prompt`."""
        return Prefix(prompt, self._embed)

    async def prefill(self, pipeline: Pipeline, prompt: Sequence[int]) -> torch.Tensor:
        """Run what `pipeline` does not hold of `prompt`; the last position's hidden state."""
        start = cached_tokens(pipeline)
        return (await pipeline.aforward(self._embed(prompt[start:]), start))[:, -1:]

    def _pick(self, sampler: Sampler, hidden: torch.Tensor, context: Sequence[int]) -> int:
        return sampler(self.head.logits(hidden)[0, 0], context)

    def sample(
        self,
        context: list[int],
        steps: int,
        sampling: SamplingConfig,
        forward: Callable[[Sequence[int]], torch.Tensor],
    ) -> Iterator[int]:
        """The decode loop: up to `steps` new tokens, appended to `context` and yielded.

        `forward(context)` runs the tokens of `context` not yet in the KV cache through every
        layer and returns the last one's hidden state `(1, 1, hidden)`. Times go to
        `last_stats`, which the caller has just reset.
        """
        stats = self.last_stats
        sampler = Sampler(sampling, len(context))
        t0 = time.perf_counter()
        for step in range(steps):
            hidden = forward(context)
            token = self._pick(sampler, hidden, context)
            stats.passes += 1
            t0 = _count(stats, step, t0)
            context.append(token)
            yield token
            if token in self.tokenizer.eos_ids:
                return


def _count(stats: GenerationStats, step: int, t0: float) -> float:
    """Add a token that took since `t0` to `stats`; returns now."""
    now = time.perf_counter()
    if step == 0:
        stats.prefill_seconds = now - t0
    else:
        stats.decode_seconds += now - t0
    stats.new_tokens += 1
    return now


class Choices:
    """`n` replies to one prompt that share its prefill (the API's `n`): the first to start
    opens a pipeline, runs the prompt, and forks the pipeline for each other one (`afork`:
    the peers share the prompt's KV pages); each reply then samples on its own from the
    prompt's last hidden state. Where the pipeline cannot fork, the others prefill on their
    own. Runs on the generator's loop."""

    def __init__(self, n: int) -> None:
        self.n = n
        self._ready: asyncio.Future[torch.Tensor] | None = None
        self._forks: list[Pipeline] = []

    async def join(
        self, gen: Generator, prompt: Sequence[int], max_length: int
    ) -> tuple[Pipeline, torch.Tensor | None]:
        """A pipeline for one more reply, and the prompt's last hidden state when it holds the
        prompt already (None: the reply runs the prompt itself)."""
        if self._ready is None:
            self._ready = asyncio.get_running_loop().create_future()
            try:
                pipeline = await gen.open_pipeline(max_length, gen.prefix(prompt))
                hidden = await gen.prefill(pipeline, prompt)
                # Between steps (nothing else runs on it yet), every fork at once.
                forks = await asyncio.gather(*(fork_pipeline(pipeline) for _ in range(self.n - 1)))
                self._forks = [child for child in forks if child is not None]
            except BaseException as e:
                self._ready.set_exception(e)
                raise
            self._ready.set_result(hidden)
            return pipeline, hidden
        hidden = await asyncio.shield(self._ready)
        if self._forks:
            return self._forks.pop(), hidden
        return await gen.open_pipeline(max_length, gen.prefix(prompt)), None

    async def aclose(self) -> None:
        """Close the forks that no reply took (those replies ended before they began)."""
        forks, self._forks = self._forks, []
        await asyncio.gather(*(f.aclose() for f in forks), return_exceptions=True)
