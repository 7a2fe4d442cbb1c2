"""A real peer process answers bad requests with clear errors and goes on serving good ones."""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import msgpack
import pytest
import torch

from layerswarm.errors import PeerIdMismatch, PeerUnavailable, ProtocolError, RemoteError
from layerswarm.peer.launch import PeerProcess, start_peer
from layerswarm.shards.config import Span
from layerswarm.swarm.dial import Connection, open_connection
from layerswarm.swarm.identity import generate_identity
from layerswarm.swarm.protocol import (
    CloseSession,
    Hello,
    InfoReply,
    InfoRequest,
    OpenSession,
    Step,
    StepResult,
    encode,
)
from layerswarm.swarm.transport import TransportConfig, new_event_loop, parse_address

HIDDEN = 64


@pytest.fixture(scope="module")
def tiny_dir(tiny_llama_dir: Path) -> Path:
    return tiny_llama_dir  # hidden size HIDDEN


def _peer(tiny_dir: Path, workdir: Path, *extra: str) -> Iterator[PeerProcess]:
    peer = start_peer(
        tiny_dir,
        Span(0, 2),
        workdir,
        # 0.0625 MiB holds 128 tokens of 2 layers: 8 pages of 16
        [
            *("--cache-memory", "0.0625", "--max-session-length", "64"),
            *("--admission-timeout", "0.5", *extra),
        ],
    )
    try:
        yield peer
    finally:
        assert peer.stop() == 0


@pytest.fixture(scope="module")
def peer(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PeerProcess]:
    yield from _peer(tiny_dir, tmp_path_factory.mktemp("peer"))


@pytest.fixture(scope="module")
def plain_peer(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PeerProcess]:
    yield from _peer(tiny_dir, tmp_path_factory.mktemp("plain"), "--insecure-plaintext")


def run(fn: Callable[[], Awaitable[None]]) -> None:
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        runner.run(asyncio.wait_for(fn(), 60))  # type: ignore[arg-type]


async def connect(peer: PeerProcess, plaintext: bool = False) -> Connection:
    config = TransportConfig(insecure_plaintext=plaintext)
    return await open_connection(parse_address(peer.address), generate_identity(), config)


async def still_serves(peer: PeerProcess, plaintext: bool = False) -> None:
    """The peer answers a whole good session after whatever came before."""
    async with await connect(peer, plaintext) as conn:
        await conn.request(OpenSession("good", 0, 2, 8))
        reply = await conn.request(Step("good", torch.randn(1, 3, HIDDEN), 0))
        assert isinstance(reply, StepResult) and reply.hidden.shape == (1, 3, HIDDEN)
        await conn.request(CloseSession("good"))


def test_info_names_the_span_and_cache(peer: PeerProcess) -> None:
    async def go() -> None:
        async with await connect(peer) as conn:
            info = await conn.request(InfoRequest())
            assert isinstance(info, InfoReply)
            assert (info.span_start, info.span_end, info.num_layers) == (0, 2, 4)
            assert info.peer_id == peer.peer_id == conn.peer_id
            assert info.cache_tokens_free == info.cache_tokens_total > 0
            assert info.extra["queued_tokens"] == 0 and info.extra["queue_seconds"] == 0

    run(go)


BAD_REQUESTS = {
    "a span the peer does not serve": (OpenSession("s", 1, 4, 8), "bad_span"),
    "max_length over the peer's limit": (OpenSession("s", 0, 2, 10_000), "bad_position"),
    "a step for an unknown session": (
        Step("nope", torch.zeros(1, 1, HIDDEN), 0),
        "unknown_session",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_requests_get_clear_errors(peer: PeerProcess, case: str) -> None:
    msg, code = BAD_REQUESTS[case]

    async def go() -> None:
        async with await connect(peer) as conn:
            with pytest.raises(RemoteError) as e:
                await conn.request(msg)
            assert e.value.code == code
        await still_serves(peer)

    run(go)


def test_a_full_peer_says_busy_session_full_and_cache_full(peer: PeerProcess) -> None:
    """Each client may hold half the 8 pages; sessions take pages as they grow."""

    async def go() -> None:
        a, b, c, d = [await connect(peer) for _ in range(4)]  # four clients (identities)
        try:
            for conn, tokens in ((a, 64), (b, 48), (c, 16)):
                await conn.request(OpenSession("s", 0, 2, 64))
                await conn.request(Step("s", torch.randn(1, tokens, HIDDEN), 0))
            with pytest.raises(RemoteError) as busy:  # a holds 4 pages: its share
                await a.request(OpenSession("more", 0, 2, 64))
            assert busy.value.code == "busy"
            with pytest.raises(RemoteError) as full:  # no page left to grow into
                await b.request(Step("s", torch.randn(1, 1, HIDDEN), 48))
            assert full.value.code == "session_full" and "cannot grow to 49" in full.value.message
            with pytest.raises(RemoteError) as cache:  # waits 0.5 s for a page, in vain
                await d.request(OpenSession("s", 0, 2, 64))
            assert cache.value.code == "cache_full" and "cache full" in cache.value.message
            await c.request(CloseSession("s"))
            await d.request(OpenSession("s", 0, 2, 64))  # room again
        finally:
            for conn in (a, b, c, d):
                conn.close()
                await conn.wait_closed()
        await still_serves(peer)

    run(go)


STEP_ERRORS = {
    "wrong hidden size": (torch.zeros(1, 2, HIDDEN + 1), 0, "bad_shape"),
    "integer hidden states": (torch.zeros(1, 2, HIDDEN, dtype=torch.int32), 0, "bad_shape"),
    "positions past max_length": (torch.zeros(1, 6, HIDDEN), 0, "bad_position"),
    "a gap in positions": (torch.zeros(1, 1, HIDDEN), 3, "bad_position"),
}


@pytest.mark.parametrize("case", sorted(STEP_ERRORS))
def test_bad_steps_get_clear_errors(peer: PeerProcess, case: str) -> None:
    hidden, start, code = STEP_ERRORS[case]

    async def go() -> None:
        async with await connect(peer) as conn:
            await conn.request(OpenSession("s", 0, 2, 5))
            with pytest.raises(RemoteError) as e:
                await conn.request(Step("s", hidden, start))
            assert e.value.code == code
            # The session is still fine.
            reply = await conn.request(Step("s", torch.randn(1, 5, HIDDEN), 0))
            assert isinstance(reply, StepResult)

    run(go)


BAD_TRUNCATIONS = {  # after a step of 5 tokens: (start, truncate_to, what the error says)
    "a negative position": (0, -1, "cannot truncate to position -1"),
    "past the session's end": (6, 6, "cannot truncate to position 6: the session holds 5"),
    "a start elsewhere": (3, 2, "must start there, not at 3"),
}


@pytest.mark.parametrize("case", sorted(BAD_TRUNCATIONS))
def test_bad_truncations_get_bad_position_and_the_session_serves_on(
    peer: PeerProcess, case: str
) -> None:
    start, truncate_to, says = BAD_TRUNCATIONS[case]

    async def go() -> None:
        async with await connect(peer) as conn:
            await conn.request(OpenSession("s", 0, 2, 16))
            await conn.request(Step("s", torch.randn(1, 5, HIDDEN), 0))
            with pytest.raises(RemoteError, match=says) as e:
                await conn.request(
                    Step("s", torch.randn(1, 1, HIDDEN), start, truncate_to=truncate_to)
                )
            assert e.value.code == "bad_position"
            reply = await conn.request(Step("s", torch.randn(1, 2, HIDDEN), 5))
            assert isinstance(reply, StepResult)
        await still_serves(peer)

    run(go)


def test_a_step_that_truncates_rolls_back_and_gives_the_pages_back(peer: PeerProcess) -> None:
    prompt, guesses, other = (
        torch.randn(1, 10, HIDDEN),
        torch.randn(1, 12, HIDDEN),
        torch.randn(1, 3, HIDDEN),
    )

    async def extra(conn: Connection) -> dict[str, object]:
        info = await conn.request(InfoRequest())
        assert isinstance(info, InfoReply)
        return info.extra

    async def go() -> None:
        async with await connect(peer) as conn:
            before = await extra(conn)
            await conn.request(OpenSession("s", 0, 2, 32))
            await conn.request(Step("s", prompt, 0))
            await conn.request(Step("s", guesses, 10))  # 22 tokens: 2 pages of 16
            assert (await extra(conn))["kv_pages_used"] == before["kv_pages_used"] + 2  # type: ignore[operator]
            rolled = await conn.request(Step("s", other, 12, truncate_to=12))  # 10 guesses fall
            now = await extra(conn)
            assert now["kv_pages_used"] == before["kv_pages_used"] + 1  # type: ignore[operator]
            assert now["session_tokens"] == before["session_tokens"] + 15  # type: ignore[operator]
            assert now["rolled_back_tokens"] == before["rolled_back_tokens"] + 10  # type: ignore[operator]
            # The same as a session that never held the fallen guesses.
            await conn.request(OpenSession("t", 0, 2, 32))
            await conn.request(Step("t", torch.cat([prompt, guesses[:, :2]], dim=1), 0))
            fresh = await conn.request(Step("t", other, 12))
            assert isinstance(rolled, StepResult) and isinstance(fresh, StepResult)
            assert (rolled.hidden - fresh.hidden).abs().max() < 1e-4

    run(go)


def test_the_client_refuses_to_send_a_malformed_step(peer: PeerProcess) -> None:
    async def go() -> None:
        async with await connect(peer) as conn:
            await conn.request(OpenSession("s", 0, 2, 5))
            for hidden in (torch.zeros(2, 1, HIDDEN), torch.zeros(1, 0, HIDDEN)):
                with pytest.raises(ProtocolError):
                    await conn.request(Step("s", hidden, 0))
            reply = await conn.request(Step("s", torch.zeros(1, 1, HIDDEN), 0))
            assert isinstance(reply, StepResult)

    run(go)


def test_a_client_cannot_touch_another_clients_session(peer: PeerProcess) -> None:
    async def go() -> None:
        async with await connect(peer) as alice, await connect(peer) as mallory:
            await alice.request(OpenSession("shared-name", 0, 2, 8))
            with pytest.raises(RemoteError) as e:
                await mallory.request(Step("shared-name", torch.zeros(1, 1, HIDDEN), 0))
            assert e.value.code == "unknown_session"
            await alice.request(Step("shared-name", torch.zeros(1, 1, HIDDEN), 0))

    run(go)


def test_pinning_the_wrong_peer_id_is_refused(peer: PeerProcess) -> None:
    async def go() -> None:
        other = generate_identity().peer_id
        address = parse_address(f"127.0.0.1:{peer.port}/{other}")
        with pytest.raises(PeerIdMismatch):
            await open_connection(address, generate_identity(), TransportConfig())
        await still_serves(peer)

    run(go)


def raw_frame(header: dict[str, object], payload: bytes = b"") -> bytes:
    head = msgpack.packb(header)
    return struct.pack(">II", 4 + len(head) + len(payload), len(head)) + head + payload


def hello_frame() -> bytes:
    return b"".join(bytes(c) for c in encode(Hello(peer_id=generate_identity().peer_id), 0))


GARBAGE = {
    "random bytes": bytes(range(256)) * 4,
    "a truncated frame, then disconnect": hello_frame()[:-3],
    "a length over the limit": struct.pack(">II", 2**31, 10) + b"x" * 100,
    "an unknown message type": hello_frame() + raw_frame({"type": "launch_missiles", "id": 1}),
    "a wrong protocol version": raw_frame(
        {"type": "hello", "id": 0, "version": 999, "peer_id": None, "max_frame_bytes": 2**20}
    ),
}


@pytest.mark.parametrize("case", sorted(GARBAGE))
def test_garbage_on_the_wire_leaves_the_peer_serving(plain_peer: PeerProcess, case: str) -> None:
    with socket.create_connection(("127.0.0.1", plain_peer.port), timeout=5) as s:
        s.sendall(GARBAGE[case])
        s.shutdown(socket.SHUT_WR)
        s.settimeout(5)
        with pytest.raises((TimeoutError, OSError)):  # the peer closes the connection
            while s.recv(65536):
                pass
            raise OSError("closed")
    run(lambda: still_serves(plain_peer, plaintext=True))


def test_plaintext_garbage_against_a_tls_peer_is_refused_and_it_serves_on(
    peer: PeerProcess,
) -> None:
    with socket.create_connection(("127.0.0.1", peer.port), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.0\r\n\r\n" + bytes(range(256)))
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with (
        socket.create_connection(("127.0.0.1", peer.port), timeout=5) as s,  # no client cert
        pytest.raises((ssl.SSLError, OSError)),
        ctx.wrap_socket(s) as tls,
    ):
        tls.sendall(hello_frame())
        if not tls.recv(1):
            raise OSError("closed")
    run(lambda: still_serves(peer))


def test_a_connection_lost_mid_request_keeps_the_peer_serving(peer: PeerProcess) -> None:
    async def go() -> None:
        async with await connect(peer) as conn:
            await conn.request(OpenSession("s", 0, 2, 32))
            step = asyncio.ensure_future(conn.request(Step("s", torch.randn(1, 32, HIDDEN), 0)))
            await asyncio.sleep(0)
        with pytest.raises((PeerUnavailable, asyncio.CancelledError)):
            await step
        await still_serves(peer)

    run(go)


def test_an_expired_session_is_refused_and_its_cache_freed(
    tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    workdir = tmp_path_factory.mktemp("idle")
    peers = _peer(tiny_dir, workdir, "--session-idle-timeout", "1")
    short_lived = next(peers)

    async def go() -> None:
        async with await connect(short_lived) as conn:
            await conn.request(OpenSession("s", 0, 2, 32))
            await conn.request(Step("s", torch.randn(1, 2, HIDDEN), 0))
            await asyncio.sleep(2.5)  # idle past the timeout; expiry runs every 0.25 s
            with pytest.raises(RemoteError) as e:
                await conn.request(Step("s", torch.randn(1, 1, HIDDEN), 2))
            assert e.value.code == "unknown_session"
            info = await conn.request(InfoRequest())
            assert isinstance(info, InfoReply)
            assert info.cache_tokens_free == info.cache_tokens_total

    try:
        run(go)
    finally:
        peers.close()  # stops the peer, checking it exits cleanly
