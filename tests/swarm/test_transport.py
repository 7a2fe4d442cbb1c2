"""Transport: requests over one connection, identity checks, and a server that survives abuse.

The core behaviours run against every (event loop, security) pair, one conformance suite for
asyncio and uvloop, TLS and plaintext.
"""

from __future__ import annotations

import asyncio
import random
import struct
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import pytest
import torch

from layerswarm.errors import (
    CacheFull,
    PeerIdMismatch,
    PeerUnavailable,
    ProtocolError,
    RemoteError,
    SessionExpired,
    SwarmKeyMismatch,
)
from layerswarm.swarm.dial import Connection, open_connection
from layerswarm.swarm.identity import generate_identity
from layerswarm.swarm.listen import ConnectionInfo, Server, serve_connections
from layerswarm.swarm.protocol import (
    PROTOCOL_VERSION,
    Closed,
    CloseSession,
    ErrorReply,
    Hello,
    InfoReply,
    InfoRequest,
    Message,
    OpenSession,
    SessionOpened,
    Step,
    StepResult,
    decode_frame,
    encode,
)
from layerswarm.swarm.transport import (
    Address,
    TransportConfig,
    new_event_loop,
    parse_address,
    swarm_key_proof,
    tls_context,
)

SERVER, CLIENT = generate_identity(), generate_identity()  # TLS contexts are made once for each
TLS = TransportConfig(handshake_timeout=2.0, close_timeout=1.0)
PLAIN = TransportConfig(handshake_timeout=2.0, close_timeout=1.0, insecure_plaintext=True)
LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": new_event_loop,
}
MODES = [(loop, security) for loop in LOOPS for security in ("tls", "plaintext")]
GUARD = 10.0  # s: a hung test fails instead of hanging; no test asserts a duration


def run(main: Callable[[], Coroutine[Any, Any, None]], loop: str = "asyncio") -> None:
    async def guarded() -> None:
        await asyncio.wait_for(main(), GUARD)

    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        runner.run(guarded())


async def echo(conn: ConnectionInfo, msg: Message) -> Message:
    """A stand-in for a peer: Step doubles the hidden states; InfoRequest names the client."""
    if isinstance(msg, Step):
        await asyncio.sleep(0.001 * (msg.start_position % 5))  # replies come back out of order
        return StepResult(msg.session_id, msg.hidden * 2)
    if isinstance(msg, InfoRequest):
        return InfoReply(SERVER.peer_id, conn.peer_id, 0, 1, 2, "float32", 0, 0, 0, {})
    if isinstance(msg, OpenSession):
        return SessionOpened(msg.session_id)
    if isinstance(msg, CloseSession):
        return Closed(msg.session_id)
    raise AssertionError(msg)


async def start(
    config: TransportConfig, handler: Callable[[ConnectionInfo, Message], Awaitable[Message]] = echo
) -> Server:
    return await serve_connections(handler, "127.0.0.1", 0, SERVER, config)


def here(server: Server, pin: str | None = None) -> Address:
    return Address("127.0.0.1", server.port, pin)


@pytest.mark.parametrize(("loop", "security"), MODES)
def test_request_gets_its_reply_and_both_sides_learn_each_others_id(
    loop: str, security: str
) -> None:
    config = TLS if security == "tls" else PLAIN

    async def main() -> None:
        async with (
            await start(config) as server,
            await open_connection(here(server), CLIENT, config) as conn,
        ):
            assert conn.peer_id == SERVER.peer_id
            info = await conn.request(InfoRequest())
            assert isinstance(info, InfoReply) and info.model == CLIENT.peer_id
            x = torch.randn(1, 3, 8, dtype=torch.bfloat16)
            reply = await conn.request(Step("s", x, 0))
            assert isinstance(reply, StepResult) and torch.equal(reply.hidden, x * 2)
            big = torch.randn(1, 300, 1000)  # 1.2 MB: bigger than any socket buffer
            reply = await conn.request(Step("s", big, 0))
            assert isinstance(reply, StepResult) and torch.equal(reply.hidden, big * 2)

    run(main, loop)


@pytest.mark.parametrize(("loop", "security"), MODES)
def test_fifty_concurrent_requests_share_one_connection(loop: str, security: str) -> None:
    config = TLS if security == "tls" else PLAIN

    async def main() -> None:
        async with (
            await start(config) as server,
            await open_connection(here(server), CLIENT, config) as conn,
        ):
            inputs = [torch.full((1, 2, 4), float(i)) for i in range(50)]
            replies = await asyncio.gather(
                *(conn.request(Step(f"s{i}", x, i)) for i, x in enumerate(inputs))
            )
            for i, (x, reply) in enumerate(zip(inputs, replies, strict=True)):
                assert isinstance(reply, StepResult) and reply.session_id == f"s{i}"
                assert torch.equal(reply.hidden, x * 2)

    run(main, loop)


def test_pinning_the_right_peer_id_connects() -> None:
    async def main() -> None:
        async with await start(TLS) as server:
            address = parse_address(f"127.0.0.1:{server.port}/{SERVER.peer_id}")
            async with await open_connection(address, CLIENT, TLS) as conn:
                assert isinstance(await conn.request(InfoRequest()), InfoReply)

    run(main)


@pytest.mark.parametrize("security", ["tls", "plaintext"])
def test_pinning_another_peer_id_is_refused(security: str) -> None:
    config = TLS if security == "tls" else PLAIN

    async def main() -> None:
        async with await start(config) as server:
            other = generate_identity().peer_id
            with pytest.raises(PeerIdMismatch, match=other):
                await open_connection(here(server, other), CLIENT, config)
            async with await open_connection(here(server), CLIENT, config) as conn:
                assert isinstance(await conn.request(InfoRequest()), InfoReply)

    run(main)


def test_plaintext_client_against_a_tls_server_fails_clearly() -> None:
    async def main() -> None:
        async with await start(TLS) as server:
            with pytest.raises(PeerUnavailable, match="TLS"):
                await open_connection(here(server), CLIENT, PLAIN)

    run(main)


def test_tls_client_against_a_plaintext_server_fails_clearly() -> None:
    async def main() -> None:
        async with await start(PLAIN) as server:
            with pytest.raises(PeerUnavailable, match=r"TLS handshake .* failed.*plaintext"):
                await open_connection(here(server), CLIENT, TLS)

    run(main)


def test_connecting_to_a_closed_port_raises_peer_unavailable() -> None:
    async def main() -> None:
        server = await start(PLAIN)
        address = here(server)
        server.close()
        await server.wait_closed()
        with pytest.raises(PeerUnavailable, match="cannot connect"):
            await open_connection(address, CLIENT, PLAIN)

    run(main)


def test_a_listener_that_never_answers_times_out_the_handshake() -> None:
    async def main() -> None:
        accepted: list[asyncio.StreamWriter] = []
        silent = await asyncio.start_server(lambda r, w: accepted.append(w), "127.0.0.1", 0)
        port = silent.sockets[0].getsockname()[1]
        config = TransportConfig(handshake_timeout=0.2, insecure_plaintext=True)
        with pytest.raises(PeerUnavailable, match="handshake"):
            await open_connection(Address("127.0.0.1", port), CLIENT, config)
        silent.close()
        for writer in accepted:
            writer.close()
        await silent.wait_closed()

    run(main)


async def failing(conn: ConnectionInfo, msg: Message) -> Message:
    if isinstance(msg, OpenSession):
        errors: dict[str, Exception] = {
            "bad": RemoteError("bad_span", "layers 0-3 only"),
            "full": CacheFull("no room"),
            "gone": SessionExpired("expired"),
            "proto": ProtocolError("odd request"),
            "bug": ValueError("oops"),
        }
        raise errors[msg.session_id]
    if isinstance(msg, CloseSession):
        return StepResult("s", torch.zeros(2, 2, 2))  # an invalid reply: batch 2
    return await echo(conn, msg)


def test_handler_errors_become_error_replies_and_the_connection_goes_on() -> None:
    expected = {
        "bad": "bad_span",
        "full": "cache_full",
        "gone": "unknown_session",
        "proto": "protocol",
        "bug": "internal",
    }

    async def main() -> None:
        async with (
            await start(TLS, failing) as server,
            await open_connection(here(server), CLIENT, TLS) as conn,
        ):
            for session, code in expected.items():
                with pytest.raises(RemoteError) as error:
                    await conn.request(OpenSession(session, 0, 1, 8))
                assert error.value.code == code
            with pytest.raises(RemoteError, match="internal: invalid reply"):
                await conn.request(CloseSession("s"))
            with pytest.raises(RemoteError, match="protocol: StepResult is not a request"):
                await conn.request(StepResult("s", torch.zeros(1, 1, 1)))
            assert isinstance(await conn.request(InfoRequest()), InfoReply)

    run(main)


def test_a_slow_reply_times_out_and_the_connection_goes_on() -> None:
    async def main() -> None:
        async with (
            await start(TLS) as server,
            await open_connection(here(server), CLIENT, TLS) as conn,
        ):
            with pytest.raises(PeerUnavailable, match="no reply within"):
                await conn.request(Step("s", torch.zeros(1, 1, 1), 4), timeout=0.001)
            assert isinstance(await conn.request(InfoRequest()), InfoReply)

    run(main)


def test_a_request_over_the_servers_frame_limit_is_refused_before_sending() -> None:
    async def main() -> None:
        small = TransportConfig(max_frame_bytes=4096)
        async with (
            await start(small) as server,
            await open_connection(here(server), CLIENT, TLS) as conn,
        ):
            with pytest.raises(ProtocolError, match="peer's limit"):
                await conn.request(Step("s", torch.zeros(1, 32, 32), 0))
            assert isinstance(await conn.request(InfoRequest()), InfoReply)

    run(main)


# --- raw bytes against a plaintext server (the framing code is the same under TLS) -------------


async def raw_connect(server: Server) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.writelines(encode(Hello(PROTOCOL_VERSION, CLIENT.peer_id), 0))
    reply = await read_frame(reader)
    assert isinstance(reply, Hello) and reply.peer_id == SERVER.peer_id
    return reader, writer


async def read_frame(reader: asyncio.StreamReader) -> Message:
    prefix = await reader.readexactly(4)
    (length,) = struct.unpack(">I", prefix)
    return decode_frame(prefix + await reader.readexactly(length))[1]


async def assert_refused(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, text: str
) -> None:
    """The server answers with a protocol error that contains `text`, then hangs up."""
    reply = await read_frame(reader)
    assert isinstance(reply, ErrorReply) and reply.code == "protocol", reply
    assert text in reply.message
    assert await reader.read() == b""
    writer.close()
    await writer.wait_closed()


async def still_serves(server: Server) -> None:
    async with await open_connection(here(server), CLIENT, PLAIN) as conn:
        assert isinstance(await conn.request(InfoRequest()), InfoReply)


def test_an_oversized_frame_gets_an_error_and_the_server_serves_on() -> None:
    async def main() -> None:
        async with await start(PLAIN) as server:
            reader, writer = await raw_connect(server)
            writer.write(struct.pack(">II", 2**31, 10) + b"x" * 100)
            await assert_refused(reader, writer, "exceeds the limit")
            await still_serves(server)

    run(main)


@pytest.mark.parametrize("after_hello", [False, True])
@pytest.mark.parametrize("seed", range(3))
def test_random_bytes_get_an_error_and_the_server_serves_on(seed: int, after_hello: bool) -> None:
    rng = random.Random(seed)
    body = bytes(rng.randrange(256) for _ in range(rng.randrange(5, 200)))

    async def main() -> None:
        async with await start(PLAIN) as server:
            if after_hello:
                reader, writer = await raw_connect(server)
            else:
                reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(struct.pack(">I", len(body)) + body)
            await assert_refused(reader, writer, "")
            await still_serves(server)

    run(main)


def test_a_wrong_protocol_version_is_refused_naming_both_versions() -> None:
    async def main() -> None:
        async with await start(PLAIN) as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            hello = encode(Hello(PROTOCOL_VERSION + 1, CLIENT.peer_id), 0)
            writer.write(b"".join(bytes(chunk) for chunk in hello))
            await assert_refused(reader, writer, f"version {PROTOCOL_VERSION + 1}, this side")
            await still_serves(server)

    run(main)


def test_a_request_before_hello_is_refused() -> None:
    async def main() -> None:
        async with await start(PLAIN) as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.writelines(encode(InfoRequest(), 1))
            await assert_refused(reader, writer, "expected Hello")

    run(main)


def test_a_client_gone_mid_frame_or_mid_request_leaves_the_server_serving() -> None:
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def stuck(conn: ConnectionInfo, msg: Message) -> Message:
        if isinstance(msg, OpenSession):
            started.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.set()
                raise
        return await echo(conn, msg)

    async def main() -> None:
        gone: list[ConnectionInfo] = []
        server = await serve_connections(
            stuck, "127.0.0.1", 0, SERVER, PLAIN, on_disconnect=gone.append
        )
        async with server:
            _, writer = await raw_connect(server)
            step = b"".join(bytes(c) for c in encode(Step("s", torch.zeros(1, 8, 8), 0), 1))
            writer.write(step[: len(step) // 2])
            await writer.drain()
            writer.close()
            await writer.wait_closed()
            await still_serves(server)

            _, writer = await raw_connect(server)
            writer.writelines(encode(OpenSession("s", 0, 1, 8), 1))
            await started.wait()
            writer.close()
            await writer.wait_closed()
            await cancelled.wait()  # the server cancels the orphaned request
            await still_serves(server)
            assert [info.peer_id for info in gone] == [CLIENT.peer_id] * 4

    started, cancelled = asyncio.Event(), asyncio.Event()
    run(main)


def test_a_server_runs_at_most_max_concurrent_requests_of_a_connection_at_once() -> None:
    running, most = 0, 0

    async def counting(conn: ConnectionInfo, msg: Message) -> Message:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await asyncio.sleep(0.002)
        running -= 1
        return await echo(conn, msg)

    async def main() -> None:
        config = TransportConfig(max_concurrent_requests=3, insecure_plaintext=True)
        async with (
            await start(config, counting) as server,
            await open_connection(here(server), CLIENT, config) as conn,
        ):
            replies = await asyncio.gather(*(conn.request(InfoRequest()) for _ in range(20)))
            assert all(isinstance(reply, InfoReply) for reply in replies)
            assert most == 3

    run(main)


@pytest.mark.parametrize(("loop", "security"), MODES)
def test_closing_the_server_fails_requests_in_flight_at_once(loop: str, security: str) -> None:
    config = TLS if security == "tls" else PLAIN

    async def main() -> None:
        arrived = asyncio.Semaphore(0)

        async def stuck(conn: ConnectionInfo, msg: Message) -> Message:
            arrived.release()
            await asyncio.Event().wait()
            raise AssertionError("unreachable")

        server = await start(config, stuck)
        conn = await open_connection(here(server), CLIENT, config)
        requests = [asyncio.ensure_future(conn.request(InfoRequest())) for _ in range(5)]
        for _ in requests:
            await arrived.acquire()
        server.close()
        results = await asyncio.gather(*requests, return_exceptions=True)
        assert all(isinstance(r, PeerUnavailable) for r in results), results
        assert conn.closed
        with pytest.raises(PeerUnavailable):
            await conn.request(InfoRequest())
        await server.wait_closed()
        conn.close()
        await conn.wait_closed()

    run(main, loop)


def test_closing_the_client_fails_its_requests_in_flight() -> None:
    async def main() -> None:
        async with await start(TLS) as server:
            conn = await open_connection(here(server), CLIENT, TLS)
            request = asyncio.ensure_future(conn.request(Step("s", torch.zeros(1, 1, 1), 4)))
            await asyncio.sleep(0)
            conn.close()
            with pytest.raises(PeerUnavailable, match="closed by this side"):
                await request
            await conn.wait_closed()

    run(main)


@pytest.mark.parametrize("security", ["tls", "plaintext"])
def test_goodbye_reaches_clients_and_new_clients_are_turned_away(security: str) -> None:
    config = TLS if security == "tls" else PLAIN

    async def main() -> None:
        said = asyncio.Event()
        heard: list[tuple[Connection, str]] = []

        def on_goodbye(conn: Connection, reason: str) -> None:
            heard.append((conn, reason))
            said.set()

        async with await start(config) as server:
            conn = await open_connection(here(server), CLIENT, config, on_goodbye=on_goodbye)
            await server.say_goodbye("restarting for an upgrade")
            await said.wait()
            assert heard == [(conn, "restarting for an upgrade")]
            assert conn.goodbye_reason == "restarting for an upgrade"
            assert isinstance(await conn.request(InfoRequest()), InfoReply)  # still served
            with pytest.raises(PeerUnavailable, match="shutting_down"):
                await open_connection(here(server), CLIENT, config)
            conn.close()
            await conn.wait_closed()

    run(main)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:8000", Address("127.0.0.1", 8000)),
        ("peer.lan:31337", Address("peer.lan", 31337)),
        ("[::1]:9/" + SERVER.peer_id, Address("::1", 9, SERVER.peer_id)),
        (f"10.0.0.2:1/{SERVER.peer_id}", Address("10.0.0.2", 1, SERVER.peer_id)),
    ],
)
def test_addresses_parse_and_print_back(text: str, expected: Address) -> None:
    assert parse_address(text) == expected
    assert parse_address(str(expected)) == expected


@pytest.mark.parametrize(
    "text", ["", "host", "host:", ":80", "host:0", "host:65536", "host:http", "h:1/notapeerid"]
)
def test_bad_addresses_raise_value_error(text: str) -> None:
    with pytest.raises(ValueError):
        parse_address(text)


# --- private swarms: both sides prove they hold the swarm key ----------------------------------

SWARM_KEY, OTHER_KEY = bytes(range(32)), bytes(range(1, 33))


def keyed(key: bytes | None) -> TransportConfig:
    return TransportConfig(handshake_timeout=2.0, close_timeout=1.0, swarm_key=key)


def test_a_private_swarm_serves_holders_of_its_key_and_refuses_everyone_else() -> None:
    async def main() -> None:
        async with await start(keyed(SWARM_KEY)) as server:
            for key, text in [
                (None, "in a private swarm: connect with its swarm key"),
                (OTHER_KEY, "another private swarm"),
            ]:
                with pytest.raises(SwarmKeyMismatch, match=text):
                    await open_connection(here(server), CLIENT, keyed(key))
            async with await open_connection(here(server), CLIENT, keyed(SWARM_KEY)) as conn:
                assert isinstance(await conn.request(InfoRequest()), InfoReply)

    run(main)


def test_a_client_with_a_swarm_key_is_refused_by_a_peer_outside_private_swarms() -> None:
    async def main() -> None:
        async with await start(TLS) as server:
            with pytest.raises(SwarmKeyMismatch, match="not in a private swarm"):
                await open_connection(here(server), CLIENT, keyed(SWARM_KEY))
            async with await open_connection(here(server), CLIENT, TLS) as conn:
                assert isinstance(await conn.request(InfoRequest()), InfoReply)

    run(main)


@pytest.mark.parametrize("proof", ["none", "wrong"])
def test_a_client_with_a_swarm_key_refuses_a_peer_that_cannot_prove_it(proof: str) -> None:
    """A peer that lets anyone in (not ours: a raw TLS server) must still prove the key."""
    seen: list[bytes | None] = []

    async def fake_peer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hello = await read_frame(reader)
        assert isinstance(hello, Hello)
        seen.append(hello.psk_proof)
        mine = swarm_key_proof(OTHER_KEY, SERVER.peer_id, CLIENT.peer_id)
        reply = Hello(
            PROTOCOL_VERSION, SERVER.peer_id, psk_proof=mine if proof == "wrong" else None
        )
        writer.writelines(encode(reply, 0))
        await reader.read()  # until the client hangs up
        writer.close()

    async def main() -> None:
        context = tls_context(SERVER, server=True)
        listener = await asyncio.start_server(fake_peer, "127.0.0.1", 0, ssl=context)
        try:
            port = listener.sockets[0].getsockname()[1]
            address = Address("127.0.0.1", port)
            text = "no swarm key" if proof == "none" else "another private swarm"
            with pytest.raises(SwarmKeyMismatch, match=text):
                await open_connection(address, CLIENT, keyed(SWARM_KEY))
        finally:
            listener.close()
            await listener.wait_closed()
        # The client's own proof is bound to both peer IDs.
        assert seen == [swarm_key_proof(SWARM_KEY, CLIENT.peer_id, SERVER.peer_id)]

    run(main)


def test_a_swarm_key_needs_32_bytes_and_tls() -> None:
    with pytest.raises(ValueError, match="expected 32"):
        TransportConfig(swarm_key=b"short")
    with pytest.raises(ValueError, match="needs TLS"):
        TransportConfig(swarm_key=SWARM_KEY, insecure_plaintext=True)
