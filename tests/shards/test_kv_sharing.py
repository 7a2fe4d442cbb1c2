"""Shared KV pages: forks, the prefix index, copy on write, and eviction under pressure."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from layerswarm.errors import CacheFull
from layerswarm.shards.kv_cache import PagedKVCache, SessionCache


def small_cache(pages: int = 16) -> PagedKVCache:
    return PagedKVCache(2, 1, 2, num_pages=pages, page_size=4)


def write(cache: PagedKVCache, s: SessionCache, start: int, values: list[float]) -> None:
    """Write `values` as both keys and values of every layer at positions `start ..`."""
    cache.truncate(s, start)
    cache.grow(s, start + len(values))
    kv = torch.tensor(values).reshape(-1, 1, 1).expand(-1, 1, 2).contiguous()
    for layer in range(2):
        cache.write(layer, s, start, kv, kv)
    s.length = start + len(values)


def held(cache: PagedKVCache, s: SessionCache) -> list[float]:
    k, _ = cache.read(1, s, s.length)
    return k[:, 0, 0].tolist()


def test_a_fork_shares_full_pages_and_copies_the_partial_one() -> None:
    cache = small_cache(8)
    parent = cache.open_session(32)
    write(cache, parent, 0, [1, 2, 3, 4, 5, 6])  # pages: one full, one with 2 of 4
    child = cache.fork(parent)
    assert child.length == 6 and child.pages[0] == parent.pages[0]
    assert child.pages[1] != parent.pages[1] and cache.copied_pages == 1
    assert cache.pages_free == 8 - 3
    write(cache, child, 6, [70, 80])
    write(cache, parent, 6, [7, 8])
    assert held(cache, parent) == [1, 2, 3, 4, 5, 6, 7, 8]
    assert held(cache, child) == [1, 2, 3, 4, 5, 6, 70, 80]
    cache.free(parent)
    assert held(cache, child) == [1, 2, 3, 4, 5, 6, 70, 80]  # the shared page lives on
    cache.free(child)
    assert cache.pages_free == 8


def test_a_rollback_into_a_shared_page_copies_it_first() -> None:
    cache = small_cache(8)
    parent = cache.open_session(32)
    write(cache, parent, 0, [1, 2, 3, 4, 5, 6, 7, 8])
    child = cache.fork(parent)  # both pages shared, none copied
    assert child.pages == parent.pages and cache.copied_pages == 0
    write(cache, child, 2, [30, 40])  # rewrites inside the first, shared page
    assert cache.copied_pages == 1
    assert held(cache, parent) == [1, 2, 3, 4, 5, 6, 7, 8]
    assert held(cache, child) == [1, 2, 30, 40]


def test_kept_pages_are_taken_by_a_new_session_and_outlive_their_own() -> None:
    cache = small_cache(8)
    first = cache.open_session(32)
    write(cache, first, 0, [1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert cache.keep(first, 0, "a") and cache.keep(first, 1, "b")
    assert not cache.keep(first, 1, "c")  # a page is kept once
    with pytest.raises(ValueError, match="not full"):
        cache.keep(first, 2, "d")
    cache.free(first)
    assert cache.pages_cached == 2 and cache.pages_free == 8  # kept, yet evictable
    second = cache.open_session(32)
    pages = cache.cached_pages(["a", "b", "x"])
    assert len(pages) == 2 and cache.cached_pages(["b"]) == [pages[1]]
    assert cache.cached_pages(["x", "a"]) == []  # a chain matches from its first key only
    cache.attach(second, pages)
    assert second.length == 8 and held(cache, second) == [1, 2, 3, 4, 5, 6, 7, 8]
    assert cache.pages_free == 6


def test_kept_pages_are_evicted_oldest_first_when_a_session_needs_room() -> None:
    cache = small_cache(4)
    a = cache.open_session(16)
    write(cache, a, 0, [1, 2, 3, 4, 5, 6, 7, 8])
    cache.keep(a, 0, "old")
    cache.keep(a, 1, "new")
    cache.cached_pages(["old"])  # used last: "new" is now the oldest
    cache.free(a)
    b = cache.open_session(16)
    cache.grow(b, 12)  # three pages: one kept page must go
    assert cache.cached_pages(["old"]) != [] and cache.cached_pages(["new"]) == []
    cache.grow(b, 16)
    assert cache.pages_cached == 0
    with pytest.raises(CacheFull):
        cache.grow(cache.open_session(16), 1)


def test_a_page_held_by_a_session_is_never_evicted() -> None:
    cache = small_cache(3)
    a = cache.open_session(16)
    write(cache, a, 0, [1, 2, 3, 4])
    cache.keep(a, 0, "k")
    b = cache.open_session(16)
    cache.grow(b, 8)
    with pytest.raises(CacheFull):
        cache.grow(b, 12)
    assert held(cache, a) == [1, 2, 3, 4] and cache.cached_pages(["k"]) == [a.pages[0]]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 12)), min_size=1, max_size=30))
def test_any_mix_of_forks_rollbacks_keeps_and_frees_leaks_no_page(
    ops: list[tuple[int, int]],
) -> None:
    """Whatever sessions do, each holds what it wrote, and freeing all gives every page back."""
    cache = small_cache(24)
    sessions: list[tuple[SessionCache, list[float]]] = []
    counter = iter(range(10_000))
    for kind, n in ops:
        try:
            if kind == 0 or not sessions:
                s = cache.open_session(64)
                vals = [float(next(counter)) for _ in range(n + 1)]
                write(cache, s, 0, vals)
                sessions.append((s, vals))
            elif kind == 1:
                s, vals = sessions[n % len(sessions)]
                sessions.append((cache.fork(s), list(vals)))
            elif kind == 2:
                s, vals = sessions[n % len(sessions)]
                at = min(n, len(vals))
                new = [float(next(counter)) for _ in range(3)]
                write(cache, s, at, new)
                vals[at:] = new
            elif kind == 3:
                s, vals = sessions[n % len(sessions)]
                if len(vals) >= 4:
                    cache.keep(s, 0, ("k", vals[0], vals[1], vals[2], vals[3]))
            else:
                s, _ = sessions.pop(n % len(sessions))
                cache.free(s)
        except CacheFull:
            pass
        for s, vals in sessions:
            assert held(cache, s) == vals
    for s, _ in sessions:
        cache.free(s)
    cache.drop_prefixes()
    assert cache.pages_free == 24 and cache._n_free == 24


def test_no_room_to_copy_a_shared_page_never_leaves_a_session_writing_into_it() -> None:
    cache = small_cache(3)
    parent = cache.open_session(16)
    write(cache, parent, 0, [1, 2, 3, 4, 5, 6, 7, 8])
    child = cache.fork(parent)  # shares both pages
    filler = cache.open_session(16)
    cache.grow(filler, 4)  # the last free page
    with pytest.raises(CacheFull):
        cache.truncate(child, 6)  # would end inside the shared second page: no page to copy
    assert child.length == 4 and child.pages == parent.pages[:1]
    assert held(cache, parent) == [1, 2, 3, 4, 5, 6, 7, 8]
