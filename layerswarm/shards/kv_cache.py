"""A paged KV cache that holds many sessions of one span, each taking pages as it grows.

Why paged and not one slot per session: sessions ask for very different `max_length`s, and a
peer's memory budget should hold as many of them as fit, not `budget / longest` slots. A pool of
fixed-size pages (vLLM's PagedAttention layout) gives each session just the pages it uses, and a
decode kernel reads any mix of sessions in one launch through their block tables.

A session takes pages as it grows (`grow`, before each step), not for its whole `max_length` at
open: 8 chat sessions of `max_length` 8192 that each hold a few hundred tokens fit in the room
that one reservation took. Admission control (how many sessions to let in, with room kept for
growth) is the server's job; `grow` raises `CacheFull` when no page is left.

The allocator keeps each session's pages in as few contiguous runs as it can: a session grows into
the page after its last one when that page is free, and a new session starts in the middle of the
largest free gap (or at its start, when nobody sits before it), leaving room to grow on both
sides. Each run is a plain view of the pool, so attention on a CPU reads keys run by run and never
gathers (copies) a session's whole context; a one-run session is the common case.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from layerswarm.errors import CacheFull, ContextOverflow

DEFAULT_PAGE_SIZE = 16  # unit: tokens per page; small pages waste little of a session's last one


@dataclass(eq=False)
class SessionCache:
    """One session's share of the pool: its pages and how many tokens it holds."""

    pages: list[int]
    block_table: torch.Tensor  # (num_pages,) int32, the pages in order
    max_length: int  # unit: tokens this session may hold at most
    length: int = 0  # unit: tokens written so far
    runs: list[tuple[int, int]] = field(default_factory=list)  # (first page, pages) in order

    @property
    def contiguous(self) -> bool:
        """The pages are one run, so keys are a view of the pool."""
        return len(self.runs) <= 1


@dataclass(frozen=True)
class StepSlots:
    """One step's place in the pool: built by `PagedKVCache.step_slots` once, used per layer."""

    slots: torch.Tensor  # (tokens,) int64: the pool slot of each new token, segments in order
    runs: list[list[tuple[int, int]]]  # per segment: (first slot, tokens) of each run it reads
    # With `paged`, for the one-token segments (decode kernels read through block tables):
    table: torch.Tensor | None = None  # (decoding, max_pages) int32 block tables, padded with 0
    lengths: torch.Tensor | None = None  # (decoding,) int32: tokens each then holds
    decode_rows: torch.Tensor | None = None  # (decoding,) int64 rows; None: every segment decodes


class PagedKVCache:
    """Keys and values of `num_layers` layers, in a pool of `num_pages` pages."""

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        num_pages: int,
        page_size: int = DEFAULT_PAGE_SIZE,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        self.page_size = page_size
        self.num_pages = num_pages
        shape = (num_layers, num_pages, page_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        # Each layer's pool as `(slots, kv_heads, head_dim)` views, made once: a decode step
        # reads and writes every layer's, and each view made again costs ops' time on a CPU.
        self._k_slots = list(self.k.flatten(1, 2))
        self._v_slots = list(self.v.flatten(1, 2))
        self._free = [True] * num_pages
        self._n_free = num_pages

    @classmethod
    def bytes_per_token(
        cls, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        """Memory one cached token costs across `num_layers` layers (keys and values)."""
        return 2 * num_layers * num_kv_heads * head_dim * dtype.itemsize

    @property
    def tokens_total(self) -> int:
        return self.num_pages * self.page_size

    @property
    def tokens_free(self) -> int:
        return self._n_free * self.page_size

    @property
    def pages_free(self) -> int:
        return self._n_free

    def pages_for(self, tokens: int) -> int:
        """Pages that hold `tokens` tokens."""
        return -(-tokens // self.page_size)

    def open_session(self, max_length: int) -> SessionCache:
        """A session of up to `max_length` tokens that holds no page yet (see `grow`)."""
        if max_length <= 0:
            raise ValueError(f"max_length must be positive, got {max_length}")
        empty = torch.zeros(0, dtype=torch.int32, device=self.k.device)
        return SessionCache([], empty, max_length)

    def allocate(self, max_length: int) -> SessionCache:
        """A session with pages for all its `max_length` tokens taken now (a reservation).

        Raises:
            CacheFull: fewer free pages than the session needs.
        """
        session = self.open_session(max_length)
        self.grow(session, max_length)
        return session

    def grow(self, session: SessionCache, length: int) -> None:
        """Take pages so that `session` can hold `length` tokens; a no-op when it already can.

        Raises:
            ContextOverflow: `length` passes the session's `max_length`.
            CacheFull: not enough free pages; the session keeps what it had.
        """
        if length > session.max_length:
            raise ContextOverflow(
                f"positions up to {length} do not fit the session's {session.max_length} tokens"
            )
        need = self.pages_for(length) - len(session.pages)
        if need <= 0:
            return
        if need > self._n_free:
            raise CacheFull(
                f"cache full: {length} tokens need {need} more pages, "
                f"{self._n_free} of {self.num_pages} are free"
            )
        for _ in range(need):
            last = session.pages[-1] if session.pages else -1
            if last >= 0 and last + 1 < self.num_pages and self._free[last + 1]:
                page = last + 1
                first, n = session.runs[-1]
                session.runs[-1] = (first, n + 1)
            else:
                page = self._place()
                session.runs.append((page, 1))
            self._free[page] = False
            session.pages.append(page)
        self._n_free -= need
        session.block_table = torch.tensor(session.pages, dtype=torch.int32, device=self.k.device)

    def _place(self) -> int:
        """Where a new run starts: the largest free gap, in its middle when a run ends before it
        (that session may grow into the first half), else at its start."""
        best_start, best_len, run_start = -1, 0, 0
        for i in range(self.num_pages + 1):
            if i < self.num_pages and self._free[i]:
                continue
            if i - run_start > best_len:
                best_start, best_len = run_start, i - run_start
            run_start = i + 1
        assert best_len > 0  # callers check that a page is free
        return best_start if best_start == 0 else best_start + best_len // 2

    def truncate(self, session: SessionCache, length: int) -> int:
        """Forget every position of `session` from `length` on, and give back the pages that
        then hold none of its tokens (a speculative step's rejected drafts).

        Returns:
            How many tokens were dropped (0 when the session held no more than `length`).
        Raises:
            ValueError: `length` is negative.
        """
        if length < 0:
            raise ValueError(f"cannot truncate to a negative length ({length})")
        dropped = max(0, session.length - length)
        session.length -= dropped
        keep = self.pages_for(length)
        if keep >= len(session.pages):
            return dropped
        for p in session.pages[keep:]:
            self._free[p] = True
        self._n_free += len(session.pages) - keep
        session.pages = session.pages[:keep]
        runs, left = [], keep
        for first, n in session.runs:
            if left <= 0:
                break
            runs.append((first, min(n, left)))
            left -= n
        session.runs = runs
        session.block_table = session.block_table[:keep]
        return dropped

    def free(self, session: SessionCache) -> None:
        for p in session.pages:
            self._free[p] = True
        self._n_free += len(session.pages)
        session.pages = []
        session.runs = []
        session.block_table = session.block_table[:0]

    def _segments(self, session: SessionCache, start: int, end: int) -> list[tuple[int, int, int]]:
        """`(slot, from, to)`: positions `from .. to` (within `start .. end`) sit at pool slots
        `slot ..`, one entry a run."""
        out = []
        pos = 0
        for first, n in session.runs:
            lo, hi = max(start, pos), min(end, pos + n * self.page_size)
            if lo < hi:
                out.append((first * self.page_size + lo - pos, lo, hi))
            pos += n * self.page_size
            if pos >= end:
                break
        if not out or out[-1][2] < end:
            raise ContextOverflow(f"positions up to {end} pass the session's pages (grow first)")
        return out

    def step_slots(
        self,
        sessions: Sequence[SessionCache],
        starts: Sequence[int],
        counts: Sequence[int],
        paged: bool = False,
    ) -> StepSlots:
        """Where a step's new tokens go and which runs each session then reads, the same in
        every layer: built once a step, so a layer only indexes (no per-layer bookkeeping).
        With `paged`, the block tables and lengths of its one-token segments too (what the
        Triton decode kernel reads).

        Raises:
            ContextOverflow: a session has not grown to hold its new tokens.
        """
        slots: list[torch.Tensor] = []
        runs: list[list[tuple[int, int]]] = []
        for session, start, n in zip(sessions, starts, counts, strict=True):
            for slot, lo, hi in self._segments(session, start, start + n):
                slots.append(torch.arange(slot, slot + hi - lo))
            runs.append([(slot, hi - lo) for slot, lo, hi in self._segments(session, 0, start + n)])
        step = StepSlots(torch.cat(slots).to(self.k.device), runs)
        one = [j for j, n in enumerate(counts) if n == 1]
        if not paged or not one:
            return step
        device = self.k.device
        rows = None
        if len(one) < len(counts):
            at = [sum(counts[:j]) for j in one]
            rows = torch.tensor(at, dtype=torch.int64).to(device)
        lengths = torch.tensor([starts[j] + 1 for j in one], dtype=torch.int32).to(device)
        table = self.block_tables([sessions[j] for j in one])
        return StepSlots(step.slots, runs, table, lengths, rows)

    def write_step(self, layer: int, step: StepSlots, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store one layer's keys and values of every new token of a step, `(tokens, kv_heads,
        head_dim)` each, in two scatters."""
        self._k_slots[layer].index_copy_(0, step.slots, k)
        self._v_slots[layer].index_copy_(0, step.slots, v)

    def step_views(
        self, layer: int, step: StepSlots, segment: int
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """`views` of one segment of a step: its session's runs as views of the pool."""
        pool_k, pool_v = self._k_slots[layer], self._v_slots[layer]
        return [(pool_k[a : a + n], pool_v[a : a + n]) for a, n in step.runs[segment]]

    def write(
        self, layer: int, session: SessionCache, start: int, k: torch.Tensor, v: torch.Tensor
    ) -> None:
        """Store keys and values of positions `start .. start + tokens` for one layer.

        Args:
            k, v: `(tokens, kv_heads, head_dim)`.
        Raises:
            ContextOverflow: the positions pass the session's `max_length` or its pages.
        """
        end = start + k.shape[0]
        if end > session.max_length:
            raise ContextOverflow(
                f"positions up to {end} do not fit the session's {session.max_length} tokens"
            )
        pool_k, pool_v = self._k_slots[layer], self._v_slots[layer]
        for slot, lo, hi in self._segments(session, start, end):
            pool_k[slot : slot + hi - lo] = k[lo - start : hi - start]
            pool_v[slot : slot + hi - lo] = v[lo - start : hi - start]

    def views(
        self, layer: int, session: SessionCache, end: int
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Keys and values of positions `0 .. end` of one layer as views of the pool, one
        `(tokens, kv_heads, head_dim)` pair a run, in order: no copy."""
        pool_k, pool_v = self._k_slots[layer], self._v_slots[layer]
        return [
            (pool_k[slot : slot + hi - lo], pool_v[slot : slot + hi - lo])
            for slot, lo, hi in self._segments(session, 0, end)
        ]

    def read(
        self, layer: int, session: SessionCache, end: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of positions `0 .. end` of one layer, `(end, kv_heads, head_dim)`:
        a view for a one-run session, else a copy."""
        runs = self.views(layer, session, end)
        if len(runs) == 1:
            return runs[0]
        return torch.cat([k for k, _ in runs]), torch.cat([v for _, v in runs])

    def block_tables(self, sessions: list[SessionCache]) -> torch.Tensor:
        """`(sessions, max_pages)` int32 block tables, padded with page 0, for batched decode."""
        width = max(len(s.pages) for s in sessions)
        table = torch.zeros((len(sessions), width), dtype=torch.int32)  # built here, copied once
        for i, s in enumerate(sessions):
            table[i, : len(s.pages)] = torch.tensor(s.pages, dtype=torch.int32)
        return table.to(self.k.device)
