"""The client's one event loop: an asyncio (uvloop where installed) loop on a daemon thread.

Every session of a client runs on this loop, however many are in flight, and synchronous
callers hand it coroutines (`run`); asyncio callers on another loop await them (`call`).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Iterator
from concurrent.futures import Future
from typing import TypeVar

from layerswarm.swarm.transport import new_event_loop

T = TypeVar("T")


class BackgroundLoop:
    """An event loop running on its own daemon thread."""

    def __init__(self) -> None:
        self.loop = new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="layerswarm-net", daemon=True
        )
        self.thread.start()

    def run(self, work: Awaitable[T], timeout: float | None = None) -> T:
        """Run `work` on the loop and wait for it here (a synchronous caller)."""
        future: Future[T] = asyncio.run_coroutine_threadsafe(_awaited(work), self.loop)
        try:
            return future.result(timeout)
        except BaseException:
            future.cancel()
            raise

    async def call(self, work: Awaitable[T]) -> T:
        """Run `work` on the loop and await it from another running loop."""
        if asyncio.get_running_loop() is self.loop:
            return await work
        future: Future[T] = asyncio.run_coroutine_threadsafe(_awaited(work), self.loop)
        return await asyncio.wrap_future(future)

    def iterate_sync(self, items: AsyncGenerator[T, None]) -> Iterator[T]:
        """`items` (an async generator that lives on this loop) read by a synchronous caller;
        closed when the caller stops reading."""
        try:
            while True:
                try:
                    item = self.run(anext(items))
                except StopAsyncIteration:
                    return
                yield item
        finally:
            self.run(items.aclose())

    def iterate(self, items: AsyncIterator[T]) -> AsyncIterator[T]:
        """`items` (an async iterator that lives on this loop) read from another loop."""
        return _Bridged(self, items)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)


class _Bridged(AsyncIterator[T]):
    def __init__(self, net: BackgroundLoop, items: AsyncIterator[T]) -> None:
        self.net = net
        self.items = items

    def __aiter__(self) -> _Bridged[T]:
        return self

    async def __anext__(self) -> T:
        return await self.net.call(anext(self.items))

    async def aclose(self) -> None:
        close = getattr(self.items, "aclose", None)
        if close is not None:
            await self.net.call(close())


async def _awaited(work: Awaitable[T]) -> T:
    return await work
