"""What a peer announces about itself, and where: mDNS on the LAN, the DHT on the WAN.

The record is rebuilt from live state every `refresh` seconds (free cache, load), signed, and
handed to each announcer; announcers re-send only what changed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import layerswarm
from layerswarm.peer.config import PeerConfig
from layerswarm.peer.measure import SpeedSample, free_memory_bytes, memory_total_bytes
from layerswarm.peer.placement import device_share
from layerswarm.peer.sessions import SessionTable
from layerswarm.swarm.protocol import PROTOCOL_VERSION
from layerswarm.swarm.records import PeerRecord

log = logging.getLogger(__name__)


class Announcer(Protocol):
    """Somewhere a peer's record is published (mDNS, the DHT)."""

    async def start(self, record: PeerRecord) -> None: ...

    async def update(self, record: PeerRecord) -> None: ...

    async def close(self) -> None: ...


@dataclass(frozen=True)
class PeerFacts:
    """What does not change while a peer runs."""

    peer_id: str
    addresses: tuple[str, ...]  # host:port clients can dial
    model: str
    model_hash: str
    num_layers: int
    speed: SpeedSample
    tflops: float  # measured on the serving device, in the compute dtype
    device: str = "cpu"  # the torch device the span runs on ("cuda:0")
    device_name: str = "cpu"  # what records call it: "cpu" or the GPU's name
    # how many peers share the device now (this one included): each announces an equal part
    peers_on_device: Callable[[], int] = lambda: 1


def current_record(config: PeerConfig, facts: PeerFacts, table: SessionTable) -> PeerRecord:
    """The peer's record as of now (unsigned, unstamped: announcers do both)."""
    span = table.model.span
    free, total = device_share(
        free_memory_bytes(facts.device), memory_total_bytes(facts.device), facts.peers_on_device()
    )
    return PeerRecord(
        peer_id=facts.peer_id,
        addresses=facts.addresses,
        model=facts.model[:200],
        model_hash=facts.model_hash,
        span_start=span.start,
        span_end=span.end,
        num_layers=facts.num_layers,
        dtype=config.dtype,
        software_version=layerswarm.__version__,
        protocol_version=PROTOCOL_VERSION,
        quant=config.quant,
        free_memory_bytes=free,
        tflops=round(facts.tflops, 4),
        prefill_tokens_per_s_per_layer=round(facts.speed.prefill_tokens_per_s_per_layer, 2),
        decode_steps_per_s_per_layer=round(1.0 / facts.speed.decode_s_per_layer, 2),
        cache_tokens_free=table.tokens_free,
        cache_tokens_total=table.cache.tokens_total,
        load=len(table.sessions),
        device=facts.device_name,
        total_memory_bytes=total,
    )


def reachable_addresses(host: str, port: int) -> tuple[str, ...]:
    """`host:port` for a specific host; for 0.0.0.0, the machine's IPv4 addresses (up to 4)."""
    if host not in ("0.0.0.0", ""):
        return (f"{host}:{port}",)
    import ifaddr  # comes with zeroconf

    ips = [
        ip.ip
        for adapter in ifaddr.get_adapters()
        for ip in adapter.ips
        if isinstance(ip.ip, str) and not ip.ip.startswith("127.")
    ]
    return tuple(f"{ip}:{port}" for ip in ips[:4]) or (f"127.0.0.1:{port}",)


async def serve_announcements(
    announcers: Sequence[Announcer],
    record: Callable[[], PeerRecord],
    refresh: float,
    on_started: Callable[[], None] | None = None,
) -> None:
    """Publish the record everywhere, then keep it fresh until cancelled; unpublish at the end.

    `on_started` is called once every announcer has published (at once if there are none).
    """
    started: list[Announcer] = []
    try:
        for a in announcers:
            await a.start(record())
            started.append(a)
        if on_started is not None:
            on_started()
        while True:
            await asyncio.sleep(refresh)
            for a in started:
                try:
                    await a.update(record())
                except Exception:  # one failing announcer must not stop the peer serving
                    log.exception("could not update an announcement")
    finally:
        for a in started:
            try:
                await asyncio.wait_for(a.close(), 5.0)
            except Exception as e:  # leaving anyway; records expire on their own
                log.debug("closing an announcer: %s", e)
