"""The local engine: every layer in this process, behind the same interface as the swarm."""

from __future__ import annotations

import asyncio
from concurrent.futures import Executor, ThreadPoolExecutor
from pathlib import Path

import torch

from layerswarm.kernels.cpu_linear import pack_linears
from layerswarm.routing.generate import Generator, Pipeline
from layerswarm.routing.text import ChatTokenizer
from layerswarm.shards.blocks import SpanModel
from layerswarm.shards.config import ModelConfig, Span, parse_dtype
from layerswarm.shards.kv_cache import PagedKVCache
from layerswarm.shards.weights import Progress, load_client_head, load_span

__all__ = ["LocalPipeline", "open_local_generator", "parse_dtype"]


class LocalPipeline:
    """A session over a whole model held in this process, with its own KV cache."""

    def __init__(self, model: SpanModel, max_length: int, compute: Executor) -> None:
        self.model = model
        self.compute = compute
        self.cache: PagedKVCache = model.new_cache(max_length)
        self.session = self.cache.allocate(max_length)

    def forward(self, hidden: torch.Tensor, start: int) -> torch.Tensor:
        out: torch.Tensor = self.model(hidden, [start], self.cache, [self.session])
        return out

    async def aforward(self, hidden: torch.Tensor, start: int) -> torch.Tensor:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.compute, self.forward, hidden, start)

    async def aclose(self) -> None:
        self.cache.free(self.session)


def open_local_generator(
    model_dir: str | Path, dtype: torch.dtype = torch.float32, progress: Progress | None = None
) -> Generator:
    """Load a whole model (a folder in Hugging Face layout) for generation in this process."""
    config = ModelConfig.from_file(model_dir)
    tokenizer = ChatTokenizer(model_dir)
    head = pack_linears(load_client_head(model_dir, dtype, config))
    model = pack_linears(
        load_span(model_dir, Span(0, config.num_layers), dtype, config, progress=progress)
    )
    compute = ThreadPoolExecutor(1, thread_name_prefix="layerswarm-compute")

    async def open_pipeline(max_length: int) -> Pipeline:
        return LocalPipeline(model, max_length, compute)

    # The head and the layers share one compute thread: two OpenMP teams only fight.
    return Generator(head, tokenizer, open_pipeline, compute=compute)
