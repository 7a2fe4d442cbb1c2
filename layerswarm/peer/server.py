"""A peer's lifecycle: load its span, listen, serve until told to stop, then leave cleanly."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from layerswarm.kernels.dispatch import ops_for
from layerswarm.peer.config import PeerConfig
from layerswarm.peer.handler import RequestHandler
from layerswarm.peer.sessions import SessionTable
from layerswarm.shards.blocks import SpanModel
from layerswarm.shards.config import ModelConfig
from layerswarm.shards.kv_cache import PagedKVCache
from layerswarm.shards.quantize import memory_bytes, quantize
from layerswarm.shards.weights import Progress, load_span, model_fingerprint
from layerswarm.swarm.identity import Identity
from layerswarm.swarm.transport import TransportConfig, serve_connections

log = logging.getLogger(__name__)

READY_PREFIX = "LAYERSWARM-PEER-READY "  # then one line of JSON; see `ready_line`
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def ready_line(host: str, port: int, peer_id: str) -> str:
    """The machine-readable line a peer prints on stdout once it serves.

    `LAYERSWARM-PEER-READY {"host": ..., "port": ..., "peer_id": ..., "address": "host:port/id"}`
    """
    info = {"host": host, "port": port, "peer_id": peer_id, "address": f"{host}:{port}/{peer_id}"}
    return READY_PREFIX + json.dumps(info)


def cache_tokens_for(config: PeerConfig, model_config: ModelConfig) -> int:
    """How many tokens of KV cache the peer's memory budget holds for its span."""
    per_token = PagedKVCache.bytes_per_token(
        len(config.span), model_config.num_kv_heads, model_config.head_dim, DTYPES[config.dtype]
    )
    return max(1, config.cache_memory_bytes // per_token)


async def serve_peer(
    config: PeerConfig,
    identity: Identity,
    on_ready: Callable[[str], None] = print,
    progress: Progress | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve `config.span` until SIGINT/SIGTERM (or `stop` is set), then close cleanly.

    On stopping, clients are told with a Goodbye first, so they can move their sessions.
    """
    model_config = ModelConfig.from_file(config.model_dir)
    model, speed = await asyncio.to_thread(load_peer_model, config, model_config, progress)
    table = SessionTable(model, cache_tokens_for(config, model_config), config.max_batch)
    model_id = f"{config.model_name}@{model_fingerprint(config.model_dir)}"
    handler = RequestHandler(config, table, identity.peer_id, model_id)
    handler.extra = {
        "quant": config.quant,
        "weights_bytes": memory_bytes(model),
        "decode_s_per_layer": speed.decode_s_per_layer,
        "prefill_tokens_per_s_per_layer": speed.prefill_tokens_per_s_per_layer,
    }
    transport = TransportConfig(insecure_plaintext=config.insecure_plaintext)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    server = await serve_connections(
        handler, config.host, config.port, identity, transport, on_disconnect=handler.disconnected
    )
    log.info(
        "serving layers %s at %s:%d as %s", config.span, config.host, server.port, identity.peer_id
    )
    on_ready(ready_line(config.host, server.port, identity.peer_id))
    try:
        async with asyncio.TaskGroup() as tasks:
            worker = tasks.create_task(table.serve_steps())
            expiry = tasks.create_task(_expire_sessions(table, config.session_idle_timeout))
            await stop.wait()
            log.info("stopping: telling %d sessions' clients", len(table.sessions))
            handler.stopping = True
            await server.say_goodbye("the peer is shutting down")
            worker.cancel()
            expiry.cancel()
    finally:
        server.close()
        await server.wait_closed()
        table.shutdown()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    log.info("stopped")


def load_peer_model(
    config: PeerConfig, model_config: ModelConfig, progress: Progress | None
) -> tuple[SpanModel, SpeedSample]:
    """Load the span, quantize it if asked, and measure how fast it runs."""
    config.span.check_within(model_config.num_layers)
    dtype = DTYPES[config.dtype]
    model = load_span(config.model_dir, config.span, dtype, model_config, None, progress)
    if config.quant != "none":
        quantize(model, config.quant, config.quant_group_size)  # type: ignore[arg-type]
    speed = measure_speed(model)
    log.info(
        "loaded layers %s of %s (%s, %s weights: %.1f MiB, kernels: %s); one decode step takes "
        "%.2f ms a layer",
        config.span,
        config.model_name,
        config.dtype,
        config.quant,
        memory_bytes(model) / 2**20,
        ops_for(next(model.parameters()).device).__name__.rsplit(".", 1)[-1],
        speed.decode_s_per_layer * 1e3,
    )
    return model, speed


@dataclass(frozen=True)
class SpeedSample:
    """How fast this peer runs its span, measured at start."""

    decode_s_per_layer: float  # unit: s one layer takes for one decode step (one session)
    prefill_tokens_per_s_per_layer: float  # unit: prompt tokens one layer takes per second


def measure_speed(model: SpanModel, prompt: int = 64, steps: int = 8) -> SpeedSample:
    """Time a short prefill and a few decode steps through the whole span (a fraction of a s)."""
    c = model.config
    param = next(model.parameters())
    cache = model.new_cache(prompt + steps + 1)
    session = cache.allocate(prompt + steps + 1)
    hidden = torch.randn(1, prompt, c.hidden_size, generator=torch.Generator().manual_seed(0))
    hidden = hidden.to(param.device, param.dtype)
    model(hidden[:, :4], [0], cache, [session])  # warm-up
    t0 = time.perf_counter()
    model(hidden, [0], cache, [session])
    t1 = time.perf_counter()
    for i in range(steps):
        model(hidden[:, i : i + 1], [prompt + i], cache, [session])
    t2 = time.perf_counter()
    layers = len(model.span)
    return SpeedSample((t2 - t1) / steps / layers, prompt * layers / (t1 - t0) / layers**2)


async def _expire_sessions(table: SessionTable, idle_timeout: float) -> None:
    while True:
        await asyncio.sleep(min(idle_timeout / 4, 30.0))
        table.expire_idle(idle_timeout)
