"""The local engine: every layer in this process, behind the same interface as the swarm.

It is a peer without the network: one `StepScheduler` over the whole model and one paged KV
cache, so many replies in flight at once (`Client.generate_batch`, `swarm-api --local`) are
batched on its compute thread as a peer batches its clients' sessions.
"""

from __future__ import annotations

import asyncio
import contextlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from layerswarm.routing.generate import Generator, Pipeline
from layerswarm.routing.loop import BackgroundLoop
from layerswarm.routing.pipeline import Prefix
from layerswarm.routing.text import ChatTokenizer
from layerswarm.shards.blocks import SpanModel
from layerswarm.shards.config import ModelConfig, Span, parse_dtype
from layerswarm.shards.cuda_graphs import enable_cuda_graphs
from layerswarm.shards.kv_cache import PagedKVCache, SessionCache
from layerswarm.shards.quantize import open_chooser, pack_linears
from layerswarm.shards.scheduler import StepScheduler
from layerswarm.shards.scheduler_config import SchedulerConfig
from layerswarm.shards.weights import Progress, load_client_head, load_span

__all__ = ["LocalEngine", "LocalPipeline", "open_local_generator", "parse_dtype"]

# 512 MiB holds 11,000 tokens of SmolLM2-135M in fp32 (46 KiB a token): one full 8,192-token
# context, or 16 replies of 700.
DEFAULT_CACHE_BYTES = 512 * 2**20


class LocalEngine:
    """A whole model, its KV cache and the scheduler that batches every session's steps.

    The scheduler runs on `net`'s loop; a pipeline used from another loop reaches it there.
    """

    def __init__(
        self, model: SpanModel, cache_bytes: int, compute: ThreadPoolExecutor, net: BackgroundLoop
    ) -> None:
        c = model.config
        per_token = PagedKVCache.bytes_per_token(
            len(model.span), c.num_kv_heads, c.head_dim, next(model.parameters()).dtype
        )
        self.cache: PagedKVCache = model.new_cache(max(cache_bytes // per_token, 1))
        # The head samples on the same compute thread, so a session's next step comes back
        # within its pick (~10 ms for SmolLM2): wait that long to keep the sessions in one batch.
        self.scheduler = StepScheduler(
            model, self.cache, SchedulerConfig(regroup_wait=0.05), compute=compute
        )
        self.net = net
        self._serving = net.run(self._start())  # the compute loop, for the engine's life

    async def _start(self) -> asyncio.Task[None]:
        return asyncio.get_running_loop().create_task(self.scheduler.serve())

    def close(self) -> None:
        """Stop the compute loop; steps asked for later fail."""
        self.net.run(self.aclose())

    async def aclose(self) -> None:
        """`close` on `net`'s loop."""
        self._serving.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._serving
        self.scheduler.close()

    async def run(self, seq: SessionCache, hidden: torch.Tensor, start: int) -> torch.Tensor:
        return await self.net.call(self.scheduler.run(seq, hidden, start))

    async def free(self, seq: SessionCache) -> None:
        async def free() -> None:
            self.scheduler.free(seq)

        await self.net.call(free())

    async def fork(self, seq: SessionCache) -> SessionCache:
        """A session holding what `seq` holds, its pages shared (on the scheduler's loop,
        where the pool is changed)."""

        async def fork() -> SessionCache:
            return self.cache.fork(seq)

        return await self.net.call(fork())


class LocalPipeline:
    """One session of the local engine."""

    def __init__(self, engine: LocalEngine, max_length: int, seq: SessionCache | None = None):
        self.engine = engine
        self.seq = seq or engine.cache.open_session(max_length)  # pages come as it grows

    async def aforward(self, hidden: torch.Tensor, start: int) -> torch.Tensor:
        return await self.engine.run(self.seq, hidden, start)

    async def afork(self) -> LocalPipeline:
        """A pipeline holding what this one holds, its KV pages shared (copy on write)."""
        return LocalPipeline(self.engine, self.seq.max_length, await self.engine.fork(self.seq))

    async def aclose(self) -> None:
        await self.engine.free(self.seq)


def open_local_generator(
    model_dir: str | Path,
    dtype: torch.dtype = torch.float32,
    progress: Progress | None = None,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    device: torch.device | str = "cpu",
    cpu_plans: str = "measure",
    cpu_plans_dir: Path | None = None,
) -> Generator:
    """Load a whole model (a folder in Hugging Face layout) for generation in this process.

    Args:
        cache_bytes: the KV cache of every session together.
        device: where the layers, the KV cache, the embedding and the head live; on CUDA the
            layers run the Triton kernels and decode steps replay CUDA graphs.
        cpu_plans: "measure" (the layers' CPU layouts timed at load, or read from what this
            machine kept), "remeasure" (timed again, replacing what was kept) or "fixed" (a
            fixed rule), as `PeerConfig.cpu_plans`.
        cpu_plans_dir: where measured plans are kept; None: the user's cache, as a peer's.
    Raises:
        ValueError: an unknown `cpu_plans`.
    """
    device = torch.device(device)
    tuner = open_chooser(cpu_plans, cpu_plans_dir)
    config = ModelConfig.from_file(model_dir)
    tokenizer = ChatTokenizer(model_dir)
    head = load_client_head(model_dir, dtype, config).to(device)
    model = load_span(model_dir, Span(0, config.num_layers), dtype, config, progress=progress)
    model.to_device(device)
    # CPU layouts; a no-op on a GPU. The layers measure theirs as a peer does, into the same
    # folder, so that a swarm of peers on this machine gives the local engine's bits (tests
    # compare the two token for token). The head keeps the fixed rule: a swarm client's head
    # (`swarm_client.open_swarm_generator`) does, and the two must pick the same tokens.
    pack_linears(head)
    pack_linears(model, tuner)
    enable_cuda_graphs(model)  # a no-op off CUDA
    # The head and the layers share one compute thread: two OpenMP teams only fight.
    compute = ThreadPoolExecutor(1, thread_name_prefix="layerswarm-compute")
    net = BackgroundLoop()
    engine = LocalEngine(model, cache_bytes, compute, net)

    async def open_pipeline(max_length: int, prefix: Prefix | None = None) -> Pipeline:
        return LocalPipeline(engine, max_length)  # every session computes its whole prompt

    gen = Generator(head, tokenizer, open_pipeline, net, compute)
    gen.engine = engine  # type: ignore[attr-defined]  # for close_generator
    return gen
