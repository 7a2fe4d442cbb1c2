"""The paged KV cache: pages on demand, in runs, and attention over runs without a gather."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from layerswarm.errors import CacheFull, ContextOverflow
from layerswarm.kernels.reference import prefill_attention, runs_attention
from layerswarm.shards.kv_cache import PagedKVCache


def small_cache(pages: int = 16) -> PagedKVCache:
    return PagedKVCache(1, 2, 8, num_pages=pages, page_size=4)


def test_opening_a_session_takes_no_pages_and_growth_takes_them_as_needed() -> None:
    cache = small_cache(8)
    s = cache.open_session(32)
    assert s.pages == [] and cache.pages_free == 8
    cache.grow(s, 5)
    assert len(s.pages) == 2 and cache.pages_free == 6
    cache.grow(s, 8)  # already fits
    assert len(s.pages) == 2
    cache.grow(s, 16)
    assert s.pages == [0, 1, 2, 3] and s.contiguous  # grew in place
    with pytest.raises(ContextOverflow):
        cache.grow(s, 33)
    cache.free(s)
    assert cache.pages_free == 8 and s.pages == []


def test_growth_past_the_free_pages_is_cache_full_and_keeps_what_it_had() -> None:
    cache = small_cache(4)
    a, b = cache.open_session(64), cache.open_session(64)
    cache.grow(a, 12)
    with pytest.raises(CacheFull, match="cache full"):
        cache.grow(b, 8)
    assert b.pages == [] and cache.pages_free == 1
    cache.grow(b, 4)
    assert len(b.pages) == 1


def test_a_new_session_starts_where_the_one_before_can_still_grow() -> None:
    cache = small_cache(16)
    a, b = cache.open_session(64), cache.open_session(64)
    cache.grow(a, 4)
    cache.grow(b, 4)
    assert a.pages == [0] and b.pages[0] > 4  # the middle of the gap after a
    cache.grow(a, 16)
    cache.grow(b, 16)
    assert a.contiguous and b.contiguous


def test_a_session_blocked_by_another_continues_in_a_new_run() -> None:
    cache = small_cache(4)
    a, b = cache.open_session(64), cache.open_session(64)
    cache.grow(a, 4)
    cache.grow(b, 4)  # page 2: the middle of pages 1..3
    cache.grow(a, 8)  # page 1
    cache.grow(a, 12)  # page 2 is b's: a new run
    assert a.pages == [0, 1, 3] and a.runs == [(0, 2), (3, 1)] and not a.contiguous


def test_writes_and_views_across_runs_round_trip() -> None:
    cache = small_cache(4)
    a, b = cache.open_session(16), cache.open_session(16)
    cache.grow(a, 4)
    cache.grow(b, 4)
    cache.grow(a, 12)
    k = torch.randn(11, 2, 8)
    cache.write(0, a, 0, k[:3], k[:3])
    cache.write(0, a, 3, k[3:], k[3:])  # crosses from one run into the next
    views = cache.views(0, a, 11)
    assert [v[0].shape[0] for v in views] == [8, 3]
    assert all(v[0]._base is not None for v in views)  # views of the pool, not copies
    assert torch.equal(torch.cat([v[0] for v in views]), k)
    assert torch.equal(cache.read(0, a, 11)[0], k)


@pytest.mark.parametrize(("tokens", "start"), [(1, 0), (1, 20), (5, 0), (6, 17)])
def test_attention_over_runs_equals_attention_over_the_gathered_context(
    tokens: int, start: int
) -> None:
    gen = torch.Generator().manual_seed(tokens + start)
    context = start + tokens
    q = torch.randn(tokens, 6, 8, generator=gen)
    k = torch.randn(context, 2, 8, generator=gen)
    v = torch.randn(context, 2, 8, generator=gen)
    cuts = [0, context // 3, context // 3 + 1, context]
    runs = [(k[a:b], v[a:b]) for a, b in itertools.pairwise(cuts) if b > a]
    keys = torch.arange(context)
    mask = keys[None, :] <= keys[start:, None]  # (tokens, context)
    want = F.scaled_dot_product_attention(
        q.transpose(0, 1),
        k.transpose(0, 1),
        v.transpose(0, 1),
        attn_mask=mask,
        scale=0.35,
        enable_gqa=True,
    ).transpose(0, 1)
    for got in (runs_attention(q, runs, start, 0.35), prefill_attention(q, k, v, start, 0.35)):
        assert (got - want).abs().max() < 1e-5


def test_truncating_forgets_positions_and_gives_back_the_pages_that_held_only_them() -> None:
    cache = small_cache(4)  # pages of 4 tokens
    s, blocker = cache.open_session(32), cache.open_session(32)
    cache.grow(s, 4)
    cache.grow(blocker, 4)  # page 2
    cache.grow(s, 12)  # page 1, then page 2 is the blocker's: a second run on page 3
    s.length = 12
    assert s.runs == [(0, 2), (3, 1)]
    assert cache.truncate(s, 7) == 5
    assert s.length == 7 and s.pages == [0, 1] and cache.pages_free == 1
    assert s.runs == [(0, 2)] and s.block_table.tolist() == s.pages
    assert cache.truncate(s, 12) == 0 and s.length == 7  # nothing past the end to drop
    assert cache.truncate(s, 4) == 3 and s.pages == [0] and cache.pages_free == 2
    cache.grow(s, 12)  # grows again
    assert s.pages == [0, 1, 3]
    with pytest.raises(ValueError, match="negative"):
        cache.truncate(s, -1)
