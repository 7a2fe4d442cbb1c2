"""The generation loop: embed, run the layers through a pipeline, sample, stream text.

The loop does not know where the layers run: a `Pipeline` in this process (the local engine) or
a chain of peers (the swarm client) looks the same to it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from layerswarm.errors import ContextOverflow
from layerswarm.routing.sampling import Sampler, SamplingConfig
from layerswarm.routing.text import ChatTokenizer, Message, TextStream
from layerswarm.shards.blocks import ClientHead


class Pipeline(Protocol):
    """All of a model's layers for one session, wherever they run."""

    def forward(self, hidden: torch.Tensor, start: int) -> torch.Tensor:
        """`hidden (1, tokens, hidden)` at positions `start ..` -> same shape, after all layers."""
        ...

    def close(self) -> None: ...


OpenPipeline = Callable[[int], Pipeline]  # max_length -> a pipeline with room for it


@dataclass
class GenerationStats:
    """What one reply cost."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    reused_tokens: int = 0  # unit: tokens of the prompt already in an open session's KV cache
    prefill_seconds: float = 0.0  # unit: s from the start to the first token's logits
    decode_seconds: float = 0.0  # unit: s for every later token

    @property
    def decode_tokens_per_second(self) -> float:
        steps = self.new_tokens - 1
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds > 0 else 0.0


class Generator:
    """Generate text with a client head, a tokenizer and a way to open pipelines."""

    def __init__(
        self, head: ClientHead, tokenizer: ChatTokenizer, open_pipeline: OpenPipeline
    ) -> None:
        self.head = head
        self.tokenizer = tokenizer
        self.open_pipeline = open_pipeline
        self.last_stats = GenerationStats()
        self.active: Pipeline | None = None  # the pipeline of the reply being generated

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
                if token in self.tokenizer.eos_ids:
                    break
                piece = text.push(token)
                if piece:
                    yield piece
                if text.stopped:
                    return
            tail = text.flush()
            if tail:
                yield tail
        finally:
            close = getattr(tokens, "close", None)
            if close is not None:
                close()

    def tokens(self, prompt: Sequence[int], sampling: SamplingConfig) -> Iterator[int]:
        """Yield new token ids one by one (EOS included, then stop)."""
        limit = self.head.config.max_position_embeddings
        if not prompt:
            raise ValueError("the prompt is empty")
        if len(prompt) >= limit:
            raise ContextOverflow(
                f"the prompt has {len(prompt)} tokens; the model's context holds {limit}"
            )
        max_length = min(limit, len(prompt) + sampling.max_new_tokens)
        self.last_stats = GenerationStats(prompt_tokens=len(prompt))
        if sampling.max_new_tokens == 0:
            return
        pipeline = self.active = self.open_pipeline(max_length)
        sent = 0  # tokens of the context already in the pipeline's KV cache

        def forward(context: Sequence[int]) -> torch.Tensor:
            nonlocal sent
            ids = torch.tensor([context[sent:]], dtype=torch.long)
            hidden = pipeline.forward(self.head.embed_tokens(ids), sent)
            sent = len(context)
            return hidden[:, -1:]

        try:
            yield from self.sample(list(prompt), max_length - len(prompt), sampling, forward)
        finally:
            pipeline.close()
            self.active = None

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
        sampler = Sampler(sampling)
        t0 = time.perf_counter()
        for step in range(steps):
            hidden = forward(context)
            token = sampler(self.head.logits(hidden)[0, 0], context)
            now = time.perf_counter()
            if step == 0:
                stats.prefill_seconds = now - t0
            else:
                stats.decode_seconds += now - t0
            t0 = now
            stats.new_tokens += 1
            context.append(token)
            yield token
            if token in self.tokenizer.eos_ids:
                return
