"""Moving a peer's span when the swarm changes: an auto-placed peer fills gaps others leave.

Every `rebalance_interval` seconds the peer reads the swarm's records and asks the pure
`placement.should_move` whether to move (it answers yes for a gap that this peer's layers,
served by others too, can fill, or for a large gain at the swarm's weakest layer, and no
otherwise: hysteresis). To move, the peer loads the new span beside the old one, then swaps it
in: the old span's sessions end there, and their clients reroute and replay as after any failure.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence

from layerswarm.peer.config import PeerConfig
from layerswarm.peer.handler import RequestHandler
from layerswarm.peer.placement import Server, record_server, should_move
from layerswarm.shards.blocks import SpanModel
from layerswarm.shards.config import ModelConfig, Span
from layerswarm.swarm.discovery import RecordSource, merged

log = logging.getLogger(__name__)

LoadSpan = Callable[[Span], Awaitable[tuple[SpanModel, int]]]  # span -> (model, cache tokens)


async def serve_rebalancing(
    config: PeerConfig,
    model_config: ModelConfig,
    handler: RequestHandler,
    sources: Sequence[RecordSource],
    refresh: Callable[[], Awaitable[None]] | None,
    fingerprint: str,
    speed: float,
    load_span: LoadSpan,
) -> None:
    """Until cancelled: look at the swarm now and then, and move when placement says so.

    Args:
        speed: this peer's measured decode steps/s of one layer (as it announces).
        load_span: loads (and quantizes) another span, off the event loop.
    """
    while True:
        await asyncio.sleep(config.rebalance_interval)
        if refresh is not None:
            await refresh()
        current = handler.table.model.span
        others = [
            record_server(r) for r in merged(sources, fingerprint) if r.peer_id != handler.peer_id
        ]
        me = Server(handler.peer_id, current, speed)
        target = should_move([*others, me], model_config.num_layers, me)
        if target is None:
            continue
        log.info("moving from layers %s to %s, where the swarm needs them", current, target)
        model, cache_tokens = await load_span(target)
        dropped = handler.table.replace_model(model, cache_tokens)
        log.info("now serving layers %s (%d sessions on the old span ended)", target, dropped)
