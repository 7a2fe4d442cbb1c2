"""The compute loop of a span: continuous batching of many sessions' steps, with chunked prefill.

Each turn of the loop builds one batch from all the work that is ready (vLLM's and SGLang's
iteration-level scheduling): the next one-token decode step of every waiting session first, then
chunks of waiting prefills within `token_budget` tokens (`prefill_chunk`, larger, while no
session decodes), and runs it as one forward pass over a flat token axis
(`SpanModel.forward_flat`). A long prompt therefore never freezes the sessions that decode: it
advances a chunk a turn beside them. Steps of one session stay in order, a chunk
a turn at most. A session's pages grow before each chunk runs (`PagedKVCache.grow`); one that
cannot grow fails alone (`CacheFull`), its batch-mates run on.

Model-level and network-free, so the peer and the client's local engine both use it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from layerswarm.errors import (
    CacheFull,
    ContextOverflow,
    LayerswarmError,
    SessionExpired,
    StepCancelled,
)
from layerswarm.shards.blocks import SpanModel, StepBatch
from layerswarm.shards.config import Span
from layerswarm.shards.kv_cache import PagedKVCache, SessionCache
from layerswarm.shards.scheduler_config import Job, PositionGap, SchedulerConfig

log = logging.getLogger(__name__)


class StepScheduler:
    """Queues the steps of many sessions and runs them in mixed batches on one compute thread."""

    def __init__(
        self,
        model: SpanModel,
        cache: PagedKVCache,
        config: SchedulerConfig | None = None,
        compute: ThreadPoolExecutor | None = None,
    ) -> None:
        """`compute`: the one thread that runs the model (a new one, closed by `close`, if None).
        The model's matmuls already use every core, so two batches at once would only fight."""
        self.model = model
        self.cache = cache
        self.config = config or SchedulerConfig()
        self._own_executor = compute is None
        self._executor = compute or ThreadPoolExecutor(1, thread_name_prefix="layerswarm-compute")
        self._all_threads = torch.get_num_threads()
        self._dtype = next(model.parameters()).dtype
        self._queues: dict[int, deque[Job]] = {}  # id(seq) -> its steps, in order
        self._order = itertools.count()
        self._wake = asyncio.Event()
        self._running: list[tuple[Job, int]] = []
        self._running_since = 0.0  # unit: monotonic s the running batch started
        self._batch_s = 0.0  # unit: s, moving average of one batch's time
        self._to_free: list[tuple[PagedKVCache, SessionCache]] = []  # after the running batch
        self._decoded_at: dict[int, float] = {}  # id(seq) -> monotonic s its last decode ran
        self._last_decoders: set[int] = set()  # id(seq) of the last batch's decode steps
        self.rolled_back_tokens = 0  # unit: tokens dropped by steps that began before the end
        self._closed = False
        # Told of each batch: (sessions, tokens, seconds); the peer counts them for /metrics.
        self.on_batch: Callable[[int, int, float], None] | None = None

    async def run(
        self,
        seq: SessionCache,
        hidden: torch.Tensor,
        start: int,
        layers: Span | None = None,
        *,
        timeout: float | None = None,
    ) -> torch.Tensor:
        """Queue a step of `seq` (after its earlier ones) and wait for its output.

        Args:
            hidden: `(1, tokens, hidden)` in any float dtype, positions `start ..`.
            layers: the part of the span to run; all of it if None.
            timeout: seconds the step may take from when its first chunk runs (waiting behind
                other work does not count); past it, its remaining chunks are dropped.
        Returns:
            `(1, tokens, hidden)` in `hidden`'s dtype.
        Raises:
            CacheFull: the session could not grow to hold the step.
            ContextOverflow: the step passes the session's `max_length`.
            PositionGap: `start` leaves a gap after the session's queued steps.

        A step that starts before the end of what the session holds (its queued steps
        included) rolls the session back to `start` when it runs: the positions after are
        dropped, and their pages given back (`PagedKVCache.truncate`).
            StepCancelled: past `timeout`, or the scheduler closed.
            SessionExpired: the session was freed (`free`) before the step ran.
        """
        if hidden.ndim != 3 or hidden.shape[0] != 1 or hidden.shape[1] < 1:
            raise ValueError(f"hidden must be (1, tokens, hidden), got {tuple(hidden.shape)}")
        if self._closed:
            raise StepCancelled("the scheduler is closed")
        end = start + hidden.shape[1]
        if end > seq.max_length:
            raise ContextOverflow(f"positions up to {end} pass the max_length {seq.max_length}")
        queue = self._queues.setdefault(id(seq), deque())
        live = [j for j in queue if not j.done.done()]
        held = max(seq.length, live[-1].start + live[-1].total) if live else seq.length
        if start < 0 or start > held:
            raise PositionGap(f"start {start} leaves a gap: the session holds {held} tokens")
        job = Job(
            seq,
            hidden[0].to(self._dtype),
            start,
            layers or self.model.span,
            hidden.dtype,
            timeout,
            next(self._order),
            asyncio.get_running_loop().create_future(),
        )
        queue.append(job)
        self._wake.set()
        try:
            out = await job.done  # a cancelled caller cancels the job too: it is dropped
        except asyncio.CancelledError:
            self._wake.set()  # so that the loop drops it now
            raise
        return out.to(job.out_dtype)[None]

    def free(self, seq: SessionCache) -> None:
        """End a session: its queued steps fail (`SessionExpired`) and its pages go back to the
        pool, once the running batch (which may write them) is over."""
        for job in self._queues.pop(id(seq), ()):
            self._fail(job, SessionExpired("the session ended before its step ran"))
        self._decoded_at.pop(id(seq), None)
        self._last_decoders.discard(id(seq))
        if any(job.seq is seq for job, _ in self._running):
            self._to_free.append((self.cache, seq))
        else:
            self.cache.free(seq)

    def replace(self, model: SpanModel, cache: PagedKVCache) -> None:
        """Serve another model and cache from now on; every queued step fails."""
        for queue in self._queues.values():
            for job in queue:
                self._fail(job, SessionExpired("the peer moved to other layers"))
        self._queues.clear()
        self._decoded_at.clear()
        self.model, self.cache = model, cache
        self._dtype = next(model.parameters()).dtype

    @property
    def queued_tokens(self) -> int:
        """Tokens waiting or running now."""
        return sum(j.remaining for q in self._queues.values() for j in q)

    def queue_seconds(self) -> float:
        """The expected wait before a decode step queued now starts, from measured batch times:
        the rest of the running batch, and a batch for each full batch of decode steps ahead."""
        if not self._running:
            return 0.0
        left = max(0.0, self._batch_s - (time.monotonic() - self._running_since))
        running = {id(j) for j, _ in self._running}
        waiting = sum(
            1 for q in self._queues.values() if q[0].total == 1 and id(q[0]) not in running
        )
        return left + (waiting // self.config.max_batch) * self._batch_s

    def close(self) -> None:
        """Stop: a running batch stops at its next layer, queued steps fail."""
        self._closed = True
        for queue in self._queues.values():
            for job in queue:
                self._fail(job, StepCancelled("the scheduler closed"))
        self._queues.clear()
        if self._own_executor:
            self._executor.shutdown(wait=True, cancel_futures=True)

    async def serve(self) -> None:
        """The compute loop: form a batch from the ready work, run it, answer; until cancelled."""
        loop = asyncio.get_running_loop()
        while not self._closed:
            await self._regroup()
            batch = self._next_batch()
            if not batch:
                self._wake.clear()
                await self._wake.wait()
                continue
            self._running, self._running_since = batch, time.monotonic()
            model, cache = self.model, self.cache
            try:
                outs = await loop.run_in_executor(
                    self._executor, self._compute, batch, model, cache
                )
            except Exception as e:  # a bug or shutdown: each waiter hears of it, the loop goes on
                for job, _ in batch:
                    self._drop(job, e if isinstance(e, LayerswarmError) else _internal(e))
                continue
            finally:
                took = time.monotonic() - self._running_since
                self._batch_s = took if not self._batch_s else 0.8 * self._batch_s + 0.2 * took
                if self.on_batch is not None:
                    self.on_batch(len(batch), sum(n for _, n in batch), took)
                self._running = []
                for c, seq in self._to_free:
                    c.free(seq)
                self._to_free.clear()
            for (job, _), out in zip(batch, outs, strict=True):
                self._finish_chunk(job, out)
            self._last_decoders = {id(job.seq) for job, _ in batch if job.total == 1}

    async def _regroup(self) -> None:
        """Wait up to `regroup_wait` for the sessions that decoded in the last batch.

        Starting the next batch without them splits the decoding sessions into groups that take
        turns, each waiting two batches a token: on the local engine, 4 sessions decoding beside
        a 2,000-token prefill went in pairs, and their longest gap was 7x the median.
        """
        wait = self.config.regroup_wait
        if not wait or not self._last_decoders:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            back = {key for key, q in self._queues.items() if q and q[0].total == 1}
            left = deadline - loop.time()
            if self._last_decoders <= back or left <= 0 or self._closed:
                return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), left)
            except asyncio.TimeoutError:  # not the builtin before Python 3.11
                return

    def _finish_chunk(self, job: Job, out: torch.Tensor) -> None:
        job.parts.append(out)
        job.ran += out.shape[0]
        if job.total == 1:
            self._decoded_at[id(job.seq)] = time.monotonic()
        if job.remaining > 0 or job.done.done():
            return
        queue = self._queues.get(id(job.seq))
        if queue and queue[0] is job:
            queue.popleft()
            if not queue:
                del self._queues[id(job.seq)]
        job.done.set_result(torch.cat(job.parts))

    def _next_batch(self) -> list[tuple[Job, int]]:
        """Decode steps first (oldest first, `max_batch` sessions), then prefill chunks within
        the token budget; only sessions on the same layers as the oldest ready step."""
        now = time.monotonic()
        heads: list[Job] = []
        for key in list(self._queues):
            queue = self._queues[key]
            while queue and not self._ready(queue[0], now):
                queue.popleft()
            if queue:
                heads.append(queue[0])
            else:
                del self._queues[key]
        if not heads:
            return []
        heads.sort(key=lambda j: j.order)
        layers = heads[0].layers
        heads = [j for j in heads if j.layers == layers]
        decode = [j for j in heads if j.total == 1]
        prefill = [j for j in heads if j.total > 1]
        batch: list[tuple[Job, int]] = []
        budget = self._budget(decode, now)
        for job in decode + prefill:
            n = min(job.remaining, budget)
            if len(batch) == self.config.max_batch or n <= 0:
                break
            if self._grow(job, n):
                batch.append((job, n))
                budget -= n
                if job.deadline is None and job.timeout is not None:
                    job.deadline = now + job.timeout
        return batch

    def _budget(self, decode: list[Job], now: float) -> int:
        """The small budget while any session decodes (a step queued, or one that ran within
        `decode_linger`: its next is on its way), else the big prefill chunk."""
        if decode:
            return self.config.token_budget
        linger = self.config.decode_linger
        for key, at in list(self._decoded_at.items()):
            if now - at < linger:
                return self.config.token_budget
            del self._decoded_at[key]
        return max(self.config.prefill_chunk, self.config.token_budget)

    def _ready(self, job: Job, now: float) -> bool:
        """Whether a session's next step can run now; answers (and drops) the ones that cannot."""
        if job.done.done():  # its caller gave up
            self._rollback(job)
            return False
        if job.deadline is not None and now > job.deadline:
            self._drop(job, StepCancelled(f"the step ran past {job.timeout:.1f} s"), pop=False)
            return False
        if job.ran == 0 and job.start > job.seq.length:  # an earlier step of it failed
            gap = PositionGap(
                f"start {job.start} leaves a gap: the session holds {job.seq.length} tokens"
            )
            self._drop(job, gap, pop=False)
            return False
        return True

    def _grow(self, job: Job, n: int) -> bool:
        end = job.start + job.ran + n
        try:
            if job.ran == 0 and job.start < job.seq.length:
                # A step that begins before the session's end replaces what follows (a
                # speculative step's rejected drafts): those positions go, and pages that hold
                # none come back (a shared page it now ends in is copied: CacheFull if no room).
                self.rolled_back_tokens += self.cache.truncate(job.seq, job.start)
            self.cache.grow(job.seq, end)
        except (CacheFull, ContextOverflow) as e:
            msg = f"the session cannot grow to {end} tokens here ({e})"
            self._drop(job, CacheFull(msg) if isinstance(e, CacheFull) else ContextOverflow(msg))
            return False
        return True

    def _drop(self, job: Job, error: Exception, pop: bool = True) -> None:
        """Fail a job; with `pop`, take it off its session's queue too."""
        queue = self._queues.get(id(job.seq))
        if pop and queue and queue[0] is job:
            queue.popleft()
        self._fail(job, error)
        self._rollback(job)

    @staticmethod
    def _fail(job: Job, error: Exception) -> None:
        if not job.done.done():
            job.done.set_exception(error)
            job.done.exception()  # retrieved: a caller that left must not log "never retrieved"

    @staticmethod
    def _rollback(job: Job) -> None:
        """A step that stopped part-way leaves its session where it started."""
        if job.ran > 0 and job.seq.length > job.start:
            job.seq.length = job.start

    def _compute(
        self, batch: list[tuple[Job, int]], model: SpanModel, cache: PagedKVCache
    ) -> list[torch.Tensor]:
        """One forward pass over the batch's chunks (on the compute thread)."""
        one_token_one_session = len(batch) == 1 and batch[0][1] == 1
        threads = self.config.decode_threads if one_token_one_session else 0
        threads = threads or self._all_threads
        if torch.get_num_threads() != threads:  # this thread's own setting (OpenMP)
            torch.set_num_threads(threads)
        # (tokens, hidden), to the model's device in one copy (a peer's inputs come off the wire)
        device = cache.k.device
        x = _to_device([job.hidden[job.ran : job.ran + n] for job, n in batch], device)
        if device.type == "cuda":  # Triton launches on this thread's device: make it the model's
            torch.cuda.set_device(device)
        step = StepBatch(
            [job.start + job.ran for job, _ in batch],
            [n for _, n in batch],
            [job.seq for job, _ in batch],
        )
        out = model.forward_flat(
            x, step, cache, batch[0][0].layers, should_stop=lambda: self._closed
        )
        # Outputs go back where their inputs came from, in the compute dtype (a GPU peer's
        # bf16 crosses to the host at half fp32's bytes; `run` casts to the caller's dtype).
        host = out.cpu() if any(job.hidden.device != out.device for job, _ in batch) else out
        return [
            (out if job.hidden.device == out.device else host)[at : at + n]
            for (job, _), at, n in zip(batch, step.offsets, step.counts, strict=True)
        ]


def _to_device(parts: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """`torch.cat(parts)` on `device`: one copy when the parts share a device."""
    if all(p.device == parts[0].device for p in parts):
        return torch.cat(parts).to(device)
    return torch.cat([p.to(device) for p in parts])


def _internal(e: Exception) -> LayerswarmError:
    log.error("a batch failed", exc_info=e)
    return LayerswarmError(f"{type(e).__name__}: {e}")
