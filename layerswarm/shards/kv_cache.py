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

Pages are reference-counted, so sessions can share them:
- a fork (`fork`, for `n` choices of one prompt) shares every page of its parent;
- a new session may take pages that a prefix index keeps (`prefix_cache.PrefixIndex`:
  `keep`, `cached_pages`, `attach`), a finished session's or a live one's.
Only full pages are shared for writing's sake: a session writes at its end, so the page it
writes into is its own. Where a session's end falls inside a shared page (a fork of a session
mid-page, a rollback into shared pages), that page is copied first (copy on write). Pages that
only the index holds count as free: they are evicted, least recently used first, when a session
needs room, so the cache never refuses a session that would fit without it.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch

from layerswarm.errors import CacheFull, ContextOverflow
from layerswarm.shards.prefix_cache import PrefixIndex

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
        self._free = [True] * num_pages  # held by nobody (`_refs` 0): the allocator's map
        self._n_free = num_pages
        self._refs = [0] * num_pages  # sessions holding each page, and the index (one)
        self.prefixes = PrefixIndex()  # pages kept for reuse (see the module)
        self._n_evictable = 0  # pages that only the index holds
        self.copied_pages = 0  # pages copied on write (a fork's or a rollback's shared page)

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
        return self.pages_free * self.page_size

    @property
    def pages_free(self) -> int:
        """Pages a session may take now: free ones, and those only the prefix index holds."""
        return self._n_free + self._n_evictable

    @property
    def pages_cached(self) -> int:
        """Pages the prefix index keeps (some of which sessions hold too)."""
        return len(self.prefixes)

    def _ref(self, page: int) -> None:
        if self._refs[page] == 0:
            self._free[page] = False
            self._n_free -= 1
        elif self._refs[page] == 1 and page in self.prefixes:
            self._n_evictable -= 1
        self._refs[page] += 1

    def _unref(self, page: int) -> None:
        self._refs[page] -= 1
        if self._refs[page] == 0:
            self._free[page] = True
            self._n_free += 1
        elif self._refs[page] == 1 and page in self.prefixes:
            self._n_evictable += 1

    def _room(self, pages: int) -> None:
        """Make `pages` pages free, evicting pages only the index holds, oldest first.

        Raises:
            CacheFull: fewer pages than that are free or evictable.
        """
        if self._n_free >= pages:  # the common case, on every page a session grows by
            return
        if pages > self.pages_free:
            raise CacheFull(
                f"cache full: {pages} more pages needed, "
                f"{self.pages_free} of {self.num_pages} are free"
            )
        for page in self.prefixes.oldest():
            if self._n_free >= pages:
                return
            if self._refs[page] == 1:
                self.prefixes.remove(page)
                self._n_evictable -= 1
                self._unref(page)

    def _new_page(self, after: int) -> int:
        """Take a free page: the one after page `after` when it is free, else a new run's."""
        if after >= 0 and after + 1 < self.num_pages and self._free[after + 1]:
            page = after + 1
        else:
            page = self._place()
        self._ref(page)
        return page

    def _set_pages(self, session: SessionCache, pages: list[int]) -> None:
        session.pages = pages
        runs: list[tuple[int, int]] = []
        for p in pages:
            if runs and runs[-1][0] + runs[-1][1] == p:
                runs[-1] = (runs[-1][0], runs[-1][1] + 1)
            else:
                runs.append((p, 1))
        session.runs = runs
        session.block_table = torch.tensor(pages, dtype=torch.int32, device=self.k.device)

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
        try:
            self._room(need)
        except CacheFull as e:
            raise CacheFull(f"cache full: {length} tokens need {need} more pages ({e})") from None
        pages = list(session.pages)
        for _ in range(need):
            pages.append(self._new_page(pages[-1] if pages else -1))
        self._set_pages(session, pages)

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
            CacheFull: the session now ends inside a page others share, and no page is free
                for its copy: it then keeps only its whole pages before `length`.
        """
        if length < 0:
            raise ValueError(f"cannot truncate to a negative length ({length})")
        dropped = max(0, session.length - length)
        session.length -= dropped
        keep = self.pages_for(length)
        if keep < len(session.pages):
            for p in session.pages[keep:]:
                self._unref(p)
            self._set_pages(session, session.pages[:keep])
        self._own_tail(session)
        return dropped

    def _own_tail(self, session: SessionCache) -> None:
        """Copy the page the session writes into next when others hold it too (copy on write:
        a fork's or a rollback's page that its end falls inside).

        Raises:
            CacheFull: no page is free for the copy.
        """
        if session.length % self.page_size == 0 or not session.pages:
            return
        at = session.length // self.page_size
        old = session.pages[at]
        if self._refs[old] == 1:
            return
        try:
            self._room(1)
        except CacheFull:  # never write into a shared page: drop the session's part of it
            self._unref(old)
            self._set_pages(session, session.pages[:at])
            session.length = at * self.page_size
            raise
        new = self._new_page(session.pages[at - 1] if at else -1)
        self.k[:, new] = self.k[:, old]
        self.v[:, new] = self.v[:, old]
        self._unref(old)
        self.copied_pages += 1
        self._set_pages(session, [*session.pages[:at], new, *session.pages[at + 1 :]])

    def free(self, session: SessionCache) -> None:
        for p in session.pages:
            self._unref(p)
        session.pages = []
        session.runs = []
        session.block_table = session.block_table[:0]

    def fork(self, parent: SessionCache, max_length: int | None = None) -> SessionCache:
        """A new session that holds what `parent` holds, sharing its pages (copy on write).

        Raises:
            ContextOverflow: the parent holds more than `max_length`.
            CacheFull: the parent's last page is partly filled and no page is free to copy it.
        """
        child = self.open_session(max_length or parent.max_length)
        if parent.length > child.max_length:
            raise ContextOverflow(
                f"the session holds {parent.length} tokens, more than the fork's "
                f"max_length {child.max_length}"
            )
        shared = parent.pages[: self.pages_for(parent.length)]
        for p in shared:
            self._ref(p)
        self._set_pages(child, list(shared))
        child.length = parent.length
        try:
            self._own_tail(child)
        except CacheFull:
            self.free(child)
            raise
        return child

    def keep(self, session: SessionCache, index: int, key: Hashable) -> bool:
        """Keep the session's full page `index` in the prefix index under `key`; False when the
        key (or the page) is kept already."""
        if (index + 1) * self.page_size > session.length:
            raise ValueError(f"page {index} of the session is not full")
        page = session.pages[index]
        self._ref(page)  # before it is kept: a page the index holds alone counts as evictable
        if not self.prefixes.add(key, page):
            self._unref(page)
            return False
        return True

    def cached_pages(self, keys: Sequence[Hashable]) -> list[int]:
        """The pages kept under the longest run of `keys` from the first."""
        pages = []
        for key in keys:
            page = self.prefixes.get(key)
            if page is None:
                break
            pages.append(page)
        return pages

    def attach(self, session: SessionCache, pages: Sequence[int]) -> None:
        """Give an empty session these full pages (from `cached_pages`) as its first ones."""
        if session.pages or session.length:
            raise ValueError("only a session that holds nothing yet takes cached pages")
        pages = list(pages)[: session.max_length // self.page_size]
        for p in pages:
            self._ref(p)
        self._set_pages(session, pages)
        session.length = len(pages) * self.page_size

    def drop_prefixes(self) -> None:
        """Forget every kept page (those no session holds go back to the pool)."""
        for page in self.prefixes.oldest():
            self.prefixes.remove(page)
            if self._refs[page] == 1:
                self._n_evictable -= 1
            self._unref(page)

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
