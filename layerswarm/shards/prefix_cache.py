"""Which KV pages a peer keeps for reuse: an LRU map from a prefix's key to the page holding it.

A key names one page-sized block of tokens *and everything before it* (a hash chain the client
computes, `routing/prefix.py`), within a scope (the client and the layers the page's keys and
values belong to). Two sessions whose first blocks hash alike hold the same keys and values
there, so a new session may take those pages instead of computing them again, as vLLM's
automatic prefix caching does.

This map only remembers pages; the pool (`kv_cache.PagedKVCache`) counts who holds each page and
evicts from here, oldest first, the pages that nobody but this map holds when it needs room.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterator


class PrefixIndex:
    """`key -> page` in least-recently-used order, and `page -> key` back."""

    def __init__(self) -> None:
        self._pages: OrderedDict[Hashable, int] = OrderedDict()
        self._keys: dict[int, Hashable] = {}

    def __len__(self) -> int:
        return len(self._pages)

    def __contains__(self, page: int) -> bool:
        return page in self._keys

    def get(self, key: Hashable) -> int | None:
        """The page kept under `key`, now the most recently used; None when there is none."""
        page = self._pages.get(key)
        if page is not None:
            self._pages.move_to_end(key)
        return page

    def add(self, key: Hashable, page: int) -> bool:
        """Keep `page` under `key`; False (and nothing kept) when either is kept already."""
        if key in self._pages or page in self._keys:
            return False
        self._pages[key] = page
        self._keys[page] = key
        return True

    def remove(self, page: int) -> None:
        del self._pages[self._keys.pop(page)]

    def oldest(self) -> Iterator[int]:
        """The pages kept, least recently used first (a snapshot: safe to remove while going)."""
        return iter(list(self._pages.values()))

    def clear(self) -> None:
        self._pages.clear()
        self._keys.clear()
