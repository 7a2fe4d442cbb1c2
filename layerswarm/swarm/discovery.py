"""Where peer records come from: mDNS on the LAN and the DHT on the WAN, merged into one view."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from layerswarm.errors import InvalidRecord
from layerswarm.swarm.records import PeerRecord, unbundle, verify_record


def dht_key(model_hash: str) -> str:
    """The DHT key under which every peer of a model publishes its signed record."""
    return f"layerswarm/model/{model_hash}"


class RecordSource(Protocol):
    """Something that yields verified peer records (an `MdnsBrowser` is one)."""

    def records(self, model_hash: str | None = None) -> list[PeerRecord]: ...


class DhtLookup:
    """Records fetched from the DHT on demand, verified here, kept until they expire."""

    def __init__(self, fetch: Callable[[], Awaitable[list[bytes]]]) -> None:
        self._fetch = fetch  # returns the signed records stored under the model's key
        self._records: dict[str, PeerRecord] = {}

    async def refresh(self) -> None:
        for value in await self._fetch():
            for data in unbundle(value):  # a relay's value carries its holders' records too
                try:
                    record = verify_record(data)
                except InvalidRecord:
                    continue  # tampered, forged, expired or from the future: not ours to use
                held = self._records.get(record.peer_id)
                if held is None or held.timestamp < record.timestamp:
                    self._records[record.peer_id] = record

    def records(self, model_hash: str | None = None) -> list[PeerRecord]:
        now = time.time()
        return [
            r
            for r in self._records.values()
            if r.expires_at > now and model_hash in (None, r.model_hash)
        ]


def merged(sources: Sequence[RecordSource], model_hash: str | None = None) -> list[PeerRecord]:
    """Every source's records, the newest one per peer, sorted by peer ID."""
    best: dict[str, PeerRecord] = {}
    for source in sources:
        for r in source.records(model_hash):
            if r.peer_id not in best or best[r.peer_id].timestamp < r.timestamp:
                best[r.peer_id] = r
    return sorted(best.values(), key=lambda r: r.peer_id)


async def wait_for_coverage(
    sources: Sequence[RecordSource],
    refresh: Callable[[], Awaitable[None]] | None,
    model_hash: str,
    num_layers: int,
    timeout: float,
) -> list[PeerRecord]:
    """Wait until the records cover every layer (or the timeout passes); return them.

    `refresh`, when given, is awaited before each look (a DHT query); mDNS needs none.
    """
    deadline = time.monotonic() + timeout
    while True:
        if refresh is not None:
            await refresh()
        records = merged(sources, model_hash)
        covered = {n for r in records for n in range(r.span_start, r.span_end)}
        if len(covered) >= num_layers or time.monotonic() >= deadline:
            return records
        await asyncio.sleep(0.2)
