"""Sessions on a peer: admission, per-client limits, validation of each step, and their compute.

Compute is the span's `StepScheduler`: one worker thread, continuous batching with chunked
prefill. KV pages are taken as sessions grow, so admission cannot be a one-off reservation:
a new session is let in while the pages in use (at least one a session) plus a reserve kept for
open sessions to grow leave room; otherwise it waits in a bounded queue for a session to close,
and only then hears "cache full". A running session that cannot grow hears "session full".

Pages are shared where that saves a prefill (`PagedKVCache`, copy on write):
- a session opened with `fork_of` holds what its parent holds (`n` choices of one prompt);
- a session opened with a prefix's hash chain (`OpenSession.prefix`) starts with the pages this
  peer keeps for that chain, a finished session's or a live one's, and its own full pages of
  the chain are kept in turn as its steps fill them. Kept pages are scoped to the client (its
  peer ID) and the layers: a peer never sees tokens, only their hashes, so a client that lied
  about its hashes could poison another client's replies if pages were shared across clients.
  A session counts its shared pages as its own in admission, as it would hold them without
  the sharing; pages that only the cache keeps count as free.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import torch

from layerswarm import metrics
from layerswarm.errors import (
    CacheFull,
    ContextOverflow,
    LayerswarmError,
    RemoteError,
    SessionExpired,
    StepCancelled,
)
from layerswarm.peer.config import ServingConfig
from layerswarm.shards.blocks import SpanModel
from layerswarm.shards.config import Span
from layerswarm.shards.kv_cache import PagedKVCache, SessionCache
from layerswarm.shards.scheduler import StepScheduler
from layerswarm.shards.scheduler_config import PositionGap
from layerswarm.swarm.messages import PREFIX_BLOCK_TOKENS
from layerswarm.swarm.protocol import ErrorCode

log = logging.getLogger(__name__)


@dataclass
class Session:
    key: tuple[str, str]  # (owner connection, session ID): a client reaches only its own
    client: str  # the client's peer ID: per-client limits count across its connections
    layers: Span  # the part of the peer's span this session runs
    cache: SessionCache
    last_used: float  # unit: monotonic s of the last request
    queued_length: int = 0  # unit: tokens the session will hold once its queued steps ran
    push_key: bytes | None = None  # the client's key for steps pushed here (`swarm/push.py`)
    # outputs of pushed steps by start position, until the client collects them (`forward`)
    # (the tensor as sent, and its int8 scales or None)
    outputs: dict[int, asyncio.Future[tuple[torch.Tensor, bytes | None]]] = field(
        default_factory=dict
    )
    handed_on: asyncio.Future[None] | None = None  # set once the last pushed step was sent on
    prefix: tuple[bytes, ...] = ()  # the hash chain of its first blocks (`OpenSession.prefix`)
    kept: int = 0  # blocks of `prefix` whose pages the cache keeps (taken from it, or given)

    def prefix_key(self, block: int) -> tuple[str, int, int, bytes]:
        """The cache's key of the session's page `block`: scoped to the client and layers."""
        return (self.client, self.layers.start, self.layers.end, self.prefix[block])


class SessionTable:
    """Every open session of one peer, and the scheduler that serves their steps."""

    def __init__(
        self,
        model: SpanModel,
        cache_tokens: int,
        config: ServingConfig | None = None,
        compute: ThreadPoolExecutor | None = None,
        decode_threads: int = 0,
    ) -> None:
        """`compute`: the one thread that runs the model (a new one if None); see
        `open_compute_thread` for why the peer loads and measures its span there too.
        `decode_threads`: threads for a decode step of one session (`SpeedSample`); 0: all."""
        self.config = config or ServingConfig()
        self.model = model
        self.cache: PagedKVCache = model.new_cache(cache_tokens)
        self.sessions: dict[tuple[str, str], Session] = {}
        self._executor = compute or open_compute_thread()
        scheduling = replace(self.config.scheduler, decode_threads=decode_threads)
        self.scheduler = StepScheduler(model, self.cache, scheduling, self._executor)
        self._waiters: deque[asyncio.Future[None]] = deque()  # opens waiting for memory
        self._promised = 0  # sessions: waiters woken and not yet opened
        self.truncating_steps = 0  # steps that came with `truncate_to` (pushed ones too)
        self.computed_tokens = 0  # unit: tokens the span ran (sessions' steps, all together)
        self.cached_tokens = 0  # unit: tokens that sessions took from kept pages at open
        self.forks = 0  # sessions opened as forks of another
        metrics.watch_peer(self.scheduler, lambda: self.cache, lambda: len(self.sessions))

    @property
    def reserve_pages(self) -> int:
        return int(self.config.cache_reserve * self.cache.num_pages)

    @property
    def tokens_free(self) -> int:
        """KV room for new sessions, in tokens: pages neither held (a session counts at least
        one, and what its queued steps will take) nor kept in reserve for open ones to grow."""
        free = min(self.cache.num_pages - self._pages_used(), self.cache.pages_free)
        return max(0, free - self.reserve_pages) * self.cache.page_size

    def _pages_held(self, session: Session) -> int:
        tokens = max(session.cache.length, session.queued_length)
        return max(1, len(session.cache.pages), self.cache.pages_for(tokens))

    def _pages_used(self) -> int:
        return sum(self._pages_held(s) for s in self.sessions.values()) + self._promised

    def _admissible(self) -> bool:
        return self._pages_used() + 1 + self.reserve_pages <= self.cache.num_pages

    async def open(
        self,
        owner: str,
        client: str,
        session_id: str,
        layers: Span,
        max_length: int,
        prefix: tuple[bytes, ...] = (),
        fork_of: str | None = None,
    ) -> Session:
        """Open a session, waiting for memory if it is short.

        It holds no pages, or those of a kept `prefix` (its hash chain), or, with `fork_of`,
        every page of that session of the same connection.

        Raises:
            RemoteError: BAD_SPAN, PROTOCOL (already open), BUSY (a limit of this client),
                CACHE_FULL (no memory after `admission_timeout`, or the wait queue is full),
                UNKNOWN_SESSION or BAD_POSITION (a fork of no such session, or of a session
                with steps queued, or on other layers).
        """
        span = self.model.span
        if layers.start < span.start or layers.end > span.end:
            raise RemoteError(ErrorCode.BAD_SPAN, f"this peer serves layers {span}, not {layers}")
        self._check_new(owner, client, session_id)
        waited = bool(self._waiters) or not self._admissible()
        if waited:
            await self._wait_for_memory()
            self._promised -= 1
            try:
                self._check_new(owner, client, session_id)
            except RemoteError:
                self._wake_waiters()  # the room goes to the next in line
                raise
        try:
            if fork_of is not None:
                cache = self._fork(owner, fork_of, layers, max_length)
            else:
                cache = self.cache.open_session(max_length)
        except RemoteError:
            if waited:
                self._wake_waiters()
            raise
        session = Session((owner, session_id), client, layers, cache, time.monotonic())
        if fork_of is None and prefix and self.cache.page_size == PREFIX_BLOCK_TOKENS:
            session.prefix = prefix
            pages = self.cache.cached_pages([session.prefix_key(i) for i in range(len(prefix))])
            self.cache.attach(cache, pages)
            session.kept = len(pages)
            self.cached_tokens += cache.length
        self.sessions[session.key] = session
        if waited:
            self._wake_waiters()  # room may remain for the next in line
        return session

    def _fork(self, owner: str, parent_id: str, layers: Span, max_length: int) -> SessionCache:
        parent = self.get(owner, parent_id)
        if parent.layers != layers:
            raise RemoteError(
                ErrorCode.BAD_SPAN,
                f"session {parent_id!r} runs layers {parent.layers}: a fork runs the same",
            )
        if parent.queued_length > parent.cache.length:
            raise RemoteError(
                ErrorCode.BAD_POSITION,
                f"session {parent_id!r} has steps under way: fork it between steps",
            )
        try:
            cache = self.cache.fork(parent.cache, max_length)
        except ContextOverflow as e:
            raise RemoteError(ErrorCode.BAD_POSITION, str(e)) from None
        except CacheFull as e:
            raise RemoteError(ErrorCode.CACHE_FULL, f"{e}; no room to fork") from None
        self.forks += 1
        return cache

    def _keep_prefix(self, session: Session) -> None:
        """Give the cache the session's pages of its prefix that its steps have filled."""
        full = min(len(session.prefix), session.cache.length // self.cache.page_size)
        while session.kept < full:
            self.cache.keep(session.cache, session.kept, session.prefix_key(session.kept))
            session.kept += 1

    def _check_new(self, owner: str, client: str, session_id: str) -> None:
        if (owner, session_id) in self.sessions:
            raise RemoteError(ErrorCode.PROTOCOL, f"session {session_id!r} is already open")
        mine = [s for s in self.sessions.values() if s.client == client]
        if len(mine) >= self.config.max_sessions_per_client:
            raise RemoteError(
                ErrorCode.BUSY,
                f"this client holds {len(mine)} sessions here, the most one may "
                f"(max_sessions_per_client)",
            )
        self._check_client_pages(client, 1)

    def _check_client_pages(self, client: str, more: int) -> None:
        """Refuse a client past its share of the pages, but only while others want them: a
        lone client may fill the cache (one long context on a small peer), never crowd out
        another client's sessions or those waiting to be let in."""
        limit = int(self.config.max_client_cache_fraction * self.cache.num_pages)
        held = sum(self._pages_held(s) for s in self.sessions.values() if s.client == client)
        others = self._waiters or any(s.client != client for s in self.sessions.values())
        if held + more > limit and others:
            raise RemoteError(
                ErrorCode.BUSY,
                f"this client's sessions would hold {held + more} KV pages here, more than "
                f"its share of {limit} of {self.cache.num_pages} (max_client_cache_fraction)",
            )

    async def _wait_for_memory(self) -> None:
        """Wait in line for room (woken by `_wake_waiters`); the caller then holds a promise."""
        if len(self._waiters) >= self.config.admission_queue:
            raise RemoteError(
                ErrorCode.CACHE_FULL,
                f"cache full: {len(self._waiters)} new sessions already wait for memory here",
            )
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(turn)
        try:
            await asyncio.wait_for(asyncio.shield(turn), self.config.admission_timeout)
        except BaseException as e:
            if turn in self._waiters:
                self._waiters.remove(turn)
            elif turn.done() and not turn.cancelled():  # let in, but leaving: pass it on
                self._promised -= 1
                self._wake_waiters()
            if isinstance(e, TimeoutError):
                raise RemoteError(
                    ErrorCode.CACHE_FULL,
                    f"cache full: no KV memory for a new session came free within "
                    f"{self.config.admission_timeout:.1f} s ({self.cache.pages_free} of "
                    f"{self.cache.num_pages} pages free, {self.reserve_pages} kept for growth)",
                ) from None
            raise

    def _wake_waiters(self) -> None:
        """Let the first waiting opens in, as many as there is room for."""
        while self._waiters and self._admissible():
            self._promised += 1
            self._waiters.popleft().set_result(None)

    def get(self, owner: str, session_id: str) -> Session:
        session = self.sessions.get((owner, session_id))
        if session is None:
            raise RemoteError(
                ErrorCode.UNKNOWN_SESSION, f"no session {session_id!r} here (closed or expired)"
            )
        session.last_used = time.monotonic()
        return session

    def close(self, owner: str, session_id: str) -> None:
        self._end(self.get(owner, session_id).key)
        self._wake_waiters()

    def close_owner(self, owner: str) -> None:
        """Drop every session of a client connection (it is gone)."""
        for key in [k for k in self.sessions if k[0] == owner]:
            self._end(key)
        self._wake_waiters()

    def _end(self, key: tuple[str, str]) -> None:
        self.scheduler.free(self.sessions.pop(key).cache)

    def replace_model(self, model: SpanModel, cache_tokens: int) -> int:
        """Serve another span from now on; every open session ends. Returns how many did."""
        dropped = len(self.sessions)
        self.sessions.clear()
        self.model = model
        self.cache = model.new_cache(cache_tokens)
        self.scheduler.replace(model, self.cache)
        self._wake_waiters()
        return dropped

    def expire_idle(self, idle_timeout: float) -> int:
        now = time.monotonic()
        stale = [k for k, s in self.sessions.items() if now - s.last_used > idle_timeout]
        for key in stale:
            self._end(key)
        if stale:
            log.info("expired %d idle sessions", len(stale))
            self._wake_waiters()
        return len(stale)

    async def step(
        self,
        session: Session,
        hidden: torch.Tensor,
        start: int,
        timeout: float,
        truncate_to: int | None = None,
    ) -> torch.Tensor:
        """Validate a step, queue it, and wait for its output.

        `timeout` counts from when the step first runs: waiting behind other sessions' work
        does not cancel it while its client waits (and reads the queue from `InfoReply`).
        `truncate_to`: roll the session back to this many tokens first (`Step.truncate_to`);
        the scheduler drops the positions after, and their pages, when the step runs.
        """
        if truncate_to is not None:
            self._check_truncate(session, start, truncate_to)
            self.truncating_steps += 1
        self._check_step(session, hidden, start)
        end = start + hidden.shape[1]
        grow = self.cache.pages_for(end) - self._pages_held(session)
        if grow > 0:
            self._check_client_pages(session.client, grow)
        session.queued_length = end
        t0 = time.perf_counter()
        try:
            out = await self.scheduler.run(
                session.cache, hidden, start, session.layers, timeout=timeout
            )
        except LayerswarmError as e:
            session.queued_length = session.cache.length  # what it holds: steps after fail too
            metrics.PEER_STEP_ERRORS.inc()
            raise _as_remote(e, session) from None
        metrics.step_done(hidden.shape[1], time.perf_counter() - t0)
        self.computed_tokens += hidden.shape[1]
        if session.kept < len(session.prefix):
            self._keep_prefix(session)
        return out

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

    @staticmethod
    def _check_truncate(session: Session, start: int, truncate_to: int) -> None:
        held = max(session.cache.length, session.queued_length)
        if not 0 <= truncate_to <= held:
            raise RemoteError(
                ErrorCode.BAD_POSITION,
                f"cannot truncate to position {truncate_to}: the session holds {held} tokens",
            )
        if start != truncate_to:
            raise RemoteError(
                ErrorCode.BAD_POSITION,
                f"a step that truncates to position {truncate_to} must start there, not at {start}",
            )

    def load(self) -> dict[str, float | int]:
        """What clients read to tell a busy peer from a dead one (`InfoReply.extra`), and the
        tokens that steps starting before their session's end dropped (speculation's drafts)."""
        return {
            "queued_tokens": self.scheduler.queued_tokens,
            "queue_seconds": round(self.scheduler.queue_seconds(), 4),
            "rolled_back_tokens": self.scheduler.rolled_back_tokens,
            "truncating_steps": self.truncating_steps,
            "session_tokens": sum(s.cache.length for s in self.sessions.values()),
            "kv_pages_used": self.cache.num_pages - self.cache.pages_free,
            "kv_pages_cached": self.cache.pages_cached,
            "computed_tokens": self.computed_tokens,
            "cached_tokens": self.cached_tokens,
            "forked_sessions": self.forks,
        }

    async def serve_steps(self) -> None:
        """The compute loop (the scheduler's), until cancelled."""
        await self.scheduler.serve()

    def shutdown(self) -> None:
        self.scheduler.close()
        self._executor.shutdown(wait=True, cancel_futures=True)


def open_compute_thread() -> ThreadPoolExecutor:
    """The thread for a peer's torch work: loading, measuring and serving its span alike.

    OpenMP gives each thread that starts a parallel region a team of its own. With the span
    loaded and measured on one thread and served on another, a SmolLM2 decode step of 15 layers
    took 18.7 ms instead of 17.0 on this project's 2-core machine; all on one thread, 17.0.
    """
    return ThreadPoolExecutor(1, thread_name_prefix="layerswarm-compute")


def _as_remote(e: LayerswarmError, session: Session) -> RemoteError:
    sid = session.key[1]
    if isinstance(e, RemoteError):
        return e
    if isinstance(e, CacheFull):
        return RemoteError(ErrorCode.SESSION_FULL, f"session {sid!r}: {e}; move it elsewhere")
    if isinstance(e, (ContextOverflow, PositionGap)):
        return RemoteError(ErrorCode.BAD_POSITION, str(e))
    if isinstance(e, SessionExpired):
        return RemoteError(ErrorCode.UNKNOWN_SESSION, f"session {sid!r}: {e}")
    if isinstance(e, StepCancelled):
        return RemoteError(ErrorCode.TIMEOUT, str(e))
    log.error("a step of session %r failed: %s", sid, e)
    return RemoteError(ErrorCode.INTERNAL, str(e))
