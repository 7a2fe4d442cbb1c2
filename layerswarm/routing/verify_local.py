"""Checking peers against this client's own computation of a span, when it holds the weights.

With `ClientConfig.verify_locally`, a step that no other replica can check is run here too: the
span is loaded from the client's model folder on first use (safetensors are memory-mapped, so
only that span's weights are read) and served by a `LocalEngine` of its own. This client's own
output is trusted: a peer that differs from it is caught without a third opinion.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from layerswarm.routing.loop import BackgroundLoop
from layerswarm.routing.paths import PeerView
from layerswarm.routing.shadow import LOCAL, Shadow
from layerswarm.shards.config import DTYPES, ModelConfig, Span
from layerswarm.shards.quantize import pack_linears
from layerswarm.shards.weights import load_span

if TYPE_CHECKING:
    from layerswarm.routing.local import LocalEngine

CACHE_BYTES = 64 * 2**20  # bytes: KV cache of each local span, for every session's shadows


class LocalSpans:
    """The spans this client computes itself to check peers; loaded on first use."""

    def __init__(self, model_dir: Path, net: BackgroundLoop, dtype: str = "float32") -> None:
        self.model_dir = model_dir
        self.config = ModelConfig.from_file(model_dir)
        self.net = net
        self.dtype = dtype
        self.compute = ThreadPoolExecutor(1, thread_name_prefix="layerswarm-verify")
        self.engines: dict[Span, LocalEngine] = {}
        self._loading = asyncio.Lock()

    def view(self, span: Span) -> PeerView:
        """How checks name this client's computation of `span`."""
        return PeerView(LOCAL, "this client", span, dtype=self.dtype)

    async def engine(self, span: Span) -> LocalEngine:
        async with self._loading:
            if span not in self.engines:
                loop = asyncio.get_running_loop()
                self.engines[span] = await loop.run_in_executor(self.compute, self._load, span)
        return self.engines[span]

    def _load(self, span: Span) -> LocalEngine:
        """Load `span` and start its engine (on the compute thread: `LocalEngine` waits on the
        client's loop while it starts, so it must not be built on that loop)."""
        from layerswarm.routing.local import LocalEngine

        dtype = DTYPES[self.dtype]
        model = pack_linears(load_span(self.model_dir, span, dtype, self.config))
        return LocalEngine(model, CACHE_BYTES, self.compute, self.net)

    async def open_shadow(self, span: Span, max_length: int) -> Shadow:
        """A session of `span` computed here, as a verifier's shadow."""
        from layerswarm.routing.local import LocalPipeline

        pipeline = LocalPipeline(await self.engine(span), max_length)
        dtype = DTYPES[self.dtype]

        async def run(hidden: torch.Tensor, start: int) -> torch.Tensor:
            out = await pipeline.aforward(hidden.to(dtype), start)
            return out.to(hidden.dtype)

        return Shadow(run, pipeline.aclose)

    async def aclose(self) -> None:
        engines, self.engines = list(self.engines.values()), {}
        for engine in engines:
            await engine.aclose()
        self.compute.shutdown(wait=False, cancel_futures=True)
