"""What every layer of a model is to a generator: a `Pipeline`, and what one reply cost."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch


class Pipeline(Protocol):
    """All of a model's layers for one session, wherever they run; used on the client's loop."""

    async def aforward(self, hidden: torch.Tensor, start: int) -> torch.Tensor:
        """`hidden (1, tokens, hidden)` at positions `start ..` -> same shape, after all layers.

        `start` is at most the number of tokens the session holds; a step that starts before
        that end first rolls the session back to `start` (speculation's rejected drafts).
        """
        ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True)
class Prefix:
    """The prompt a pipeline is opened for, so that it may start with KV pages that peers keep
    for its first tokens (`routing/prefix.py`). A pipeline that did says so in its `cached`
    attribute: the tokens it already holds, which the first step then starts after."""

    tokens: Sequence[int]
    embed: Callable[[Sequence[int]], torch.Tensor]  # token ids -> (1, tokens, hidden)


# (max_length, prefix=None) -> a pipeline with room for `max_length` tokens. A pipeline may also
# have `cached` (see `Prefix`) and `afork()` (a new pipeline holding what it holds, for `n`
# choices of one prompt); the generator works without either.
OpenPipeline = Callable[..., Awaitable[Pipeline]]


async def fork_pipeline(pipeline: Pipeline) -> Pipeline | None:
    """A new pipeline holding what `pipeline` holds (`afork`), or None where it cannot fork."""
    fork = getattr(pipeline, "afork", None)
    if fork is None:
        return None
    try:
        child: Pipeline = await fork()
    except NotImplementedError:
        return None
    return child


def cached_tokens(pipeline: Pipeline) -> int:
    """Tokens of its prompt the pipeline already held when it opened (0 for most)."""
    cached = getattr(pipeline, "cached", 0)
    return cached if isinstance(cached, int) else 0


@dataclass
class GenerationStats:
    """What one reply cost."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    reused_tokens: int = 0  # unit: tokens of the prompt already in an open session's KV cache
    prefill_seconds: float = 0.0  # unit: s from the start to the first token's logits
    decode_seconds: float = 0.0  # unit: s for every later token
    passes: int = 0  # unit: steps through the pipeline (one a token without speculation)
    drafted_tokens: int = 0  # unit: tokens guessed by speculation
    accepted_tokens: int = 0  # unit: guessed tokens that the model agreed with

    @property
    def decode_tokens_per_second(self) -> float:
        steps = self.new_tokens - 1
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds > 0 else 0.0

    @property
    def tokens_per_pass(self) -> float:
        """New tokens per pipeline pass: 1 without speculation, more with guesses that stood."""
        return self.new_tokens / self.passes if self.passes else 0.0
