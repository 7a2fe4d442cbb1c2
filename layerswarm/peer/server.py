"""A peer's lifecycle: load its span, listen, serve until told to stop, then leave cleanly."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import signal
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
from zeroconf import InterfaceChoice

from layerswarm.errors import LayerswarmError
from layerswarm.peer.announce import (
    Announcer,
    PeerFacts,
    current_record,
    reachable_addresses,
    serve_announcements,
)
from layerswarm.peer.config import PeerConfig
from layerswarm.peer.dht_announce import DhtAnnouncer, open_peer_dht
from layerswarm.peer.forward import Forwarder, PushSteps
from layerswarm.peer.gpu_share import LOADING, GpuShare, gpu_key
from layerswarm.peer.handler import RequestHandler
from layerswarm.peer.load import (
    BYTES_PER_WEIGHT,
    cache_tokens_for,
    load_peer_model,
)
from layerswarm.peer.measure import (
    SpeedSample,
    device_name,
    free_memory_bytes,
    measure_tflops,
    memory_total_bytes,
)
from layerswarm.peer.placement import (
    choose_span,
    layers_that_fit,
    memory_budget,
    record_server,
)
from layerswarm.peer.rebalance import serve_rebalancing
from layerswarm.peer.sessions import SessionTable, open_compute_thread
from layerswarm.shards.blocks import SpanModel
from layerswarm.shards.config import DTYPES, ModelConfig, Span
from layerswarm.shards.device import resolve_device
from layerswarm.shards.quantize import memory_bytes
from layerswarm.shards.sizes import layer_weight_bytes
from layerswarm.shards.weights import Progress, freeze_heap, model_fingerprint
from layerswarm.swarm.discovery import (
    DhtLookup,
    RecordSource,
    dht_key,
    merged,
    wait_for_coverage,
)
from layerswarm.swarm.identity import Identity
from layerswarm.swarm.listen import Server as TransportServer
from layerswarm.swarm.listen import serve_connections
from layerswarm.swarm.mdns import MdnsConfig
from layerswarm.swarm.mdns_announce import MdnsAnnouncer
from layerswarm.swarm.mdns_browse import MdnsBrowser
from layerswarm.swarm.records import PeerRecord, sign_record, stamped
from layerswarm.swarm.transport import Address, TransportConfig, parse_address
from layerswarm.swarm.traversal import Traversal

if TYPE_CHECKING:
    from layerswarm.swarm.dht import DhtNode

log = logging.getLogger(__name__)

READY_PREFIX = "LAYERSWARM-PEER-READY "  # then one line of JSON; see `ready_line`


def ready_line(host: str, port: int, peer_id: str, span: Span, multiaddr: str | None) -> str:
    """The machine-readable line a peer prints on stdout once it serves and is announced.

    `LAYERSWARM-PEER-READY {"host": ..., "port": ..., "peer_id": ..., "address": "host:port/id",
    "layers": "A:B", "multiaddr": "/ip4/.../tcp/.../p2p/id" or null without a DHT node}`
    """
    info = {
        "host": host,
        "port": port,
        "peer_id": peer_id,
        "address": f"{host}:{port}/{peer_id}",
        "layers": str(span),
        "multiaddr": multiaddr,
    }
    return READY_PREFIX + json.dumps(info)


@dataclass
class Discovery:
    """Where the peer hears of the swarm, and where it announces itself."""

    sources: list[RecordSource]  # the swarm's records, as far as heard
    refresh: Callable[[], Awaitable[None]] | None = None  # awaited before reading (a DHT query)
    mdns: MdnsConfig | None = None  # announce over mDNS with this; None: not
    dht: DhtNode | None = None  # announce in the DHT with this; None: not
    others: bool = False  # whether others can be heard at all (mDNS on, or a DHT joined)


async def serve_peer(
    config: PeerConfig,
    identity: Identity,
    on_ready: Callable[[str], None] = print,
    progress: Progress | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve a span until SIGINT/SIGTERM (or `stop` is set), then close cleanly.

    With `config.span` None the span is chosen from the swarm's records first. On stopping,
    clients are told with a Goodbye first, so they can move their sessions.
    """
    model_config = ModelConfig.from_file(config.model_dir)
    fingerprint = model_fingerprint(config.model_dir)
    device = resolve_device(config.device)
    config = replace(config, device=str(device))
    async with AsyncExitStack() as stack:
        discovery = await _open_discovery(config, identity, fingerprint, stack)
        loop = asyncio.get_running_loop()
        compute = stack.enter_context(open_compute_thread())
        share = _join_gpu_share(config, device)
        if share is not None:
            stack.callback(share.leave)
            await loop.run_in_executor(compute, share.__enter__)  # other peers' loading first
        try:
            auto = config.span is None
            span = config.span or await _auto_span(
                config, model_config, discovery, fingerprint, share
            )
            config = replace(config, span=span)
            model, speed = await loop.run_in_executor(
                compute, load_peer_model, config, model_config, span, progress
            )
        finally:
            if share is not None:
                share.__exit__(None, None, None)
        freeze_heap()  # the loaded span and the libraries: out of the collector's way
        cache_tokens = cache_tokens_for(config, model_config, span)
        table = SessionTable(model, cache_tokens, config.serving(), compute, speed.decode_threads)
        handler = RequestHandler(
            config, table, identity.peer_id, f"{config.model_name}@{fingerprint}"
        )
        device = next(model.parameters()).device
        handler.extra = {
            "device": str(device),  # shown by dashboards
            "free_memory_bytes": free_memory_bytes(device),  # at start
            "memory_total_bytes": memory_total_bytes(device),
            "quant": config.quant,
            "weights_bytes": memory_bytes(model),
            "decode_s_per_layer": speed.decode_s_per_layer,
            "prefill_tokens_per_s_per_layer": speed.prefill_tokens_per_s_per_layer,
            "device_name": device_name(device),
            "kernels": model.ops.__name__.rsplit(".", 1)[-1],
            "cuda_graphs": model.step_runner is not None,
        }
        transport = TransportConfig(
            handshake_timeout=config.handshake_timeout,
            insecure_plaintext=config.insecure_plaintext,
            swarm_key=config.swarm_key,
        )
        forwarder = Forwarder(identity, transport, config.push_timeout)
        stack.push_async_callback(forwarder.aclose)
        handler.push = PushSteps(forwarder, config.push_timeout)
        traversal = Traversal(config.nat, identity, transport, config.host)
        stack.push_async_callback(traversal.aclose)
        server = await serve_connections(
            traversal.handler(handler),
            config.host,
            config.port,
            identity,
            transport,
            on_disconnect=handler.disconnected,
            limits=config.limits,
        )
        stack.push_async_callback(_close_server, server, table)
        local = reachable_addresses(config.host, server.port)
        facts = PeerFacts(
            identity.peer_id,
            local,
            config.model_name,
            fingerprint,
            model_config.num_layers,
            speed,
            await loop.run_in_executor(compute, measure_tflops, device, DTYPES[config.dtype]),
            str(device),
            device_name(device),
            share.peers if share is not None else (lambda: 1),
        )
        traversal.record_interval = config.record_ttl / 3
        traversal.signed_record = lambda: sign_record(
            stamped(_record(config, facts, handler, traversal), config.record_ttl), identity
        )
        await _cross_nat(traversal, server, local, discovery, identity.peer_id)
        announcers: list[Announcer] = []
        if discovery.mdns is not None:
            announcers.append(MdnsAnnouncer(identity, discovery.mdns))
        if discovery.dht is not None:
            announcers.append(
                DhtAnnouncer(discovery.dht, identity, config.record_ttl, traversal.carried)
            )
        log.info(
            "serving layers %s at %s:%d as %s",
            config.span,
            config.host,
            server.port,
            identity.peer_id,
        )
        multiaddr = discovery.dht.multiaddr if discovery.dht is not None else None
        line = ready_line(config.host, server.port, identity.peer_id, span, multiaddr)
        await _serve_until_stopped(
            config,
            table,
            handler,
            server,
            stop or asyncio.Event(),
            announcers,
            lambda: _record(config, facts, handler, traversal),
            lambda: on_ready(line),
            _rebalancing(config, model_config, handler, discovery, fingerprint, speed, compute)
            if auto and config.rebalance_interval > 0 and discovery.others
            else None,
            traversal.serve(),
        )
    log.info("stopped")


async def _cross_nat(
    traversal: Traversal,
    server: TransportServer,
    local: tuple[str, ...],
    discovery: Discovery,
    peer_id: str,
) -> None:
    """Learn whether others can dial this peer; relay, or reserve on relays (`swarm/traversal`)."""
    if discovery.refresh is not None:
        await discovery.refresh()

    def heard_of() -> list[Address]:
        return [
            parse_address(f"{r.addresses[0]}/{r.peer_id}")
            for r in merged(discovery.sources)
            if r.peer_id != peer_id and r.addresses
        ]

    await traversal.start(server, local, server.port, heard_of)


def _record(
    config: PeerConfig, facts: PeerFacts, handler: RequestHandler, traversal: Traversal
) -> PeerRecord:
    """The record to announce, at the addresses the traversal found (public, relayed, local)."""
    handler.extra["nat"] = traversal.summary()
    return replace(current_record(config, facts, handler.table), addresses=traversal.addresses)


async def _open_discovery(
    config: PeerConfig, identity: Identity, fingerprint: str, stack: AsyncExitStack
) -> Discovery:
    """Start browsing the swarm's records where the peer announces itself (closed by `stack`)."""
    discovery = Discovery([])
    if config.mdns_interfaces is not None:
        discovery.mdns = MdnsConfig(interfaces=config.mdns_interfaces or InterfaceChoice.All)
        browser = MdnsBrowser(discovery.mdns)
        await browser.start()
        stack.push_async_callback(browser.close)
        discovery.sources.append(browser)
        discovery.others = True
    if config.uses_dht:
        node = discovery.dht = await open_peer_dht(config, identity)
        stack.push_async_callback(node.close)
        key = dht_key(fingerprint)
        lookup = DhtLookup(lambda: node.get_records(key))
        discovery.sources.append(lookup)
        discovery.refresh = _logging_failures(lookup.refresh)
        discovery.others = discovery.others or bool(config.bootstrap)
    return discovery


def _logging_failures(refresh: Callable[[], Awaitable[None]]) -> Callable[[], Awaitable[None]]:
    async def safely() -> None:
        try:
            await refresh()
        except (TimeoutError, LayerswarmError) as e:  # choose from what is known so far
            log.warning("reading the DHT failed: %r", e)

    return safely


def _join_gpu_share(config: PeerConfig, device: torch.device) -> GpuShare | None:
    """This peer's entry among the peers of its GPU, or None (a CPU, or no folder to meet in)."""
    if device.type != "cuda" or config.gpu_share_dir is None:
        return None
    return GpuShare(config.gpu_share_dir, gpu_key(device.index or 0))


async def _auto_span(
    config: PeerConfig,
    model_config: ModelConfig,
    discovery: Discovery,
    fingerprint: str,
    share: GpuShare | None,
) -> Span:
    """The span this peer's budget holds, where the swarm is weakest."""
    records = await wait_for_coverage(
        discovery.sources,
        discovery.refresh,
        fingerprint,
        model_config.num_layers,
        config.discovery_wait if discovery.others else 0.0,
    )
    servers = [record_server(r) for r in records]
    device = torch.device(config.device)
    loading = share.peers(LOADING) if share is not None else 1
    budget = config.memory_budget_bytes or memory_budget(
        free_memory_bytes(device), device.type == "cuda", loading
    )
    # Every expert of a MoE layer counts in memory (shards.sizes), not only the active ones.
    per_layer = layer_weight_bytes(model_config, BYTES_PER_WEIGHT[config.quant][config.dtype])
    n = layers_that_fit(budget, per_layer, config.cache_memory_bytes, model_config.num_layers)
    span = choose_span(servers, model_config.num_layers, n)
    log.info(
        "chose layers %s (%d fit in %.0f MiB of %s) from %d peers' records",
        span,
        n,
        budget / 2**20,
        "VRAM" if device.type == "cuda" else "RAM",
        len(records),
    )
    return span


async def _serve_until_stopped(
    config: PeerConfig,
    table: SessionTable,
    handler: RequestHandler,
    server: TransportServer,
    stop: asyncio.Event,
    announcers: Sequence[Announcer],
    record: Callable[[], PeerRecord],
    on_announced: Callable[[], None],
    rebalancing: Coroutine[Any, Any, None] | None,
    traversal: Coroutine[Any, Any, None],
) -> None:
    loop = asyncio.get_running_loop()
    # A record must be re-put before it expires: at least every third of the DHT record's TTL.
    refresh = config.announce_refresh
    if any(isinstance(a, DhtAnnouncer) for a in announcers):
        refresh = min(refresh, config.record_ttl / 3)
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with asyncio.TaskGroup() as tasks:
            background = [
                tasks.create_task(table.serve_steps()),
                tasks.create_task(_expire_sessions(table, config.session_idle_timeout)),
                tasks.create_task(serve_announcements(announcers, record, refresh, on_announced)),
            ]
            background.append(tasks.create_task(traversal))
            if rebalancing is not None:
                background.append(tasks.create_task(rebalancing))
            await stop.wait()
            log.info("stopping: telling %d sessions' clients", len(table.sessions))
            handler.stopping = True
            await server.say_goodbye("the peer is shutting down")
            for task in background:
                task.cancel()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def _rebalancing(
    config: PeerConfig,
    model_config: ModelConfig,
    handler: RequestHandler,
    discovery: Discovery,
    fingerprint: str,
    speed: SpeedSample,
    compute: ThreadPoolExecutor,
) -> Coroutine[Any, Any, None]:
    async def load(span: Span) -> tuple[SpanModel, int]:
        gc.unfreeze()  # the span this one replaces must be collectable once dropped
        loop = asyncio.get_running_loop()
        model, _ = await loop.run_in_executor(
            compute, load_peer_model, config, model_config, span, None
        )
        return model, cache_tokens_for(config, model_config, span)

    return serve_rebalancing(
        config,
        model_config,
        handler,
        discovery.sources,
        discovery.refresh,
        fingerprint,
        1.0 / speed.decode_s_per_layer,
        load,
    )


async def _close_server(server: TransportServer, table: SessionTable) -> None:
    server.close()
    await server.wait_closed()
    table.shutdown()


async def _expire_sessions(table: SessionTable, idle_timeout: float) -> None:
    while True:
        await asyncio.sleep(min(idle_timeout / 4, 30.0))
        table.expire_idle(idle_timeout)
