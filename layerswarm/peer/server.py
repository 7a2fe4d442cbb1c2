"""A peer's lifecycle: load its span, listen, serve until told to stop, then leave cleanly."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from collections.abc import Callable

import torch

from layerswarm.kernels.dispatch import ops_for
from layerswarm.peer.config import PeerConfig
from layerswarm.peer.handler import RequestHandler
from layerswarm.peer.sessions import SessionTable
from layerswarm.shards.config import ModelConfig
from layerswarm.shards.kv_cache import PagedKVCache
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
    config.span.check_within(model_config.num_layers)
    dtype = DTYPES[config.dtype]
    model = await asyncio.to_thread(
        load_span, config.model_dir, config.span, dtype, model_config, None, progress
    )
    log.info(
        "loaded layers %s of %s (%s, kernels: %s)",
        config.span,
        config.model_name,
        config.dtype,
        ops_for("cpu").__name__,
    )
    table = SessionTable(model, cache_tokens_for(config, model_config), config.max_batch)
    model_id = f"{config.model_name}@{model_fingerprint(config.model_dir)}"
    handler = RequestHandler(config, table, identity.peer_id, model_id)
    transport = TransportConfig(insecure_plaintext=config.insecure_plaintext)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    server = await serve_connections(handler, config.host, config.port, identity, transport)
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


async def _expire_sessions(table: SessionTable, idle_timeout: float) -> None:
    while True:
        await asyncio.sleep(min(idle_timeout / 4, 30.0))
        table.expire_idle(idle_timeout)
