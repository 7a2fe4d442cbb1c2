"""The client's guesses for speculative decoding: n-grams of the context, or a local draft model.

- `PromptLookup` (Saxena's prompt lookup decoding, as transformers' `prompt_lookup_num_tokens`):
  the end of the context is looked for earlier in it, and the tokens that followed it there are
  the guess. No model, no compute; it pays off where a reply repeats its input (editing, code).
- `ModelDrafter`: a model with the same tokenizer, whole in the client on the local engine
  (`routing.local`), guesses k tokens one by one: the default model quantized to int4 drafting
  for a full-precision swarm, or a smaller model of the family. Its KV cache rolls back as the
  swarm's does, on its next step.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from layerswarm.errors import ModelFormatError
from layerswarm.routing.generate import Generator
from layerswarm.routing.local import LocalEngine, LocalPipeline
from layerswarm.routing.sampling import Sampler
from layerswarm.routing.speculative import (
    Draft,
    Drafter,
    HeldSequence,
    SpeculationConfig,
    Speculator,
)
from layerswarm.routing.text import ChatTokenizer
from layerswarm.shards.blocks import ClientHead
from layerswarm.shards.config import ModelConfig, Span
from layerswarm.shards.quantize import MODES as QUANT_MODES
from layerswarm.shards.quantize import pack_linears, quantize
from layerswarm.shards.weights import Progress, load_client_head, load_span

# The draft model's KV cache, every reply together: 256 MiB holds 5,600 tokens of SmolLM2-135M
# in fp32 (46 KiB a token). A reply that outgrows it goes on without guesses.
DRAFT_CACHE_BYTES = 256 * 2**20


class PromptLookup:
    """Guesses what followed the latest earlier occurrence of the context's last n tokens."""

    def __init__(self, config: SpeculationConfig) -> None:
        self.config = config

    async def draft(self, context: Sequence[int], k: int, sampler: Sampler) -> Draft:
        return Draft(lookup(context, k, self.config.max_ngram, self.config.min_ngram))

    async def aclose(self) -> None:
        return None


def lookup(context: Sequence[int], k: int, max_ngram: int, min_ngram: int = 1) -> list[int]:
    """Up to `k` tokens that followed the latest earlier occurrence of the context's end (its
    last `max_ngram` tokens, else fewer, down to `min_ngram`); [] when none occurs."""
    tokens = list(context)
    for n in range(min(max_ngram, len(tokens) - 1), min_ngram - 1, -1):
        tail = tokens[-n:]
        for i in range(len(tokens) - n - 1, -1, -1):
            if tokens[i : i + n] == tail:
                return tokens[i + n : i + n + k]
    return []


class ModelDrafter:
    """One reply's session on the draft model: k one-token steps guess k tokens."""

    def __init__(self, head: ClientHead, pipeline: LocalPipeline, compute: ThreadPoolExecutor):
        self.head = head
        self.compute = compute
        self.forward = HeldSequence(pipeline, self._embed)

    def _embed(self, ids: Sequence[int]) -> torch.Tensor:
        return self.head.embed_tokens(torch.tensor([list(ids)], dtype=torch.long))

    async def draft(self, context: Sequence[int], k: int, sampler: Sampler) -> Draft:
        """k guesses: greedy ones under greedy sampling, else draws from the draft model's
        distribution (the same penalty, temperature, top-k and top-p), returned with them."""
        loop = asyncio.get_running_loop()
        seq = list(context)
        tokens: list[int] = []
        rows: list[torch.Tensor] = []
        for _ in range(k):
            hidden = await self.forward(seq, 1)  # (1, 1, hidden)
            token, row = await loop.run_in_executor(self.compute, self._pick, sampler, hidden, seq)
            tokens.append(token)
            seq.append(token)
            if row is not None:
                rows.append(row)
        return Draft(tokens, torch.stack(rows) if rows else None)

    def _pick(
        self, sampler: Sampler, hidden: torch.Tensor, seq: list[int]
    ) -> tuple[int, torch.Tensor | None]:
        logits = self.head.logits(hidden)[0, -1]  # (vocab,) fp32
        if sampler.config.temperature == 0:
            return sampler.greedy(logits, seq), None
        q = sampler.probs(logits, seq)
        return int(torch.multinomial(q, 1, generator=sampler.generator)), q

    async def aclose(self) -> None:
        await self.forward.pipeline.aclose()


def lookup_speculator(config: SpeculationConfig) -> Speculator:
    async def open_drafter(max_length: int) -> Drafter:
        return PromptLookup(config)

    return Speculator(config, open_drafter)


def draft_model_speculator(
    gen: Generator,
    config: SpeculationConfig,
    draft_dir: str | Path,
    dtype: torch.dtype = torch.float32,
    quant: str | None = None,
    progress: Progress | None = None,
) -> Speculator:
    """Load a draft model (a folder in Hugging Face layout) whole, on `gen`'s compute thread.

    Args:
        quant: "int8" or "int4" to quantize its layers (its head stays as loaded); None: not.
    Raises:
        ModelFormatError: its tokenizer is not the model's (guesses would be other tokens).
        ValueError: an unknown `quant`.
    """
    if quant is not None and quant not in QUANT_MODES:
        raise ValueError(f"unknown quantization {quant!r}; choose one of {QUANT_MODES}")
    model_config = ModelConfig.from_file(draft_dir)
    _check_same_tokenizer(gen, ChatTokenizer(draft_dir), model_config, draft_dir)
    head = pack_linears(load_client_head(draft_dir, dtype, model_config))
    span = Span(0, model_config.num_layers)
    model = load_span(draft_dir, span, dtype, model_config, progress=progress)
    if quant is not None:
        quantize(model, quant)  # checked above
    pack_linears(model)
    compute = gen.compute
    if not isinstance(compute, ThreadPoolExecutor):
        raise TypeError("the draft model runs on the generator's compute thread: a thread pool")
    engine = LocalEngine(model, DRAFT_CACHE_BYTES, compute, gen.net)

    async def open_drafter(max_length: int) -> Drafter:
        return ModelDrafter(head, LocalPipeline(engine, max_length), compute)

    return Speculator(config, open_drafter)


def _check_same_tokenizer(
    gen: Generator, draft: ChatTokenizer, config: ModelConfig, draft_dir: str | Path
) -> None:
    ours = gen.tokenizer.tokenizer.get_vocab(with_added_tokens=True)
    theirs = draft.tokenizer.get_vocab(with_added_tokens=True)
    if ours != theirs or config.vocab_size != gen.head.config.vocab_size:
        raise ModelFormatError(
            f"the draft model in {draft_dir} has another tokenizer or vocabulary than the model "
            "(speculation needs the same one): pick a model of the same family"
        )


def open_speculator(
    gen: Generator,
    mode: str,
    model_dir: str | Path,
    draft_dir: str | Path | None = None,
    draft_quant: str | None = None,
    dtype: torch.dtype = torch.float32,
    progress: Progress | None = None,
) -> Speculator:
    """The speculator `mode` ("lookup" or "draft") names, for `gen` (attach it as
    `gen.speculator`).

    Args:
        draft_dir: the draft model's folder; None: the model itself (`model_dir`).
        draft_quant: "int8", "int4" or "none" (or None) for the draft model's layers. On this
            project's 2-core CPU an int4 SmolLM2 drafted 5x slower than fp32 (torch's CPU int4
            kernel, one run under load), so nothing is quantized unless asked.
    """
    config = SpeculationConfig(mode)  # type: ignore[arg-type]  # checked there
    if config.mode == "lookup":
        return lookup_speculator(config)
    quant = None if draft_quant in (None, "none") else draft_quant
    return draft_model_speculator(gen, config, draft_dir or model_dir, dtype, quant, progress)
