"""A link emulator: a TCP proxy that delays and paces bytes as a network link would.

Hand-written because the usual tool cannot run here: this machine's kernel has no `netem`
(`tc qdisc add ... netem delay` fails), and tests and benchmarks must emulate home networks
and WANs on loopback. Put one `LinkProxy` in front of each peer: every byte to or from the peer
(from the client, or from another peer pushing to it) then crosses one emulated link.

Each direction is a `LinkShaper`: bytes are serialized at `bandwidth` (one after another, as
on a wire: a burst queues behind the bytes before it), then arrive `delay` (+ jitter) later.
Delivery keeps the order bytes were sent in (TCP never reorders what it hands the reader), so
jitter only ever delays. The shaper is pure arithmetic on a clock it is given, so it is tested
without sleeping; the proxy runs it on asyncio's clock.

    async with LinkProxy("127.0.0.1", peer_port, LinkConfig(delay=0.010)) as proxy:
        ...  # dial 127.0.0.1:proxy.port instead of the peer
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from dataclasses import dataclass

log = logging.getLogger(__name__)

PIECE_BYTES = 16 * 1024  # bytes: a burst is paced in pieces of this size, as packets would be
QUEUE_PIECES = 256  # pieces in flight per direction before the proxy stops reading (4 MiB)


@dataclass(frozen=True)
class LinkConfig:
    """One direction of a link (a proxy uses the same for both unless given two)."""

    delay: float = 0.0  # unit: s of one-way propagation delay
    bandwidth: float | None = None  # unit: bytes/s the link serializes; None: unlimited
    jitter: float = 0.0  # unit: s, each piece waits up to this much more (uniform), in order
    seed: int = 0  # the jitter's random seed


def mbit(megabits_per_second: float) -> float:
    """Bytes per second of a link of this many Mbit/s."""
    return megabits_per_second * 1e6 / 8


class LinkShaper:
    """When each piece of a byte stream arrives at the far end of one emulated link."""

    def __init__(self, config: LinkConfig) -> None:
        self.config = config
        self._free_at = 0.0  # unit: s (on the caller's clock) the wire is busy until
        self._last_arrival = 0.0  # unit: s, the latest arrival handed out (no reordering)
        self._rng = random.Random(config.seed)

    def send(self, nbytes: int, now: float) -> list[tuple[float, int]]:
        """Schedule `nbytes` handed to the link at `now`.

        Returns:
            `(arrival time, bytes)` for each piece, in order; the times never decrease.
        """
        c = self.config
        pieces = []
        left = nbytes
        while left > 0:
            size = min(left, PIECE_BYTES)
            left -= size
            start = max(now, self._free_at)
            self._free_at = start + (size / c.bandwidth if c.bandwidth else 0.0)
            arrival = self._free_at + c.delay
            if c.jitter:
                arrival += self._rng.uniform(0.0, c.jitter)
            arrival = self._last_arrival = max(arrival, self._last_arrival)
            pieces.append((arrival, size))
        return pieces


class LinkProxy:
    """Listen on a port of its own; each connection is relayed to `target` through two links.

    `up` shapes bytes towards the target (a client's or a pushing peer's requests), `down`
    bytes back from it.
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        up: LinkConfig,
        down: LinkConfig | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.target = (target_host, target_port)
        self.up, self.down = up, down or up
        self.host = host
        self.port = port  # the port listened on (0: a free one, known once started)
        self.bytes_up = 0  # bytes relayed towards the target, over all connections
        self.bytes_down = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[object]] = set()

    async def start(self) -> LinkProxy:
        self._server = await asyncio.start_server(self._accept, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            t_reader, t_writer = await asyncio.open_connection(*self.target)
        except OSError as e:
            log.debug("link proxy cannot reach %s: %s", self.target, e)
            writer.close()
            return
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._pump(reader, t_writer, LinkShaper(self.up), True))
                group.create_task(self._pump(t_reader, writer, LinkShaper(self.down), False))
        except Exception as e:  # a side closed or reset: that connection is done
            log.debug("link proxy connection ended: %r", e)
        except asyncio.CancelledError:  # the proxy is closing (asyncio logs a re-raise here)
            pass
        finally:
            self._tasks.discard(task)
            for w in (writer, t_writer):
                w.close()

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        shaper: LinkShaper,
        upward: bool,
    ) -> None:
        """Read one direction, and write each piece out at its arrival time, in order."""
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue(QUEUE_PIECES)

        async def deliver() -> None:
            while (item := await pieces.get()) is not None:
                arrival, data = item
                wait = arrival - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()

        async with asyncio.TaskGroup() as group:
            group.create_task(deliver())
            while data := await reader.read(PIECE_BYTES * 4):
                if upward:
                    self.bytes_up += len(data)
                else:
                    self.bytes_down += len(data)
                offset = 0
                for arrival, size in shaper.send(len(data), loop.time()):
                    await pieces.put((arrival, data[offset : offset + size]))
                    offset += size
            await pieces.put(None)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()

    async def wait_closed(self) -> None:
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5.0)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def __aenter__(self) -> LinkProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        self.close()
        await self.wait_closed()


async def serve_links(
    targets: list[tuple[str, int]], up: LinkConfig, down: LinkConfig, stop: asyncio.Event
) -> None:
    """Run one proxy per target until `stop`; print `LINKEMU-READY port port ...` once up."""
    async with contextlib.AsyncExitStack() as stack:
        proxies = [await stack.enter_async_context(LinkProxy(h, p, up, down)) for h, p in targets]
        print("LINKEMU-READY " + " ".join(str(p.port) for p in proxies), flush=True)
        await stop.wait()


def main() -> None:
    """`python -m layerswarm.devtools.linkemu --delay-ms 10 [--mbit 20] HOST:PORT ...`

    Benchmarks run the proxies in a process of their own, so that relaying bytes does not take
    the client's interpreter lock.
    """
    import argparse
    import signal

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("targets", nargs="+", help="host:port to relay to, one proxy each")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay, each way")
    parser.add_argument("--jitter-ms", type=float, default=0.0)
    parser.add_argument("--up-mbit", type=float, default=None, help="towards the target")
    parser.add_argument("--down-mbit", type=float, default=None, help="back from the target")
    args = parser.parse_args()
    targets = [(t.rsplit(":", 1)[0], int(t.rsplit(":", 1)[1])) for t in args.targets]

    def link(rate: float | None) -> LinkConfig:
        return LinkConfig(args.delay_ms / 1e3, rate and mbit(rate), args.jitter_ms / 1e3)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve_links(targets, link(args.up_mbit), link(args.down_mbit), stop)

    asyncio.run(run())


if __name__ == "__main__":
    main()
