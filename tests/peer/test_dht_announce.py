"""The DHT announcer against a stand-in store: what it puts, when it puts again, and leaving."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from layerswarm.errors import InvalidRecord, LayerswarmError
from layerswarm.peer.dht_announce import DhtAnnouncer
from layerswarm.swarm.discovery import dht_key
from layerswarm.swarm.identity import generate_identity
from layerswarm.swarm.records import PeerRecord, verify_record

ME = generate_identity()
RECORD = PeerRecord(
    peer_id=ME.peer_id,
    addresses=("127.0.0.1:4000",),
    model="smollm2-135m",
    model_hash="0123456789abcdef",
    span_start=0,
    span_end=15,
    num_layers=30,
    dtype="float32",
    software_version="0.1.0",
    protocol_version=1,
)
KEY = dht_key(RECORD.model_hash)


class Store:
    """Keeps what was put, as a `DhtNode` keeps its own values."""

    def __init__(self) -> None:
        self.values: dict[str, bytes] = {}
        self.puts = 0

    async def put_record(self, key: str, value: bytes) -> None:
        self.values[key] = value
        self.puts += 1

    async def remove_record(self, key: str) -> None:
        self.values.pop(key, None)


def test_puts_a_signed_record_valid_for_its_ttl_under_the_models_key() -> None:
    async def main() -> None:
        store = Store()
        announcer = DhtAnnouncer(store, ME, record_ttl=30.0)
        await announcer.start(RECORD)
        record = verify_record(store.values[KEY])
        assert record.expires_at - record.timestamp == 30.0
        assert dataclasses.replace(record, timestamp=0.0, expires_at=0.0) == RECORD
        await announcer.close()
        assert store.values == {}

    asyncio.run(main())


def test_puts_again_only_when_the_record_changes_or_is_due() -> None:
    async def main() -> None:
        store = Store()
        announcer = DhtAnnouncer(store, ME, record_ttl=0.3)  # due every 0.1 s
        await announcer.start(RECORD)
        await announcer.update(RECORD)
        assert store.puts == 1  # unchanged, not due
        await announcer.update(dataclasses.replace(RECORD, load=3))
        assert store.puts == 2 and verify_record(store.values[KEY]).load == 3
        await asyncio.sleep(announcer.refresh_interval)
        await announcer.update(dataclasses.replace(RECORD, load=3))
        assert store.puts == 3  # due: re-signed before it expires

    asyncio.run(main())


def test_an_announcer_refuses_a_record_of_another_model_or_peer() -> None:
    async def main() -> None:
        announcer = DhtAnnouncer(Store(), ME)
        with pytest.raises(LayerswarmError, match="not started"):
            await announcer.update(RECORD)
        await announcer.start(RECORD)
        with pytest.raises(LayerswarmError, match="model does not change"):
            await announcer.update(dataclasses.replace(RECORD, model_hash="fedcba9876543210"))
        other = generate_identity()
        with pytest.raises(InvalidRecord, match="signed by"):
            await announcer.update(dataclasses.replace(RECORD, peer_id=other.peer_id, load=1))

    asyncio.run(main())
