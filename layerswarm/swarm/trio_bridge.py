"""Run a trio event loop in a thread of its own, and call into it from asyncio.

py-libp2p is written for trio (91 of its modules call trio directly) while layerswarm runs on
asyncio, so the DHT lives under `trio.run` in a daemon thread. A call crosses over with
`TrioToken.run_sync_soon` (asyncio -> trio) and comes back with `loop.call_soon_threadsafe`
(trio -> asyncio): a call that does nothing takes 0.06 ms there and back (median, asyncio and
uvloop alike, on the 2-core dev machine). Nothing here blocks the asyncio loop except `start()`,
which waits the few milliseconds a thread takes to start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

import trio

from layerswarm.errors import LayerswarmError

log = logging.getLogger(__name__)

T = TypeVar("T")


class TrioThreadClosed(LayerswarmError):
    """The trio thread is not running (never started, stopped, or crashed)."""


class _Pending(Generic[T]):
    """One call in flight: the asyncio future and the trio cancel scope that runs it."""

    def __init__(self, loop: asyncio.AbstractEventLoop, future: asyncio.Future[T]) -> None:
        self.loop = loop
        self.future = future
        self.scope: trio.CancelScope | None = None  # set in the trio thread
        self.cancelled = False  # set in the trio thread, when the caller gave up

    def settle(self, value: T | None, error: BaseException | None) -> None:
        """Hand the outcome to the asyncio loop; a no-op if the caller is gone."""

        def deliver() -> None:
            if self.future.done():
                return
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(value)  # type: ignore[arg-type]

        with contextlib.suppress(RuntimeError):  # a closed asyncio loop: nobody waits any more
            self.loop.call_soon_threadsafe(deliver)

    def cancel(self) -> None:
        """Called in the trio thread: stop the call's trio task."""
        self.cancelled = True
        if self.scope is not None:
            self.scope.cancel()


class TrioThread:
    """A trio event loop in a daemon thread, with a nursery that outlives single calls.

    `call` runs one coroutine function in trio and returns its result to asyncio; `start_task`
    starts a long-lived task in the thread's nursery (`nursery.start` style) and returns what
    the task passes to `task_status.started()`. `stop` cancels everything and joins the thread.
    """

    def __init__(self, name: str = "layerswarm-trio", grace: float = 1.0) -> None:
        """
        Args:
            name: the thread's name, for debuggers and logs.
            grace: seconds the asyncio side waits beyond a call's own trio-side deadline before
                it decides the trio thread is stuck.
        """
        self._name = name
        self._grace = grace
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._stop_event: trio.Event | None = None
        self._ready = threading.Event()
        self._crash: BaseException | None = None

    @property
    def running(self) -> bool:
        """Whether the thread is up and accepts calls."""
        return self._nursery is not None and self._thread is not None and self._thread.is_alive()

    def start(self, timeout: float = 5.0) -> trio.lowlevel.TrioToken:
        """Launch `trio.run` in a daemon thread; return its TrioToken once it accepts calls.

        Raises:
            RuntimeError: already started.
            TimeoutError: the thread did not come up within `timeout` seconds.
        """
        if self._thread is not None:
            raise RuntimeError("TrioThread.start() called twice")
        self._thread = threading.Thread(target=self._thread_main, name=self._name, daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"trio thread did not start within {timeout} s")
        if self._token is None:
            raise TrioThreadClosed(f"trio thread failed to start: {self._crash!r}")
        return self._token

    def _thread_main(self) -> None:
        try:
            trio.run(self._trio_main)
        except BaseException as exc:  # the thread has no caller to raise to: record and log
            self._crash = exc
            log.exception("trio thread %s crashed", self._name)
        finally:
            self._nursery = None
            self._ready.set()

    async def _trio_main(self) -> None:
        self._stop_event = trio.Event()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._token = trio.lowlevel.current_trio_token()
            self._ready.set()
            await self._stop_event.wait()
            nursery.cancel_scope.cancel()
        self._nursery = None

    async def call(self, async_fn: Callable[..., Awaitable[T]], *args: Any, timeout: float) -> T:
        """Run `await async_fn(*args)` in the trio thread and return its result here.

        Exceptions raised by `async_fn` propagate unchanged. Cancelling the awaiting asyncio
        task cancels the trio task too.

        Raises:
            TimeoutError: `async_fn` did not finish within `timeout` seconds (it is cancelled).
            TrioThreadClosed: the thread is not running, or stopped during the call.
        """
        token = self._token
        if token is None or not self.running:
            raise TrioThreadClosed("trio thread is not running")
        loop = asyncio.get_running_loop()
        pending: _Pending[T] = _Pending(loop, loop.create_future())

        def spawn() -> None:  # runs in the trio thread
            if self._nursery is None:
                pending.settle(None, TrioThreadClosed("trio thread is stopping"))
                return
            self._nursery.start_soon(self._run_call, pending, async_fn, args, timeout)

        try:
            token.run_sync_soon(spawn)
        except trio.RunFinishedError as exc:
            raise TrioThreadClosed("trio thread has stopped") from exc
        try:
            return await asyncio.wait_for(asyncio.shield(pending.future), timeout + self._grace)
        except asyncio.TimeoutError:
            self._cancel_in_trio(pending)
            raise TimeoutError(f"trio thread gave no answer within {timeout} s") from None
        except asyncio.CancelledError:
            self._cancel_in_trio(pending)
            raise

    def _cancel_in_trio(self, pending: _Pending[Any]) -> None:
        pending.future.cancel()  # so that a late outcome is dropped, not left unretrieved
        token = self._token
        if token is None:
            return
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(pending.cancel)

    @staticmethod
    async def _run_call(
        pending: _Pending[T],
        async_fn: Callable[..., Awaitable[T]],
        args: tuple[Any, ...],
        timeout: float,
    ) -> None:
        settled = False
        try:
            with trio.CancelScope(deadline=trio.current_time() + timeout) as scope:
                pending.scope = scope
                if pending.cancelled:  # the caller gave up before the task started
                    scope.cancel()
                try:
                    value = await async_fn(*args)
                except Exception as exc:
                    pending.settle(None, exc)
                    settled = True
                else:
                    pending.settle(value, None)
                    settled = True
            if scope.cancelled_caught and not settled:
                pending.settle(None, TimeoutError(f"trio call timed out after {timeout} s"))
                settled = True
        except Exception as exc:  # a group that carried our own Cancelled, less that Cancelled
            if not settled:
                pending.settle(None, exc)
                settled = True
        finally:
            if not settled:  # the thread's nursery is being cancelled under us
                pending.settle(None, TrioThreadClosed("trio thread stopped during the call"))

    async def start_task(
        self, async_fn: Callable[..., Awaitable[None]], *args: Any, timeout: float
    ) -> Any:
        """Start `async_fn(*args, task_status=...)` in the thread's nursery, `nursery.start` style.

        The task keeps running after this returns, until it ends or `stop` cancels it; an
        exception it raises after start-up is logged, and does not bring the thread down.

        Returns:
            The value the task passed to `task_status.started()`.

        Raises:
            Whatever the task raises before it calls `task_status.started()`.
            TimeoutError: it did not call `task_status.started()` within `timeout` seconds.
        """

        async def starter() -> Any:
            if self._nursery is None:
                raise TrioThreadClosed("trio thread is stopping")
            return await self._nursery.start(_guarded, async_fn, *args)

        return await self.call(starter, timeout=timeout)

    async def stop(self, timeout: float) -> bool:
        """Cancel every task in the thread and join it, waiting at most `timeout` seconds.

        Returns:
            True if the thread has ended (or never started); False if it is still running
            after `timeout` (it is a daemon thread, so it will not keep the process alive).
        """
        thread, token, stop_event = self._thread, self._token, self._stop_event
        if thread is None:
            return True
        if token is not None and stop_event is not None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(stop_event.set)
        await asyncio.to_thread(thread.join, timeout)
        if thread.is_alive():
            log.warning("trio thread %s did not stop within %s s", self._name, timeout)
            return False
        return True


# `task_status` is typed Any: trio-typing's stubs (installed with py-libp2p) shadow trio's own
# annotations for mypy, and have no `trio.TaskStatus`.
class _TaskStatus:
    """Passes `started()` through, remembering that it was called."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.started_called = False

    def started(self, value: Any = None) -> None:
        self.started_called = True
        self._inner.started(value)


async def _guarded(
    async_fn: Callable[..., Awaitable[None]],
    *args: Any,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    status = _TaskStatus(task_status)
    try:
        await async_fn(*args, task_status=status)
    except Exception:
        if not status.started_called:
            raise  # nursery.start re-raises it to the caller of start_task
        log.exception("background trio task %r failed", getattr(async_fn, "__name__", async_fn))
