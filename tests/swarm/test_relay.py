"""Relays and dial-backs on loopback: reservations, relayed dials with TLS end to end, limits,
strangers and bad input (the NAT tests in namespaces are in `test_nat.py`)."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import msgpack
import pytest

from layerswarm.errors import PeerIdMismatch, PeerUnavailable, RemoteError
from layerswarm.swarm.dial import open_connection
from layerswarm.swarm.identity import Identity, generate_identity
from layerswarm.swarm.listen import ConnectionInfo, Server, serve_connections
from layerswarm.swarm.messages import (
    DialBack,
    DialBackReply,
    ErrorCode,
    ErrorReply,
    HolePunch,
    HolePunchSync,
    InfoReply,
    InfoRequest,
    Message,
    RelayConnect,
    Reserve,
)
from layerswarm.swarm.protocol import decode_frame, encode
from layerswarm.swarm.punch import HolePunchService, open_punched
from layerswarm.swarm.reachability import PRIVATE, PUBLIC, DialBackService, ask_dial_back
from layerswarm.swarm.relay import Relay, RelayConfig
from layerswarm.swarm.relay_ends import open_relay_stream
from layerswarm.swarm.reservation import Reservation
from layerswarm.swarm.services import SwarmServices
from layerswarm.swarm.transport import Address, TransportConfig, new_event_loop, parse_address

RELAY, TARGET, CLIENT = generate_identity(), generate_identity(), generate_identity()
TLS = TransportConfig(handshake_timeout=5.0, close_timeout=1.0, request_timeout=10.0)
LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": new_event_loop,
}


def run(loop_name: str, coro: Coroutine[Any, Any, None]) -> None:
    with asyncio.Runner(loop_factory=LOOPS[loop_name]) as runner:
        runner.run(asyncio.wait_for(coro, 60))


def info_handler(peer_id: str) -> Callable[[ConnectionInfo, Message], Coroutine[Any, Any, Message]]:
    async def handle(conn: ConnectionInfo, msg: Message) -> Message:
        if isinstance(msg, InfoRequest):
            return InfoReply(peer_id, "echo", 0, 1, 1, "float32", 0, 0, 0, {"from": conn.peer_id})
        raise RemoteError(ErrorCode.PROTOCOL, f"unexpected {type(msg).__name__}")

    return handle


@dataclass
class RelaySetup:
    relay: Relay
    relay_server: Server
    target_server: Server

    @property
    def relay_address(self) -> Address:
        return Address("127.0.0.1", self.relay_server.port, RELAY.peer_id)


@asynccontextmanager
async def relay_and_target(
    config: RelayConfig | None = None, punch: HolePunchService | None = None
) -> AsyncIterator[RelaySetup]:
    """A relay and a target (answering hole punches with `punch`, if given), on loopback."""
    relay = Relay(config or RelayConfig())
    await relay.open("127.0.0.1", 0)
    services = SwarmServices(info_handler(RELAY.peer_id), DialBackService(RELAY, TLS, 5.0))
    services.serve_relay(relay)
    relay_server = await serve_connections(services, "127.0.0.1", 0, RELAY, TLS)
    target_handler = info_handler(TARGET.peer_id)
    if punch is not None:
        target_handler = SwarmServices(target_handler, None, punch)
    target_server = await serve_connections(target_handler, "127.0.0.1", 0, TARGET, TLS)
    if punch is not None:
        punch.server = target_server
    try:
        yield RelaySetup(relay, relay_server, target_server)
    finally:
        for server in (target_server, relay_server):
            server.close()
            await server.wait_closed()
        relay.close()
        await relay.wait_closed()


@asynccontextmanager
async def holding(setup: RelaySetup, identity: Identity = TARGET) -> AsyncIterator[Reservation]:
    reservation = Reservation(setup.relay_address, identity, TLS, setup.target_server)
    held = asyncio.Event()
    task = asyncio.create_task(reservation.serve(held))
    try:
        await asyncio.wait_for(held.wait(), 10)
        yield reservation
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


@pytest.mark.parametrize("loop_name", LOOPS)
def test_dials_a_reserved_peer_through_the_relay_with_tls_to_the_target(loop_name: str) -> None:
    async def main() -> None:
        async with relay_and_target() as setup, holding(setup) as reservation:
            assert reservation.address is not None
            address = parse_address(f"{reservation.address}/{TARGET.peer_id}")
            assert address.relay == RELAY.peer_id and address.peer_id == TARGET.peer_id
            async with await open_connection(address, CLIENT, TLS) as conn:
                assert conn.peer_id == TARGET.peer_id
                reply = await conn.request(InfoRequest())
                assert isinstance(reply, InfoReply) and reply.peer_id == TARGET.peer_id
                assert reply.extra["from"] == CLIENT.peer_id  # the target saw the client's proof
            assert setup.relay.stats.circuits == 1 and setup.relay.stats.bytes_relayed > 0
            assert reservation.accepted == 1

    run(loop_name, main())


@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_hole_punch_replaces_the_relayed_connection_and_the_relay_carries_no_more(
    loop_name: str,
) -> None:
    """On loopback nothing stops the simultaneous open: the direct connection proves the
    target's ID, the target sees the client's, and steps no longer cross the relay."""

    async def main() -> None:
        punch = HolePunchService(TLS)
        async with relay_and_target(punch=punch) as setup, holding(setup) as reservation:
            address = parse_address(f"{reservation.address}/{TARGET.peer_id}")
            async with await open_punched(address, CLIENT, TLS) as conn:
                assert conn.address.relay is None and conn.peer_id == TARGET.peer_id
                assert punch.stats.punched == 1
                relayed = setup.relay.stats.bytes_relayed
                for _ in range(20):
                    reply = await conn.request(InfoRequest())
                    assert isinstance(reply, InfoReply) and reply.extra["from"] == CLIENT.peer_id
                assert setup.relay.stats.bytes_relayed == relayed

    run(loop_name, main())


def test_a_target_that_does_not_punch_leaves_the_connection_relayed_and_working() -> None:
    async def main() -> None:
        async with relay_and_target() as setup, holding(setup) as reservation:
            address = parse_address(f"{reservation.address}/{TARGET.peer_id}")
            async with await open_punched(address, CLIENT, TLS) as conn:
                assert conn.address.relay == RELAY.peer_id
                assert isinstance(await conn.request(InfoRequest()), InfoReply)

    run("uvloop", main())


def test_hole_punch_requests_off_a_relayed_connection_are_refused_and_the_peer_serves_on() -> None:
    async def main() -> None:
        punch = HolePunchService(TLS)
        async with relay_and_target(punch=punch) as setup:
            target = Address("127.0.0.1", setup.target_server.port, TARGET.peer_id)
            async with await open_connection(target, CLIENT, TLS) as conn:
                with pytest.raises(RemoteError, match="relayed connections only"):
                    await conn.request(HolePunch(("127.0.0.1:9",)))
                with pytest.raises(RemoteError, match="before hole_punch"):
                    await conn.request(HolePunchSync())
                assert isinstance(await conn.request(InfoRequest()), InfoReply)

    run("uvloop", main())


def test_a_relay_that_joins_another_peer_cannot_pose_as_the_target() -> None:
    """TLS runs end to end: whoever the relay joins must prove the pinned peer ID."""

    async def main() -> None:
        async with relay_and_target() as setup:
            impostor = await serve_connections(
                info_handler(CLIENT.peer_id), "127.0.0.1", 0, CLIENT, TLS
            )
            # TARGET reserves, but the streams it accepts are served by CLIENT's server: the
            # relay joins the dialer to a peer that is not TARGET.
            reservation = Reservation(setup.relay_address, TARGET, TLS, impostor)
            held = asyncio.Event()
            task = asyncio.create_task(reservation.serve(held))
            try:
                await asyncio.wait_for(held.wait(), 10)
                assert reservation.address is not None
                address = parse_address(f"{reservation.address}/{TARGET.peer_id}")
                with pytest.raises(PeerIdMismatch):
                    await open_connection(address, generate_identity(), TLS)
            finally:
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                impostor.close()
                await impostor.wait_closed()

    run("uvloop", main())


def test_stranger_without_reservation_is_refused_and_the_relay_serves_on() -> None:
    async def main() -> None:
        async with relay_and_target() as setup:
            nobody = Address("127.0.0.1", setup.relay.port, TARGET.peer_id, RELAY.peer_id)
            with pytest.raises(PeerUnavailable, match=r"no_reservation: .*no reservation"):
                await open_connection(nobody, CLIENT, TLS)
            async with await open_connection(setup.relay_address, CLIENT, TLS) as conn:
                with pytest.raises(RemoteError, match="no_reservation"):
                    from layerswarm.swarm.messages import AwaitRelayed

                    await conn.request(AwaitRelayed())
            async with holding(setup) as reservation:
                assert reservation.address is not None
                address = parse_address(f"{reservation.address}/{TARGET.peer_id}")
                async with await open_connection(address, CLIENT, TLS) as conn:
                    assert isinstance(await conn.request(InfoRequest()), InfoReply)

    run("uvloop", main())


def test_relay_at_its_limits_refuses_clearly_while_serving_its_reservations() -> None:
    config = RelayConfig(max_reservations=1, max_connections_per_reservation=1)

    async def main() -> None:
        async with relay_and_target(config) as setup, holding(setup) as reservation:
            assert reservation.address is not None
            async with await open_connection(setup.relay_address, CLIENT, TLS) as conn:
                with pytest.raises(RemoteError, match=r"resource_limit: .*max_reservations"):
                    await conn.request(Reserve())
            address = parse_address(f"{reservation.address}/{TARGET.peer_id}")
            async with await open_connection(address, CLIENT, TLS) as first:
                with pytest.raises(PeerUnavailable, match="max_connections_per_reservation"):
                    await open_connection(address, CLIENT, TLS)
                assert isinstance(await first.request(InfoRequest()), InfoReply)
            for _ in range(20):  # the relay counts the closed circuit down when it sees EOF
                if not any(r.circuits for r in setup.relay._reservations.values()):
                    break
                await asyncio.sleep(0.05)
            async with await open_connection(address, CLIENT, TLS) as again:
                assert isinstance(await again.request(InfoRequest()), InfoReply)

    run("uvloop", main())


def test_relay_limits_bytes_per_second() -> None:
    config = RelayConfig(max_bytes_per_s=4096)

    async def main() -> None:
        async with relay_and_target(config) as setup, holding(setup) as reservation:
            assert reservation.address is not None
            address = parse_address(f"{reservation.address}/{TARGET.peer_id}")
            async with await open_connection(address, CLIENT, TLS) as conn:
                loop = asyncio.get_running_loop()
                start = loop.time()
                for _ in range(8):  # ~1.5 KiB of TLS records each way a request
                    await conn.request(InfoRequest())
                relayed = setup.relay.stats.bytes_relayed
                # Throttled: not more than the rate allows since joining, plus one window.
                assert relayed <= 2 * 4096 * (loop.time() - start + 2)

    run("uvloop", main())


def raw_frame(header: dict[str, Any]) -> bytes:
    head = msgpack.packb(header)
    return struct.pack(">II", 4 + len(head), len(head)) + head


BAD_RELAY_FRAMES = {
    "garbage": b"\x00\x00\x00\x08garbage!",
    "oversized": struct.pack(">I", 10**6) + b"x" * 16,
    "wrong type": raw_frame({"type": "reserve", "id": 0}),
    "unknown type": raw_frame({"type": "nope", "id": 0}),
    "target not a str": raw_frame({"type": "relay_connect", "id": 0, "target": 7}),
    "short token": raw_frame({"type": "relay_accept", "id": 0, "token": b"abc"}),
    "unknown token": raw_frame({"type": "relay_accept", "id": 0, "token": b"t" * 16}),
}


@pytest.mark.parametrize("case", BAD_RELAY_FRAMES)
def test_bad_input_at_the_relay_port_gets_a_clear_error_and_the_relay_serves_on(case: str) -> None:
    async def main() -> None:
        async with relay_and_target() as setup, holding(setup) as reservation:
            reader, writer = await asyncio.open_connection("127.0.0.1", setup.relay.port)
            writer.write(BAD_RELAY_FRAMES[case])
            data = await asyncio.wait_for(reader.read(), 10)
            writer.close()
            _, reply = decode_frame(data, 2**16)
            assert isinstance(reply, ErrorReply) and reply.code == ErrorCode.PROTOCOL
            assert reply.message
            assert reservation.address is not None
            address = parse_address(f"{reservation.address}/{TARGET.peer_id}")
            async with await open_connection(address, CLIENT, TLS) as conn:
                assert isinstance(await conn.request(InfoRequest()), InfoReply)

    run("uvloop", main())


BAD_DATA_PLANE = {
    "dial_back port 0": {"type": "dial_back", "id": 1, "port": 0},
    "dial_back port str": {"type": "dial_back", "id": 1, "port": "80"},
    "dial_back extra field": {"type": "dial_back", "id": 1, "port": 80, "host": "10.0.0.1"},
    "reserve with a field": {"type": "reserve", "id": 1, "peer": "x"},
    "await_relayed with a field": {"type": "await_relayed", "id": 1, "token": b"x"},
    "hole_punch no address": {"type": "hole_punch", "id": 1, "addresses": []},
    "hole_punch five addresses": {"type": "hole_punch", "id": 1, "addresses": ["1.2.3.4:5"] * 5},
    "hole_punch address an int": {"type": "hole_punch", "id": 1, "addresses": [80]},
    "hole_punch address no port": {"type": "hole_punch", "id": 1, "addresses": ["host"]},
    "hole_punch_sync connected str": {"type": "hole_punch_sync", "id": 1, "connected": "y"},
}


@pytest.mark.parametrize("case", BAD_DATA_PLANE)
def test_bad_new_messages_on_the_data_plane_are_refused_and_the_peer_serves_on(case: str) -> None:
    """The wire's checks reject the malformed message; a fresh connection still works."""
    with pytest.raises(Exception, match=r"outside|must be|unexpected") as info:
        decode_frame(raw_frame(BAD_DATA_PLANE[case]))
    assert type(info.value).__name__ == "ProtocolError"


def test_dial_back_says_reachable_on_loopback_and_names_the_relay() -> None:
    async def main() -> None:
        async with relay_and_target() as setup:
            asker = setup.target_server.port
            found = await ask_dial_back([setup.relay_address], TARGET, asker, TLS, 10.0)
            assert found.status == PUBLIC
            assert found.public_address == f"127.0.0.1:{asker}"
            assert found.relays == [setup.relay_address]
            # A port where nobody (or somebody else) listens: not reachable, and why.
            other = await serve_connections(
                info_handler(CLIENT.peer_id), "127.0.0.1", 0, CLIENT, TLS
            )
            try:
                found = await ask_dial_back([setup.relay_address], TARGET, other.port, TLS, 10.0)
            finally:
                other.close()
                await other.wait_closed()
            assert found.status == PRIVATE and found.public_address is None
            assert PeerIdMismatch.__name__ in found.answers[0].reason

    run("uvloop", main())


def test_dial_back_reply_round_trips_and_a_peer_without_the_service_says_so() -> None:
    reply = DialBackReply(False, "203.0.113.5", 40000, "refused", 4001)
    assert decode_frame(b"".join(bytes(c) for c in encode(reply, 3))) == (3, reply)

    async def main() -> None:
        async with relay_and_target() as setup:
            target = Address("127.0.0.1", setup.target_server.port, TARGET.peer_id)
            async with await open_connection(target, CLIENT, TLS) as conn:
                with pytest.raises(RemoteError, match="unexpected DialBack"):
                    await conn.request(DialBack(1234))
            with pytest.raises(PeerUnavailable, match="refused"):
                await open_relay_stream(
                    "127.0.0.1", setup.relay.port, RelayConnect(CLIENT.peer_id), 5.0
                )

    run("uvloop", main())


def test_status_shows_a_relayed_peer_as_reached_through_its_relay() -> None:
    from layerswarm.cli.status import render_status
    from layerswarm.swarm.records import PeerRecord

    relayed = f"203.0.113.7:4001/{RELAY.peer_id}/p2p-circuit"
    record = PeerRecord(
        TARGET.peer_id, (relayed, "192.168.1.5:7000"), "m", "0123456789abcdef", 0, 2, 2,
        "float32", "0.1.0", 1, timestamp=1000.0, expires_at=2000.0,
    )  # fmt: skip
    text = render_status([record], 2, 1001.0)
    assert "relay 203.0.113.7:4001 (+1)  relayed" in text


def test_records_carry_relayed_addresses_and_relays_carry_records_in_bundles() -> None:
    from layerswarm.errors import InvalidRecord
    from layerswarm.swarm.records import (
        PeerRecord,
        bundle,
        sign_record,
        stamped,
        unbundle,
        verify_record,
    )

    relayed = f"203.0.113.7:4001/{RELAY.peer_id}/p2p-circuit"
    record = PeerRecord(
        TARGET.peer_id, (relayed, "192.168.1.5:7000"), "m", "0123456789abcdef", 0, 2, 2,
        "float32", "0.1.0", 1,
    )  # fmt: skip
    signed = sign_record(stamped(record, 60.0), TARGET)
    assert verify_record(signed).addresses == (relayed, "192.168.1.5:7000")
    other = sign_record(
        stamped(PeerRecord(RELAY.peer_id, *list(vars(record).values())[1:]), 60), RELAY
    )
    assert [verify_record(r).peer_id for r in unbundle(bundle([other, signed]))] == [
        RELAY.peer_id,
        TARGET.peer_id,
    ]
    assert unbundle(signed) == [signed]
    for bad in (f"203.0.113.7:4001/{RELAY.peer_id}/p2p", "203.0.113.7:4001/nope/p2p-circuit"):
        with pytest.raises(InvalidRecord, match="p2p-circuit"):
            sign_record(
                stamped(PeerRecord(TARGET.peer_id, (bad,), *list(vars(record).values())[2:]), 60),
                TARGET,
            )


def test_reserve_with_a_record_not_the_holders_own_is_refused_and_the_relay_serves_on() -> None:
    from layerswarm.swarm.records import PeerRecord, sign_record, stamped

    record = PeerRecord(
        TARGET.peer_id, ("10.0.0.1:7000",), "m", "0123456789abcdef", 0, 2, 2, "float32", "0.1.0", 1
    )
    theirs = sign_record(stamped(record, 60.0), TARGET)

    async def main() -> None:
        async with relay_and_target() as setup:
            async with await open_connection(setup.relay_address, CLIENT, TLS) as conn:
                with pytest.raises(RemoteError, match=r"protocol: .*another peer's"):
                    await conn.request(Reserve(theirs))
                with pytest.raises(RemoteError, match=r"protocol: .*invalid"):
                    await conn.request(Reserve(b"\x93" + b"x" * 40))
            assert setup.relay.carried() == []
            async with holding(setup) as reservation:
                assert reservation.address is not None

    run("uvloop", main())
