"""The math of a span of decoder layers (any supported family), and of the client's embedding
and head. What varies by family is switched by `ModelConfig` fields: q/k norms, biases, sinks
and sliding windows (`shards.attention`), and a dense or mixture-of-experts MLP (`shards.moe`).

Hidden states travel between spans as the residual stream `(batch, tokens, hidden)`; each span
reads and writes the KV cache of its own layers only.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, cast

import torch
from torch import nn

from layerswarm.errors import StepCancelled
from layerswarm.kernels import ops_for, reference
from layerswarm.shards.attention import sink_window_attention
from layerswarm.shards.config import ModelConfig, Span
from layerswarm.shards.kv_cache import PagedKVCache, SessionCache, StepSlots
from layerswarm.shards.moe import MoEBlock
from layerswarm.shards.rope import Rotary


class DecoderLayer(nn.Module):
    """One block: attention and an MLP (SwiGLU, or experts), each behind an RMSNorm, with
    residual adds.

    q/k/v are one fused projection and gate/up another: one matmul each instead of three and
    two, which matters on a CPU where decode is a chain of small GEMVs.
    """

    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    sinks: torch.Tensor | None

    def __init__(self, config: ModelConfig, index: int = 0) -> None:
        super().__init__()
        c = config
        self.q_size = c.num_heads * c.head_dim
        self.kv_size = c.num_kv_heads * c.head_dim
        self.window = c.sliding_window if c.sliding(index) else None
        self.input_norm = nn.Parameter(torch.ones(c.hidden_size), requires_grad=False)
        self.qkv = nn.Linear(c.hidden_size, self.q_size + 2 * self.kv_size, bias=c.attention_bias)
        self.o_proj = nn.Linear(self.q_size, c.hidden_size, bias=c.attention_out_bias)
        self.q_norm = _maybe(c.qk_norm, c.head_dim)
        self.k_norm = _maybe(c.qk_norm, c.head_dim)
        self.sinks = _maybe(c.attention_sinks, c.num_heads)
        self.post_norm = nn.Parameter(torch.ones(c.hidden_size), requires_grad=False)
        self.moe = MoEBlock(c.moe, c.hidden_size) if c.moe and c.sparse(index) else None
        if self.moe is None:
            self.gate_up = nn.Linear(c.hidden_size, 2 * c.intermediate_size, bias=False)
            self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)


def _maybe(present: bool, size: int) -> nn.Parameter | None:
    return nn.Parameter(torch.ones(size), requires_grad=False) if present else None


class SpanModel(nn.Module):
    """The decoder layers `[span.start, span.end)` of a model, and the math to run them."""

    def __init__(self, config: ModelConfig, span: Span, kernel_backend: str | None = None) -> None:
        super().__init__()
        span.check_within(config.num_layers)
        self.config = config
        self.span = span
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(span.start, span.end))
        self.kernel_backend = kernel_backend
        self.rotary = Rotary(config, "cpu")
        self.ops = ops_for("cpu", kernel_backend)
        self.scale = 1.0 / math.sqrt(config.head_dim)
        # Runs a whole step instead of `run_layers` when it can (CUDA graphs of decode steps,
        # `shards.cuda_graphs`); returns None for a step it does not take.
        self.step_runner: StepRunner | None = None

    def to_device(self, device: torch.device | str, kernel_backend: str | None = None) -> SpanModel:
        """Move the weights to `device` and pick the kernels for it (`kernel_backend` forces
        "torch" or "triton"; None keeps the one given at construction, or picks by device)."""
        self.to(device)
        self.kernel_backend = kernel_backend or self.kernel_backend
        self.rotary = Rotary(self.config, device)
        self.ops = ops_for(device, self.kernel_backend)
        return self

    @property
    def triton(self) -> bool:
        """Whether the layers run the Triton kernels (else their plain-torch twins)."""
        return self.ops is not reference

    def new_cache(self, tokens: int, page_size: int = 16) -> PagedKVCache:
        """A KV cache for this span with room for `tokens` tokens in all."""
        p = next(self.parameters())
        c = self.config
        pages = -(-tokens // page_size)
        return PagedKVCache(
            len(self.span), c.num_kv_heads, c.head_dim, pages, page_size, p.dtype, p.device
        )

    @torch.inference_mode()
    def forward(
        self,
        hidden: torch.Tensor,
        starts: Sequence[int],
        cache: PagedKVCache,
        sessions: Sequence[SessionCache],
        layers: Span | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> torch.Tensor:
        """Run the span's layers over new tokens of one or more sessions, a row each.

        Args:
            hidden: `(batch, tokens, hidden)`, one row per session, the same tokens each (see
                `forward_flat` for a mix of lengths).
            starts: the position of each row's first token.
            cache, sessions, layers, should_stop: as `forward_flat` takes them.
        Returns:
            `(batch, tokens, hidden)`, the residual stream after the span.
        """
        b, t, d = hidden.shape
        if b != len(starts) or b != len(sessions):
            raise ValueError("batch rows need one start and session each")
        flat = StepBatch(list(starts), [t] * b, list(sessions))
        x = hidden.reshape(b * t, d)  # (tokens, hidden), sessions one after another
        return self.forward_flat(x, flat, cache, layers, should_stop).reshape(b, t, d)

    @torch.inference_mode()
    def forward_flat(
        self,
        x: torch.Tensor,
        batch: StepBatch,
        cache: PagedKVCache,
        layers: Span | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> torch.Tensor:
        """Run the span's layers over a mixed batch: segments of new tokens of many sessions.

        Each session's pages are grown to hold its new tokens first (`cache.grow`), positions
        and RoPE angles are built once for the whole step, then every layer runs one matmul
        over all the tokens and attention segment by segment.

        Args:
            x: `(tokens, hidden)`, the segments one after another (`batch.counts` tokens each).
            batch: each segment's session, first position and token count.
            cache: the KV cache of this span; each session's entries are written, then read.
            layers: the layers to run (absolute indices), a part of the span; all if None.
            should_stop: checked before each layer; when it says so, `StepCancelled` is raised
                and the sessions' lengths stay as they were.
        Returns:
            `(tokens, hidden)`, the residual stream after the span.
        Raises:
            CacheFull, ContextOverflow: a session cannot hold its new tokens (nothing ran).
        """
        if x.shape[0] != sum(batch.counts):
            raise ValueError(f"{x.shape[0]} tokens for segments of {batch.counts}")
        for s, start, n in zip(batch.sessions, batch.starts, batch.counts, strict=True):
            cache.grow(s, start + n)
        layers = layers or self.span
        if layers.start < self.span.start or layers.end > self.span.end:
            raise ValueError(f"layers {layers} are not within the span {self.span}")
        out = None
        if self.step_runner is not None:
            if should_stop is not None and should_stop():
                raise StepCancelled("step stopped before it ran")
            out = self.step_runner(x, batch, cache, layers)
        if out is None:
            # The step's metadata (slots to write, runs or block tables to read, positions and
            # their RoPE angles), built once for all layers: a SmolLM2 decode step of 8 sessions
            # spent ~a third of its time on this bookkeeping when each layer redid it.
            slots = cache.step_slots(
                batch.sessions, batch.starts, batch.counts, paged=self.ops is not reference
            )
            pos = torch.cat(
                [torch.arange(s, s + n) for s, n in zip(batch.starts, batch.counts, strict=True)]
            )
            end = max(s + n for s, n in zip(batch.starts, batch.counts, strict=True))
            cos, sin = self.rotary.cos_sin(pos.to(x.device), end)
            out = self.run_layers(x, cos, sin, batch, cache, slots, layers, should_stop)
        for s, start, n in zip(batch.sessions, batch.starts, batch.counts, strict=True):
            s.length = start + n
        return out

    def run_layers(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        batch: StepBatch,
        cache: PagedKVCache,
        slots: StepSlots,
        layers: Span,
        should_stop: Callable[[], bool] | None = None,
    ) -> torch.Tensor:
        """The layers of one step, from its metadata: `x (tokens, hidden)`, cos/sin
        `(tokens, head_dim)`. With Triton kernels and only one-token segments it does no host
        work and reads nothing back, so a CUDA graph can capture it."""
        delta: torch.Tensor | None = None
        # On the CPU path the RoPE tables in the step's dtype, once for all layers.
        rope = reference.rope_factors(cos, sin, x.dtype) if self.ops is reference else None
        # A plain list: indexing a ModuleList costs more than a layer's smallest op.
        span_layers = list(self.layers)
        for i in range(layers.start - self.span.start, layers.end - self.span.start):
            if should_stop is not None and should_stop():
                raise StepCancelled(f"step stopped before layer {self.span.start + i}")
            layer = cast(DecoderLayer, span_layers[i])
            if delta is None:
                normed = self.ops.rms_norm(x, layer.input_norm, self.config.rms_norm_eps)
            else:
                normed, x = self.ops.add_rms_norm(
                    delta, x, layer.input_norm, self.config.rms_norm_eps
                )
            q, k, v = self._qkv(layer, normed, cos, sin, rope)
            cache.write_step(i, slots, k, v)
            if self.ops is not reference and layer.sinks is None and layer.window is None:
                heads = self._paged_attention(i, q, batch, cache, slots)
            else:
                heads = self._attention_by_segment(i, layer, q, batch, cache, slots)
            attn = layer.o_proj(heads.reshape(x.shape[0], layer.q_size))
            normed, x = self.ops.add_rms_norm(attn, x, layer.post_norm, self.config.rms_norm_eps)
            if layer.moe is not None:
                delta = layer.moe(normed, self.ops.swiglu)
            else:
                gate, up = layer.gate_up(normed).chunk(2, dim=-1)
                delta = layer.down_proj(self.ops.swiglu(gate, up))
        assert delta is not None  # a span has at least one layer
        return x + delta

    def _qkv(
        self,
        layer: DecoderLayer,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        rope: reference.RopeFactors | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A layer's queries, keys and values of `x (tokens, hidden)`, q and k normed (Qwen3)
        and rotated: `(tokens, heads, head_dim)` each.

        On the CPU path (`rope` given) queries and keys are normed and rotated as one tensor,
        as they come out of the fused projection: half the small ops of doing each apart.
        """
        c = self.config
        heads = layer.qkv(x).reshape(x.shape[0], -1, c.head_dim)  # q, k and v heads
        qk, v = heads[:, : c.num_heads + c.num_kv_heads], heads[:, c.num_heads + c.num_kv_heads :]
        if rope is not None:
            if layer.q_norm is not None and layer.k_norm is not None:  # Qwen3: pre-RoPE
                qk = reference.qk_norm(qk, c.num_heads, layer.q_norm, layer.k_norm, c.rms_norm_eps)
            reference.rotate(qk, rope)
            return qk[:, : c.num_heads], qk[:, c.num_heads :], v
        q, k = qk[:, : c.num_heads], qk[:, c.num_heads :]
        if layer.q_norm is not None and layer.k_norm is not None:
            q = self.ops.rms_norm(q, layer.q_norm, c.rms_norm_eps)
            k = self.ops.rms_norm(k, layer.k_norm, c.rms_norm_eps)
        q, k = q.contiguous(), k.contiguous()
        self.ops.apply_rope(q, k, cos, sin)
        return q, k, v

    def _attention_by_segment(
        self,
        i: int,
        layer: DecoderLayer,
        q: torch.Tensor,
        batch: StepBatch,
        cache: PagedKVCache,
        slots: StepSlots,
    ) -> torch.Tensor:
        """Attention session by session over views of its runs (one run: a plain view), so no
        step copies a session's keys, and a session gets the same bits in a batch as alone;
        the path of the CPU, and of layers with sinks or a window on any device."""

        def segment(j: int, start: int, at: int, t: int) -> torch.Tensor:
            runs = cache.step_views(i, slots, j)
            qj = q if t == q.shape[0] else q[at : at + t]
            if layer.sinks is not None or layer.window is not None:
                return sink_window_attention(qj, runs, start, self.scale, layer.window, layer.sinks)
            return reference.runs_attention(qj, runs, start, self.scale)

        if len(batch.counts) == 1:
            return segment(0, batch.starts[0], 0, batch.counts[0])
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        segments = zip(batch.starts, batch.offsets, batch.counts, strict=True)
        for j, (start, at, t) in enumerate(segments):
            out[at : at + t] = segment(j, start, at, t)
        return out

    def _paged_attention(
        self, i: int, q: torch.Tensor, batch: StepBatch, cache: PagedKVCache, slots: StepSlots
    ) -> torch.Tensor:
        """Attention through block tables: the decode kernel for every one-token segment (their
        table and lengths built once a step, in `slots`), the prefill kernel (over a gathered
        context) for each longer one."""
        if slots.decode_rows is None and slots.table is not None:  # every segment is one token
            return self.ops.decode_attention(  # type: ignore[no-any-return]
                q, cache.k[i], cache.v[i], slots.table, slots.lengths, self.scale
            )
        out = torch.empty_like(q)
        if slots.table is not None:
            rows = slots.decode_rows
            out[rows] = self.ops.decode_attention(
                q[rows], cache.k[i], cache.v[i], slots.table, slots.lengths, self.scale
            )
        for s, start, at, t in zip(
            batch.sessions, batch.starts, batch.offsets, batch.counts, strict=True
        ):
            if t > 1:
                kk, vv = cache.read(i, s, start + t)
                out[at : at + t] = self.ops.prefill_attention(
                    q[at : at + t], kk, vv, start, self.scale
                )
        return out


class StepRunner(Protocol):
    """Something that runs a whole step of a span in its own way, or declines (None)."""

    def __call__(
        self, x: torch.Tensor, batch: StepBatch, cache: PagedKVCache, layers: Span
    ) -> torch.Tensor | None: ...


@dataclass(frozen=True)
class StepBatch:
    """The segments of one step's flat token axis: a session's new tokens each."""

    starts: list[int]  # the position of each segment's first token
    counts: list[int]  # unit: tokens in each segment
    sessions: list[SessionCache]  # each segment's share of the cache

    @property
    def offsets(self) -> list[int]:
        """Where each segment starts on the flat token axis."""
        out, at = [], 0
        for n in self.counts:
            out.append(at)
            at += n
        return out


class ClientHead(nn.Module):
    """The parts a client holds: token embedding, final norm and the output head."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.norm = nn.Parameter(torch.ones(config.hidden_size), requires_grad=False)
        self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.head.weight = self.embed.weight

    @torch.inference_mode()
    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """`ids (batch, tokens)` -> `(batch, tokens, hidden)`, on the head's device."""
        embedded: torch.Tensor = self.embed(ids.to(self.norm.device))
        return embedded

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """`hidden (batch, tokens, hidden)`, from any device -> fp32 logits
        `(batch, tokens, vocab)` on the head's device."""
        hidden = hidden.to(self.norm.device)
        ops = ops_for(hidden.device)
        # Triton launches on the calling thread's current device: make it the head's
        where = torch.cuda.device(hidden.device) if hidden.is_cuda else contextlib.nullcontext()
        with where:
            h = ops.rms_norm(hidden, self.norm, self.config.rms_norm_eps)
        logits: torch.Tensor = self.head(h)
        return logits.float()
