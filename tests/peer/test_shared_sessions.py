"""Sessions that share KV pages on a peer: a kept prefix taken by a new session, and forks.

Each must answer exactly as a session that computed everything itself."""

from __future__ import annotations

import pytest
import torch

from layerswarm.errors import RemoteError
from layerswarm.shards.config import Span
from layerswarm.swarm.protocol import ErrorCode
from tests.peer.test_sessions import serve, steps, table_of

HASHES = tuple(bytes([i]) * 16 for i in range(8))


def test_a_second_session_with_the_same_prefix_takes_its_pages_and_answers_the_same() -> None:
    table = table_of(16)
    prompt = steps(40, seed=3)

    async def body() -> None:
        first = await table.open("conn", "client", "a", Span(0, 2), 64, prefix=HASHES[:2])
        assert first.cache.length == 0  # nothing kept yet
        whole = await table.step(first, prompt, 0, 10.0)
        assert table.cache.pages_cached == 2  # its two full pages of the chain, kept
        await table.step(first, steps(1, seed=9), 40, 10.0)
        table.close("conn", "a")
        computed = table.computed_tokens

        again = await table.open("conn", "client", "b", Span(0, 2), 64, prefix=HASHES[:2])
        assert again.cache.length == 32 and table.cached_tokens == 32
        tail = await table.step(again, prompt[:, 32:], 32, 10.0)
        assert table.computed_tokens - computed == 8  # only the part not kept
        torch.testing.assert_close(tail, whole[:, 32:], rtol=0, atol=1e-6)

        # Another client, other layers or another chain take nothing.
        other = await table.open("conn", "stranger", "c", Span(0, 2), 64, prefix=HASHES[:2])
        part = await table.open("conn", "client", "d", Span(0, 1), 64, prefix=HASHES[:2])
        changed = await table.open(
            "conn", "client", "e", Span(0, 2), 64, prefix=(HASHES[5], HASHES[1])
        )
        assert [s.cache.length for s in (other, part, changed)] == [0, 0, 0]
        assert table.load()["cached_tokens"] == 32

    serve(table, body)


def test_kept_pages_give_way_to_sessions_that_need_the_room() -> None:
    table = table_of(4)

    async def body() -> None:
        first = await table.open("conn", "client", "a", Span(0, 2), 64, prefix=HASHES[:4])
        await table.step(first, steps(64), 0, 10.0)
        table.close("conn", "a")
        assert table.cache.pages_cached == 4 and table.tokens_free == 64  # kept, yet free
        other = await table.open("conn", "someone", "b", Span(0, 2), 64)
        await table.step(other, steps(64, seed=1), 0, 10.0)  # takes every page
        assert table.cache.pages_cached == 0

    serve(table, body)


def test_a_fork_holds_its_parents_context_and_diverges_on_its_own_pages() -> None:
    table = table_of(16)
    prompt, a, b = steps(21, seed=1), steps(1, seed=2), steps(1, seed=3)

    async def body() -> None:
        parent = await table.open("conn", "client", "p", Span(0, 2), 64)
        await table.step(parent, prompt, 0, 10.0)
        child = await table.open("conn", "client", "c", Span(0, 2), 64, fork_of="p")
        assert child.cache.length == 21 and table.forks == 1
        computed = table.computed_tokens
        from_parent = await table.step(parent, a, 21, 10.0)
        from_child = await table.step(child, b, 21, 10.0)
        assert table.computed_tokens - computed == 2  # no second prefill

        alone = await table.open("conn", "client", "alone", Span(0, 2), 64)
        await table.step(alone, prompt, 0, 10.0)
        expected = await table.step(alone, b, 21, 10.0)
        torch.testing.assert_close(from_child, expected, rtol=0, atol=1e-6)
        again = await table.step(alone, a, 21, 10.0)  # rolls back one, as the parent's own
        torch.testing.assert_close(from_parent, again, rtol=0, atol=1e-6)

        with pytest.raises(RemoteError) as e:
            await table.open("conn", "client", "x", Span(0, 2), 64, fork_of="nope")
        assert e.value.code == ErrorCode.UNKNOWN_SESSION
        with pytest.raises(RemoteError) as e:
            await table.open("conn", "client", "y", Span(0, 1), 64, fork_of="p")
        assert e.value.code == ErrorCode.BAD_SPAN
        with pytest.raises(RemoteError) as e:
            await table.open("other-conn", "client", "z", Span(0, 2), 64, fork_of="p")
        assert e.value.code == ErrorCode.UNKNOWN_SESSION  # a connection forks only its own
        for sid in ("p", "c", "alone"):
            table.close("conn", sid)
        assert table.cache.pages_free == table.cache.num_pages

    serve(table, body)
