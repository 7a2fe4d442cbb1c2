"""Sessions on a peer: their KV cache, validation of each step, and batched compute.

Compute runs on one worker thread: the model's matmuls already use every core, so two steps
at once would only fight. Decode steps of different sessions that wait at the same time are
run as one batch (one token each), which costs little more than a single one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from layerswarm.errors import CacheFull, RemoteError, StepCancelled
from layerswarm.shards.blocks import SpanModel
from layerswarm.shards.config import Span
from layerswarm.shards.kv_cache import PagedKVCache, SessionCache
from layerswarm.swarm.protocol import ErrorCode

log = logging.getLogger(__name__)


@dataclass
class Session:
    key: tuple[str, str]  # (owner connection, session ID): a client reaches only its own
    layers: Span  # the part of the peer's span this session runs
    cache: SessionCache
    last_used: float  # unit: monotonic s of the last request
    queued_length: int = 0  # unit: tokens the session will hold once its queued steps ran


@dataclass
class _Job:
    session: Session
    hidden: torch.Tensor  # (1, tokens, hidden) in the model's dtype
    start: int
    deadline: float  # unit: monotonic s after which the step is abandoned
    done: asyncio.Future[torch.Tensor] = field(repr=False)


class SessionTable:
    """Every open session of one peer, and the compute worker that serves their steps."""

    def __init__(
        self,
        model: SpanModel,
        cache_tokens: int,
        max_batch: int = 16,
        compute: ThreadPoolExecutor | None = None,
        decode_threads: int = 0,
    ) -> None:
        """`compute`: the one thread that runs the model (a new one if None); see
        `open_compute_thread` for why the peer loads and measures its span there too.
        `decode_threads`: threads for a decode step of one session (`SpeedSample`); 0: all."""
        self.model = model
        self.decode_threads = decode_threads
        self._all_threads = torch.get_num_threads()
        self.cache: PagedKVCache = model.new_cache(cache_tokens)
        self.max_batch = max_batch
        self.sessions: dict[tuple[str, str], Session] = {}
        self.dtype = next(model.parameters()).dtype
        self._queue: asyncio.Queue[_Job] = asyncio.Queue()
        self._executor = compute or open_compute_thread()
        self._stopping = False

    def open(self, owner: str, session_id: str, layers: Span, max_length: int) -> Session:
        span = self.model.span
        if layers.start < span.start or layers.end > span.end:
            raise RemoteError(ErrorCode.BAD_SPAN, f"this peer serves layers {span}, not {layers}")
        key = (owner, session_id)
        if key in self.sessions:
            raise RemoteError(ErrorCode.PROTOCOL, f"session {session_id!r} is already open")
        try:
            cache = self.cache.allocate(max_length)
        except CacheFull as e:
            raise RemoteError(ErrorCode.CACHE_FULL, str(e)) from None
        session = Session(key, layers, cache, time.monotonic())
        self.sessions[key] = session
        return session

    def get(self, owner: str, session_id: str) -> Session:
        session = self.sessions.get((owner, session_id))
        if session is None:
            raise RemoteError(
                ErrorCode.UNKNOWN_SESSION, f"no session {session_id!r} here (closed or expired)"
            )
        session.last_used = time.monotonic()
        return session

    def close(self, owner: str, session_id: str) -> None:
        session = self.get(owner, session_id)
        del self.sessions[session.key]
        self.cache.free(session.cache)

    def close_owner(self, owner: str) -> None:
        """Drop every session of a client (its connection is gone)."""
        for key in [k for k in self.sessions if k[0] == owner]:
            self.cache.free(self.sessions.pop(key).cache)

    def replace_model(self, model: SpanModel, cache_tokens: int) -> int:
        """Serve another span from now on; every open session ends. Returns how many did."""
        dropped = len(self.sessions)
        self.sessions.clear()
        self.model = model
        self.cache = model.new_cache(cache_tokens)
        self.dtype = next(model.parameters()).dtype
        return dropped

    def expire_idle(self, idle_timeout: float) -> int:
        now = time.monotonic()
        stale = [k for k, s in self.sessions.items() if now - s.last_used > idle_timeout]
        for key in stale:
            self.cache.free(self.sessions.pop(key).cache)
        if stale:
            log.info("expired %d idle sessions", len(stale))
        return len(stale)

    async def step(
        self, session: Session, hidden: torch.Tensor, start: int, timeout: float
    ) -> torch.Tensor:
        """Validate a step, queue it for the worker, and wait for its output."""
        self._check_step(session, hidden, start)
        loop = asyncio.get_running_loop()
        session.queued_length = start + hidden.shape[1]
        job = _Job(
            session, hidden.to(self.dtype), start, time.monotonic() + timeout, loop.create_future()
        )
        self._queue.put_nowait(job)
        try:
            out = await asyncio.wait_for(asyncio.shield(job.done), timeout)
        except asyncio.TimeoutError:
            raise RemoteError(ErrorCode.TIMEOUT, f"the step ran past {timeout:.1f} s") from None
        return out.to(hidden.dtype)

    def _check_step(self, session: Session, hidden: torch.Tensor, start: int) -> None:
        d = self.model.config.hidden_size
        if hidden.ndim != 3 or hidden.shape[0] != 1 or hidden.shape[2] != d or hidden.shape[1] < 1:
            raise RemoteError(
                ErrorCode.BAD_SHAPE,
                f"hidden states must be (1, tokens, {d}), got {tuple(hidden.shape)}",
            )
        if not hidden.is_floating_point():
            raise RemoteError(
                ErrorCode.BAD_SHAPE, f"hidden states must be floats, got {hidden.dtype}"
            )
        end = start + hidden.shape[1]
        # A client may send several steps of a session without waiting (a replay does):
        # they queue in order, so a step may start where the queued ones will end.
        if start < 0 or start > max(session.cache.length, session.queued_length):
            raise RemoteError(
                ErrorCode.BAD_POSITION,
                f"start {start} leaves a gap: the session holds {session.cache.length} tokens",
            )
        if end > session.cache.max_length:
            raise RemoteError(
                ErrorCode.BAD_POSITION,
                f"positions up to {end} pass the session's max_length {session.cache.max_length}",
            )

    async def serve_steps(self) -> None:
        """The worker loop: take waiting steps, batch the decode ones, run them off the loop."""
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await self._queue.get()]
            while not self._queue.empty() and len(jobs) < self.max_batch:
                jobs.append(self._queue.get_nowait())
            for batch in _batches(jobs):
                live = [j for j in batch if self._runnable(j)]
                if not live:
                    continue
                try:
                    out = await loop.run_in_executor(self._executor, self._run, live)
                except Exception as e:  # each waiter gets the error; the worker goes on
                    for j in live:
                        if not j.done.done():
                            j.done.set_exception(_as_remote(e))
                    continue
                for row, j in enumerate(live):
                    if not j.done.done():
                        j.done.set_result(out[row : row + 1])

    def _runnable(self, job: _Job) -> bool:
        """Whether a queued step can still run; answers the ones that cannot."""
        if job.done.done():
            return False
        if self.sessions.get(job.session.key) is not job.session:  # closed, expired or moved
            job.done.set_exception(
                RemoteError(ErrorCode.UNKNOWN_SESSION, "the session ended before its step ran")
            )
            return False
        if job.start > job.session.cache.length:  # an earlier queued step of it failed
            job.done.set_exception(
                RemoteError(
                    ErrorCode.BAD_POSITION,
                    f"start {job.start} leaves a gap: the session holds "
                    f"{job.session.cache.length} tokens",
                )
            )
            return False
        return True

    def _run(self, jobs: Sequence[_Job]) -> torch.Tensor:
        deadline = min(j.deadline for j in jobs)
        hidden = torch.cat([j.hidden for j in jobs])  # (batch, tokens, hidden)
        one_token_one_session = hidden.shape[0] == 1 and hidden.shape[1] == 1
        threads = self.decode_threads if one_token_one_session else 0
        threads = threads or self._all_threads
        if torch.get_num_threads() != threads:  # this thread's own setting (OpenMP)
            torch.set_num_threads(threads)
        out: torch.Tensor = self.model(
            hidden,
            [j.start for j in jobs],
            self.cache,
            [j.session.cache for j in jobs],
            layers=jobs[0].session.layers,
            should_stop=lambda: self._stopping or time.monotonic() > deadline,
        )
        return out

    def shutdown(self) -> None:
        self._stopping = True
        self._executor.shutdown(wait=True, cancel_futures=True)


def open_compute_thread() -> ThreadPoolExecutor:
    """The thread for a peer's torch work: loading, measuring and serving its span alike.

    OpenMP gives each thread that starts a parallel region a team of its own. With the span
    loaded and measured on one thread and served on another, a SmolLM2 decode step of 15 layers
    took 18.7 ms instead of 17.0 on this project's 2-core machine; all on one thread, 17.0.
    """
    return ThreadPoolExecutor(1, thread_name_prefix="layerswarm-compute")


def _batches(jobs: list[_Job]) -> list[list[_Job]]:
    """Group neighbouring decode steps (one token) of different sessions on the same layers.

    Order is kept, so two steps of one session never swap.
    """
    out: list[list[_Job]] = []
    for j in jobs:
        last = out[-1] if out else None
        if (
            last is not None
            and j.hidden.shape[1] == 1
            and last[0].hidden.shape[1] == 1
            and last[0].session.layers == j.session.layers
            and all(k.session is not j.session for k in last)
        ):
            last.append(j)
        else:
            out.append([j])
    return out


def _as_remote(e: Exception) -> RemoteError:
    if isinstance(e, RemoteError):
        return e
    if isinstance(e, StepCancelled):
        return RemoteError(ErrorCode.TIMEOUT, str(e))
    log.exception("step failed", exc_info=e)
    return RemoteError(ErrorCode.INTERNAL, f"{type(e).__name__}: {e}")
