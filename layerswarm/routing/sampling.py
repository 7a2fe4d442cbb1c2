"""Choose the next token from logits: greedy, temperature, top-k, top-p, and the penalties.

The penalties: `repetition_penalty` (CTRL's, multiplicative, over the whole context) and OpenAI's
`presence_penalty` and `frequency_penalty`, which count the tokens of the reply only (OpenAI's
definition: `logit[j] -= count[j] * frequency + (count[j] > 0) * presence`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import torch

MAX_LOGPROBS = 20  # OpenAI's limit on top_logprobs


class TokenLogprob(NamedTuple):
    """A chosen token's log-probability, and the likeliest tokens' (`SamplingConfig.logprobs`
    of them, most likely first), all under the distribution the token was drawn from."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


class Constraint(Protocol):
    """Which tokens may come next (a grammar: `routing.grammar.Grammar`)."""

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """`logits (vocab,)` with the tokens that may not come next at -inf."""
        ...

    def accept(self, token: int) -> None:
        """`token` came next."""
        ...


@dataclass(frozen=True)
class SamplingConfig:
    """How a reply is sampled and when it stops."""

    max_new_tokens: int = 256  # unit: tokens generated at most
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # unit: tokens kept; 0 keeps all
    top_p: float = 1.0  # unit: probability mass kept; 1 keeps all
    repetition_penalty: float = 1.0  # >1 discourages tokens already in the context
    presence_penalty: float = 0.0  # unit: logit subtracted once from each token in the reply
    frequency_penalty: float = 0.0  # unit: logit subtracted per time a token is in the reply
    seed: int | None = None  # fixes the random choices for a reproducible reply
    stop: tuple[str, ...] = field(default_factory=tuple)  # strings that end the reply
    logprobs: int | None = None  # unit: likeliest tokens listed beside each chosen one; None: none

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError("max_new_tokens must be >= 0")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be > 0")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}]")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2]")


class Sampler:
    """One reply's sampler: its random generator (a seed makes the reply reproducible), and
    where the reply starts in the contexts it is given (the penalties count the reply only)."""

    def __init__(
        self, config: SamplingConfig, prompt_tokens: int = 0, constraint: Constraint | None = None
    ) -> None:
        self.config = config
        self.prompt_tokens = prompt_tokens  # unit: tokens at the start of a context, not reply
        self.constraint = constraint  # what may come next, advanced by each settled token
        self.generator = torch.Generator()
        if config.seed is not None:
            self.generator.manual_seed(config.seed)
        else:
            self.generator.seed()
        self.logprobs: list[TokenLogprob] = []  # one a chosen token, when config.logprobs is set

    def __call__(self, logits: torch.Tensor, context: Sequence[int]) -> int:
        """Pick a token from `logits (vocab,)` given the token ids seen so far."""
        logits = self.constrained(logits)
        if self.config.temperature == 0:
            token = self.greedy(logits, context)
            self.settle(token, logits, context)
            return token
        probs = self.probs(logits, context)
        token = int(torch.multinomial(probs.cpu(), 1, generator=self.generator))
        self.settle(token, logits, context, probs)
        return token

    def settle(
        self,
        token: int,
        logits: torch.Tensor,
        context: Sequence[int],
        probs: torch.Tensor | None = None,
    ) -> None:
        """`token` is the reply's next, chosen from `constrained` `logits (vocab,)` after
        `context`: advance the constraint, and note the token's log-probability when asked
        (`probs`: the distribution it came from, if computed)."""
        if self.constraint is not None:
            self.constraint.accept(token)
        n = self.config.logprobs
        if n is None:
            return
        logp = self.log_distribution(logits, context) if probs is None else probs.log()
        top = torch.topk(logp, n) if n else None
        pairs = (
            [] if top is None else list(zip(top.indices.tolist(), top.values.tolist(), strict=True))
        )
        self.logprobs.append(TokenLogprob(token, float(logp[token]), pairs))

    def log_distribution(self, logits: torch.Tensor, context: Sequence[int]) -> torch.Tensor:
        """Log-probabilities `(vocab,)` of the distribution a token is chosen from: `probs`'s
        above temperature 0; under greedy, the penalized logits' softmax (temperature 1, as
        OpenAI reports logprobs at temperature 0)."""
        if self.config.temperature == 0:
            return torch.log_softmax(self.penalized(logits, context), dim=-1)
        return self.probs(logits, context).log()

    def constrained(self, logits: torch.Tensor) -> torch.Tensor:
        """`logits (vocab,)` with what the constraint forbids next at -inf (none: as given).
        The reply's own choices go through it; a drafter's guesses need not."""
        return logits if self.constraint is None else self.constraint.mask(logits)

    def greedy(self, logits: torch.Tensor, context: Sequence[int]) -> int:
        """The most likely token (after the repetition penalty)."""
        return int(torch.argmax(self.penalized(logits, context)))

    def penalized(self, logits: torch.Tensor, context: Sequence[int]) -> torch.Tensor:
        """`logits (vocab,)` in fp32, with the repetition penalty on the tokens of `context`
        and the presence and frequency penalties on those of the reply (after the prompt)."""
        c = self.config
        logits = logits.float()
        if c.repetition_penalty != 1.0 and context:
            ids = torch.tensor(sorted(set(context)), dtype=torch.long, device=logits.device)
            seen = logits[ids]
            logits = logits.clone()
            logits[ids] = torch.where(
                seen < 0, seen * c.repetition_penalty, seen / c.repetition_penalty
            )
        reply = context[self.prompt_tokens :]
        if (c.presence_penalty or c.frequency_penalty) and reply:
            ids = torch.tensor(list(reply), dtype=torch.long, device=logits.device)
            counts = torch.bincount(ids, minlength=logits.numel())[: logits.numel()].float()
            logits = logits - counts * c.frequency_penalty - (counts > 0) * c.presence_penalty
        return logits

    def probs(self, logits: torch.Tensor, context: Sequence[int]) -> torch.Tensor:
        """The distribution a token is sampled from, `(vocab,)` fp32: penalty, temperature,
        top-k, top-p. Needs a temperature above 0 (greedy has no distribution to sample)."""
        c = self.config
        logits = self.penalized(logits, context) / c.temperature
        if c.top_k:
            kth = torch.topk(logits, min(c.top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if c.top_p < 1.0:
            logits = _top_p(logits, c.top_p)
        return torch.softmax(logits, dim=-1)


def _top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability reaches `top_p` (at least one)."""
    sorted_logits, order = torch.sort(logits, descending=True)
    cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
    drop = cum - torch.softmax(sorted_logits, dim=-1) >= top_p  # mass before this token
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(0, order, sorted_logits)
