"""A peer bounds strangers: connection caps, deadlines, bytes before Hello, idle connections.

One real peer process (a tiny model) with small caps. Strangers connect from other loopback
addresses (127.0.0.2, 127.0.0.3: one IP each) with real TLS; each one past a cap gets its
refusal, while a good client's session goes on stepping.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest
import torch

from layerswarm.errors import PeerUnavailable
from layerswarm.peer.launch import start_peer
from layerswarm.shards.config import Span
from layerswarm.swarm.dial import Connection, open_connection
from layerswarm.swarm.identity import generate_identity
from layerswarm.swarm.limits import ListenLimits
from layerswarm.swarm.listen import serve_connections
from layerswarm.swarm.protocol import (
    PROTOCOL_VERSION,
    ErrorReply,
    Hello,
    InfoReply,
    InfoRequest,
    Message,
    OpenSession,
    Step,
    StepResult,
    decode_frame,
    encode,
)
from layerswarm.swarm.transport import TransportConfig, new_event_loop, parse_address, tls_context

ME = generate_identity()
GUARD = 60.0  # s: a hung test fails instead of hanging; no test asserts a duration
CAPS = ["--max-connections", "4", "--max-connections-per-ip", "2", "--handshake-timeout", "2"]


def run(main: Coroutine[Any, Any, None]) -> None:
    async def guarded() -> None:
        try:
            await asyncio.wait_for(main, GUARD)
        finally:
            for writer in OPENED:
                writer.close()
                with contextlib.suppress(ConnectionError, OSError, asyncio.TimeoutError):
                    await asyncio.wait_for(writer.wait_closed(), 2.0)
            OPENED.clear()

    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        runner.run(guarded())


OPENED: list[asyncio.StreamWriter] = []  # every stranger's, closed at the end of a test


async def stranger(
    port: int, ip: str, hello: bool = True
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, Message | None]:
    """A TLS connection from `ip`; with `hello`, its Hello is sent and the reply read."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=tls_context(ME, server=False), local_addr=(ip, 0)
    )
    OPENED.append(writer)
    reply = None
    if hello:
        writer.writelines(encode(Hello(PROTOCOL_VERSION, ME.peer_id), 0))
        reply = await read_frame(reader)
    return reader, writer, reply


async def read_frame(reader: asyncio.StreamReader) -> Message:
    prefix = await reader.readexactly(4)
    (length,) = struct.unpack(">I", prefix)
    return decode_frame(prefix + await reader.readexactly(length))[1]


async def hung_up(reader: asyncio.StreamReader) -> bool:
    """Whether the other side closed the connection (reading gives EOF or an error)."""
    try:
        return await reader.read() == b""
    except (ConnectionError, OSError):
        return True


async def good_step(conn: Connection, position: int) -> None:
    reply = await conn.request(Step("good", torch.randn(1, 1, 64), position))
    assert isinstance(reply, StepResult) and reply.hidden.shape == (1, 1, 64)


def test_strangers_past_the_caps_too_slow_or_too_big_are_refused_while_a_good_client_is_served(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    peer = start_peer(tiny_llama_dir, Span(0, 4), tmp_path, CAPS)

    async def main() -> None:
        good = await open_connection(parse_address(peer.address), ME)  # 127.0.0.1: 1 of 2
        await good.request(OpenSession("good", 0, 4, 64))
        await good_step(good, 0)
        await past_the_caps(peer.address, peer.port, good)
        await good_step(good, 4)
        await slow_or_big(peer.port)
        await good_step(good, 5)
        assert isinstance(await good.request(InfoRequest()), InfoReply)
        good.close()
        await good.wait_closed()

    try:
        run(main())
    finally:
        peer.stop()


async def past_the_caps(address: str, port: int, good: Connection) -> None:
    """Caps of 2 connections an IP and 4 in all; the good client holds one of 127.0.0.1's."""
    second = await open_connection(parse_address(address), ME)  # 127.0.0.1: 2 of 2
    with pytest.raises(PeerUnavailable, match="max_connections_per_ip"):
        await open_connection(parse_address(address), ME)
    await good_step(good, 1)
    held = [await stranger(port, "127.0.0.2") for _ in range(2)]  # 4 of 4 in all
    assert all(isinstance(reply, Hello) for _, _, reply in held)
    reader, _, refusal = await stranger(port, "127.0.0.3")
    assert isinstance(refusal, ErrorReply) and refusal.code == "busy"
    assert "max_connections" in refusal.message and await hung_up(reader)
    await good_step(good, 2)
    second.close()  # a slot comes free: a new client gets it
    await second.wait_closed()
    _, writer, reply = await stranger(port, "127.0.0.3")
    assert isinstance(reply, Hello)
    await good_step(good, 3)
    for _, w, _ in [*held, (None, writer, None)]:  # back to the good client alone
        w.close()
        await w.wait_closed()


async def slow_or_big(port: int) -> None:
    """Strangers that never finish their handshake or send too much before it are cut off."""
    # TCP but never TLS: dropped at the handshake deadline.
    silent_reader, silent = await asyncio.open_connection(
        "127.0.0.1", port, local_addr=("127.0.0.2", 0)
    )
    OPENED.append(silent)
    # TLS but never a Hello: dropped at the deadline too.
    slow_reader, _, _ = await stranger(port, "127.0.0.3", hello=False)
    # A frame before Hello larger than a Hello: refused, with the limit named.
    big_reader, big_writer, _ = await stranger(port, "127.0.0.4", hello=False)
    big_writer.write(struct.pack(">II", 2**20, 10) + b"x" * 64)
    refusal = await read_frame(big_reader)
    assert isinstance(refusal, ErrorReply) and "exceeds the limit of 1024" in refusal.message
    assert await hung_up(slow_reader) and await hung_up(silent_reader)


def test_an_idle_connection_is_closed_with_a_reason() -> None:
    async def main() -> None:
        async def answer(conn: object, msg: Message) -> Message:
            return InfoReply(ME.peer_id, "m", 0, 1, 1, "float32", 0, 0, 0, {})

        limits = ListenLimits(idle_timeout=0.3)
        server = await serve_connections(
            answer, "127.0.0.1", 0, ME, TransportConfig(), limits=limits
        )
        async with server:
            conn = await open_connection(parse_address(f"127.0.0.1:{server.port}"), ME)
            assert isinstance(await conn.request(InfoRequest()), InfoReply)
            await conn.wait_closed()  # the server closes it after 0.3 s of silence
            with pytest.raises(PeerUnavailable, match=r"idle for 0\.3 s"):
                await conn.request(InfoRequest())

    run(main())
