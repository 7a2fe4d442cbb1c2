"""CUDA graphs of a span's decode steps: one graph launch a step instead of ~60 kernels a layer.

A decode step of a 30-layer span is ~1,800 small kernel launches; at batch 1 on a GPU their
launch cost (a few microseconds each, on the host) is more than their work. vLLM and gpt-fast
capture the step once and replay it; so does this module:

- A step whose segments are all one token, on CUDA with the Triton kernels, of a model with no
  experts, attention sinks or sliding windows (their steps do host work), runs through a graph
  captured for its exact batch size and its block-table width rounded up to a power of two
  (graphs are captured lazily, the first time a shape is seen, up to `max_graphs`; all share one
  memory pool). Any other step (a prefill chunk, a mixed batch) runs eagerly.
- The step's metadata is built on the host once a step and crosses to the GPU in one copy: an
  int32 buffer of write slots, positions, lengths and the padded block table.
- RoPE angles come from the model's precomputed tables (`Rotary`), indexed inside the graph; the
  tables are reserved for every position the KV cache can hold before the first capture.

Graphs replay exactly the kernels the eager step runs, on the same inputs, so a step's output
is the eager step's (`scripts/gpu_check.sh` checks it on a GPU). A graph holds the addresses of
the KV cache it was captured with: a new cache (the peer moved to other layers) drops them all.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from layerswarm.kernels import reference
from layerswarm.shards.blocks import SpanModel, StepBatch
from layerswarm.shards.config import Span
from layerswarm.shards.kv_cache import PagedKVCache, StepSlots

log = logging.getLogger(__name__)

MIN_WIDTH = 4  # unit: pages; the narrowest block table a graph is captured for


def table_width(pages: int) -> int:
    """The block-table width a graph is captured for: `pages` rounded up to a power of two."""
    width = MIN_WIDTH
    while width < pages:
        width *= 2
    return width


def step_metadata(cache: PagedKVCache, batch: StepBatch, width: int) -> torch.Tensor:
    """A decode step's metadata as one int32 host tensor `(sessions * (3 + width),)`: each
    session's write slot, position and length, then the block tables padded to `width` with
    page 0 (read past no session's length, so the padding is never used).

    Raises:
        ValueError: a segment is not one token, or a session holds more than `width` pages.
    """
    n = len(batch.counts)
    meta = torch.zeros(n * (3 + width), dtype=torch.int32)
    table = meta[3 * n :].view(n, width)
    for j, (session, start, count) in enumerate(
        zip(batch.sessions, batch.starts, batch.counts, strict=True)
    ):
        if count != 1:
            raise ValueError("step metadata of a decode step: one token a session")
        if len(session.pages) > width:
            raise ValueError(f"{len(session.pages)} pages do not fit a table of {width}")
        page, offset = divmod(start, cache.page_size)
        meta[j] = session.pages[page] * cache.page_size + offset  # the new token's slot
        meta[n + j] = start  # its position
        meta[2 * n + j] = start + 1  # the session's length once it is written
        table[j, : len(session.pages)] = torch.tensor(session.pages, dtype=torch.int32)
    return meta


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    x: torch.Tensor  # (sessions, hidden): the static input
    meta: torch.Tensor  # (sessions * (3 + width),) int32 on the GPU: the static metadata
    out: torch.Tensor  # (sessions, hidden): the static output


class DecodeGraphs:
    """A `SpanModel.step_runner` that replays CUDA graphs of decode steps (see the module)."""

    def __init__(self, model: SpanModel, max_graphs: int = 64) -> None:
        self.model = model
        self.max_graphs = max_graphs  # graphs captured at most (batch sizes x widths x spans)
        self._graphs: dict[tuple[int, int, Span], _Graph] = {}
        self._cache: PagedKVCache | None = None
        self._rope_ptr = 0
        self._pool: Any = None  # the memory pool every graph of this cache shares
        self.replays = 0  # steps served from a graph (for checks and logs)

    def __call__(
        self, x: torch.Tensor, batch: StepBatch, cache: PagedKVCache, layers: Span
    ) -> torch.Tensor | None:
        """The step's output from a graph, or None when it is not a graph's to run."""
        if (
            x.device.type != "cuda"
            or self.model.ops is reference
            or any(n != 1 for n in batch.counts)
        ):
            return None
        if cache is not self._cache or self.model.rotary.cos.data_ptr() != self._rope_ptr:
            self._reset(cache)
        n = len(batch.counts)
        width = table_width(max(len(s.pages) for s in batch.sessions))
        key = (n, width, layers)
        graph = self._graphs.get(key)
        if graph is None and len(self._graphs) >= self.max_graphs:
            return None
        meta = step_metadata(cache, batch, width).pin_memory()
        if graph is None:
            graph = self._capture(n, width, layers, cache, x, meta)
            self._graphs[key] = graph
        else:
            graph.x.copy_(x)
            graph.meta.copy_(meta, non_blocking=True)
        graph.graph.replay()
        self.replays += 1
        return graph.out.clone()  # the next replay overwrites the static output

    def _reset(self, cache: PagedKVCache) -> None:
        """Forget graphs of another cache, and reserve RoPE tables for every position it holds."""
        self._graphs.clear()
        self._cache = cache
        self.model.rotary.reserve(cache.tokens_total)
        self._rope_ptr = self.model.rotary.cos.data_ptr()
        self._pool = torch.cuda.graph_pool_handle()

    def _capture(
        self,
        n: int,
        width: int,
        layers: Span,
        cache: PagedKVCache,
        x: torch.Tensor,
        meta: torch.Tensor,
    ) -> _Graph:
        """Run the step once eagerly on a side stream (Triton compiles its kernels then), then
        capture it. Both write the step's keys and values: the same values to the same slots."""
        model = self.model
        static_x = x.clone()
        static_meta = meta.to(x.device)
        batch = StepBatch([0] * n, [1] * n, [])  # read by no path of an all-decode step

        def step() -> torch.Tensor:
            slots = static_meta[:n].long()
            positions = static_meta[n : 2 * n]
            lengths = static_meta[2 * n : 3 * n]
            table = static_meta[3 * n :].view(n, width)
            cos = model.rotary.cos.index_select(0, positions)
            sin = model.rotary.sin.index_select(0, positions)
            step_slots = StepSlots(slots, [], table, lengths)
            return model.run_layers(static_x, cos, sin, batch, cache, step_slots, layers)

        device = x.device
        side = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            step()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the client's loop thread may use the same GPU while this one captures
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            out = step()
        log.debug("captured a decode graph: %d sessions, tables of %d pages", n, width)
        return _Graph(graph, static_x, static_meta, out)


def enable_cuda_graphs(model: SpanModel, max_graphs: int = 64) -> SpanModel:
    """Serve `model`'s decode steps from CUDA graphs when it runs on CUDA with Triton kernels
    (a no-op elsewhere). Returns the model."""
    param = next(model.parameters())
    if param.device.type == "cuda" and model.ops is not reference and capturable(model):
        model.step_runner = DecodeGraphs(model, max_graphs)
    return model


def capturable(model: SpanModel) -> bool:
    """Whether a decode step of `model` runs with no host work: not with experts (tokens are
    grouped by expert on the host) nor with attention sinks or sliding windows (attention
    session by session over views of its runs)."""
    return all(
        getattr(layer, "moe", None) is None
        and getattr(layer, "sinks", None) is None
        and getattr(layer, "window", None) is None
        for layer in model.layers
    )
