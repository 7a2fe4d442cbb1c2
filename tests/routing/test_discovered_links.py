"""Links to discovered peers: one per peer, relayed ones told apart by peer ID, and every
address of a record kept to dial in turn."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from layerswarm.errors import PeerUnavailable
from layerswarm.routing.peer_link import PeerLink, link_key, open_link, record_addresses
from layerswarm.routing.swarm_client import SwarmClient
from layerswarm.swarm.dial import Connection
from layerswarm.swarm.identity import generate_identity
from layerswarm.swarm.listen import ConnectionInfo, serve_connections
from layerswarm.swarm.protocol import Message
from layerswarm.swarm.records import PeerRecord
from layerswarm.swarm.transport import Address, TransportConfig, parse_address

MODEL = "0123456789abcdef"
RELAY, RELAY2, HOME_A, HOME_B, PUBLIC = (generate_identity().peer_id for _ in range(5))


def record(peer_id: str, *addresses: str) -> PeerRecord:
    return PeerRecord(
        peer_id=peer_id,
        addresses=addresses,
        model="m",
        model_hash=MODEL,
        span_start=0,
        span_end=30,
        num_layers=30,
        dtype="float32",
        software_version="0.1.0",
        protocol_version=1,
        timestamp=time.time(),
        expires_at=time.time() + 60.0,
    )


class Records:
    def __init__(self, *records: PeerRecord) -> None:
        self.held = list(records)

    def records(self, model_hash: str | None = None) -> list[PeerRecord]:
        return [r for r in self.held if model_hash in (None, r.model_hash)]


def client_with(source: Records, given: list[str] = ()) -> SwarmClient:  # type: ignore[assignment]
    client = SwarmClient.__new__(SwarmClient)  # no network: only the link bookkeeping runs
    client.sources, client.fingerprint = [source], MODEL
    client.links = [PeerLink(parse_address(a)) for a in given]
    return client


def test_two_peers_behind_one_relay_get_a_link_each() -> None:
    via = f"11.99.0.1:4001/{RELAY}/p2p-circuit"
    client = client_with(Records(record(HOME_A, via), record(HOME_B, via)))
    client._adopt_discovered()
    assert sorted(str(link.address) for link in client.links) == sorted(
        [f"{via}/{HOME_A}", f"{via}/{HOME_B}"]
    )


def test_a_peer_given_by_host_and_port_is_not_added_again_by_discovery() -> None:
    client = client_with(Records(record(PUBLIC, "11.99.0.1:5000")), ["11.99.0.1:5000"])
    client._adopt_discovered()
    assert [str(link.address) for link in client.links] == ["11.99.0.1:5000"]


def test_a_records_other_addresses_are_kept_and_follow_a_newer_record() -> None:
    first, second = (f"11.99.0.{n}:4001/{r}/p2p-circuit" for n, r in ((1, RELAY), (2, RELAY2)))
    source = Records(record(HOME_A, first, second, "10.101.0.2:7000"))
    client = client_with(source)
    client._adopt_discovered()
    (link,) = client.links
    assert [str(a) for a in link.candidates()] == [
        f"{first}/{HOME_A}",
        f"{second}/{HOME_A}",
        f"10.101.0.2:7000/{HOME_A}",
    ]
    source.held = [record(HOME_A, second)]  # the first relay is gone: a newer record says so
    client._adopt_discovered()
    assert client.links == [link]
    assert [str(a) for a in link.candidates()] == [f"{first}/{HOME_A}", f"{second}/{HOME_A}"]


def test_record_addresses_pins_the_records_peer_and_leaves_out_what_cannot_be_dialed() -> None:
    got = record_addresses(
        record(HOME_A, "host:port", f"11.99.0.1:4001/{PUBLIC}", "11.99.0.1:4001", "11.99.0.1:4001")
    )
    assert [str(a) for a in got] == [f"11.99.0.1:4001/{HOME_A}"]
    relayed = parse_address(f"11.99.0.1:4001/{RELAY}/p2p-circuit/{HOME_A}")
    assert link_key(relayed) == HOME_A
    assert link_key(parse_address("11.99.0.1:4001")) == ("11.99.0.1", 4001)


async def _answer(conn: ConnectionInfo, msg: Message) -> Message:
    raise AssertionError(msg)  # only dialed here


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_link_dials_its_records_next_address_when_the_one_that_worked_last_is_dead() -> None:
    peer, me = generate_identity(), generate_identity()
    transport = TransportConfig(connect_timeout=2.0, handshake_timeout=2.0, close_timeout=1.0)

    async def main() -> None:
        async with await serve_connections(_answer, "127.0.0.1", 0, peer, transport) as server:
            dead = Address("127.0.0.1", _closed_port(), peer.peer_id)
            live = Address("127.0.0.1", server.port, peer.peer_id)
            link = PeerLink(dead, discovered=True, addresses=(dead, live))
            conn = await open_link(link, me, transport)
            assert conn.peer_id == peer.peer_id and link.address == live
            conn.close()
            await conn.wait_closed()
            lost = PeerLink(dead, discovered=True, addresses=(dead,))
            with pytest.raises(PeerUnavailable):
                await open_link(lost, me, transport)

    asyncio.run(asyncio.wait_for(main(), 20))


def test_a_link_says_whether_it_reaches_its_peer_directly_relayed_or_punched() -> None:
    """A punched link keeps its relayed address (routes name it, the next hop dials it) but
    its connection goes direct: the router's view no longer counts the relay's detour."""

    async def main() -> None:  # a Connection needs a running loop, even unconnected
        via = parse_address(f"11.99.0.1:4001/{RELAY}/p2p-circuit/{HOME_A}")
        link = PeerLink(via)
        assert link.reach == "relayed"
        link.conn = Connection(via, TransportConfig(), None)
        assert link.reach == "relayed"
        link.conn = Connection(Address("11.99.0.12", 40001, HOME_A), TransportConfig(), None)
        assert link.reach == "punched"
        assert PeerLink(Address("11.99.0.1", 7000, PUBLIC)).reach == "direct"

    asyncio.run(main())
