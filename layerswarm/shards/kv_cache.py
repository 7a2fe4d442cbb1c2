"""A paged KV cache that holds many sessions of one span and lets their decode steps batch.

Why paged and not one slot per session: sessions ask for very different `max_length`s, and a
peer's memory budget should hold as many of them as fit, not `budget / longest` slots. A pool of
fixed-size pages (vLLM's PagedAttention layout) gives each session just the pages it reserved,
and a decode kernel reads any mix of sessions in one launch through their block tables.

A session reserves all the pages its `max_length` needs when it opens, so admission control
happens once (a `CacheFull` error then, never an out-of-memory crash mid-reply). The allocator
prefers one contiguous run of pages: then a session's keys are a plain view of the pool and
single-session attention needs no gather (the common case on a CPU peer).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from layerswarm.errors import CacheFull, ContextOverflow

DEFAULT_PAGE_SIZE = 16  # unit: tokens per page; small pages waste little of a reservation


@dataclass
class SessionCache:
    """One session's share of the pool: its pages and how many tokens it holds."""

    pages: list[int]
    block_table: torch.Tensor  # (num_pages,) int32, the pages in order
    max_length: int  # unit: tokens this session may hold
    length: int = 0  # unit: tokens written so far
    contiguous: bool = False  # pages are one run, so keys are a view of the pool


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
        self._free = [True] * num_pages

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
        return sum(self._free) * self.page_size

    def allocate(self, max_length: int) -> SessionCache:
        """Reserve pages for a session of up to `max_length` tokens.

        Raises:
            CacheFull: fewer free pages than the session needs.
        """
        if max_length <= 0:
            raise ValueError(f"max_length must be positive, got {max_length}")
        need = -(-max_length // self.page_size)
        pages = self._contiguous_run(need)
        contiguous = pages is not None
        if pages is None:
            pages = [i for i, free in enumerate(self._free) if free][:need]
        if len(pages) < need:
            raise CacheFull(
                f"cache full: a session of {max_length} tokens needs {need} pages, "
                f"{len(pages)} of {self.num_pages} are free"
            )
        for p in pages:
            self._free[p] = False
        table = torch.tensor(pages, dtype=torch.int32, device=self.k.device)
        return SessionCache(pages, table, max_length, contiguous=contiguous)

    def free(self, session: SessionCache) -> None:
        for p in session.pages:
            self._free[p] = True
        session.pages = []

    def _contiguous_run(self, need: int) -> list[int] | None:
        run = 0
        for i, free in enumerate(self._free):
            run = run + 1 if free else 0
            if run == need:
                return list(range(i - need + 1, i + 1))
        return None

    def write(
        self, layer: int, session: SessionCache, start: int, k: torch.Tensor, v: torch.Tensor
    ) -> None:
        """Store keys and values of positions `start .. start + tokens` for one layer.

        Args:
            k, v: `(tokens, kv_heads, head_dim)`.
        """
        end = start + k.shape[0]
        if end > session.max_length:
            raise ContextOverflow(
                f"positions up to {end} do not fit the session's {session.max_length} tokens"
            )
        if session.contiguous:
            base = session.pages[0] * self.page_size
            self.k[layer].view(-1, *k.shape[1:])[base + start : base + end] = k
            self.v[layer].view(-1, *v.shape[1:])[base + start : base + end] = v
            return
        slots = self._slots(session, start, end)
        self.k[layer].view(-1, *k.shape[1:])[slots] = k
        self.v[layer].view(-1, *v.shape[1:])[slots] = v

    def read(
        self, layer: int, session: SessionCache, end: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of positions `0 .. end` of one layer, `(end, kv_heads, head_dim)`."""
        if session.contiguous:
            base = session.pages[0] * self.page_size
            k = self.k[layer].flatten(0, 1)[base : base + end]
            v = self.v[layer].flatten(0, 1)[base : base + end]
            return k, v
        n = -(-end // self.page_size)
        pages = session.block_table[:n]
        return self.k[layer][pages].flatten(0, 1)[:end], self.v[layer][pages].flatten(0, 1)[:end]

    def _slots(self, session: SessionCache, start: int, end: int) -> torch.Tensor:
        pos = torch.arange(start, end, device=self.k.device)
        return (
            session.block_table[pos // self.page_size].long() * self.page_size
            + pos % self.page_size
        )

    def block_tables(self, sessions: list[SessionCache]) -> torch.Tensor:
        """`(sessions, max_pages)` int32 block tables, padded with page 0, for batched decode."""
        width = max(len(s.pages) for s in sessions)
        table = torch.zeros((len(sessions), width), dtype=torch.int32, device=self.k.device)
        for i, s in enumerate(sessions):
            table[i, : len(s.pages)] = s.block_table
        return table
