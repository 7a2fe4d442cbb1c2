"""The link emulator: delay and bandwidth shape the bytes as configured, in order."""

from __future__ import annotations

import asyncio
import os
import time

from layerswarm.devtools.linkemu import PIECE_BYTES, LinkConfig, LinkProxy, LinkShaper


def test_delay_alone_adds_the_same_time_to_every_piece() -> None:
    shaper = LinkShaper(LinkConfig(delay=0.025))
    assert shaper.send(100, now=1.0) == [(1.025, 100)]
    assert shaper.send(100, now=2.0) == [(2.025, 100)]


def test_bandwidth_serializes_a_burst_and_queues_what_follows() -> None:
    shaper = LinkShaper(LinkConfig(delay=0.01, bandwidth=PIECE_BYTES * 10))  # 0.1 s a piece
    pieces = shaper.send(3 * PIECE_BYTES, now=0.0)
    assert [size for _, size in pieces] == [PIECE_BYTES] * 3
    assert [round(t, 6) for t, _ in pieces] == [0.11, 0.21, 0.31]
    # Handed over while the wire is still busy: it waits for the burst before it.
    ((arrival, _),) = shaper.send(10, now=0.05)
    assert arrival > 0.31
    # Handed over once the wire is idle again: only its own serialization and the delay.
    ((arrival, _),) = shaper.send(PIECE_BYTES, now=5.0)
    assert round(arrival, 6) == 5.11


def test_jitter_never_reorders() -> None:
    shaper = LinkShaper(LinkConfig(delay=0.01, jitter=0.05, seed=3))
    arrivals = [shaper.send(10, now=i * 0.001)[0][0] for i in range(200)]
    assert arrivals == sorted(arrivals)
    assert all(a >= i * 0.001 + 0.01 for i, a in enumerate(arrivals))
    assert len(set(arrivals)) > 10  # it does jitter


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


def test_proxy_relays_every_byte_in_order_and_no_sooner_than_configured() -> None:
    async def run() -> None:
        server = await asyncio.start_server(_echo, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        link = LinkConfig(delay=0.05, bandwidth=1e6)  # 50 ms each way, 8 Mbit/s
        async with LinkProxy("127.0.0.1", port, link) as proxy:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            t0 = time.perf_counter()
            writer.write(b"x")
            assert await reader.readexactly(1) == b"x"
            assert time.perf_counter() - t0 >= 0.1  # two crossings of 50 ms
            payload = os.urandom(200_000)
            t0 = time.perf_counter()
            writer.write(payload)
            got = await reader.readexactly(len(payload))
            # 200 kB at 1 MB/s each way (the echo pipelines them) plus two delays.
            assert time.perf_counter() - t0 >= 0.2 + 0.1
            assert got == payload
            assert proxy.bytes_up == proxy.bytes_down == 1 + len(payload)
            writer.close()
        server.close()
        await server.wait_closed()

    asyncio.run(run())
