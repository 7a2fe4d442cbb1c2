"""A request's turn is given back however its replies end: run out, fail, or closed before
their first piece (a choice that never began), and the forks nobody took are closed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from layerswarm.cli.api_replies import Admitted
from layerswarm.routing.generate import Choices


class Counted:
    def __init__(self) -> None:
        self.left = 0

    def leave(self) -> None:
        self.left += 1


async def pieces(fail: bool = False) -> AsyncIterator[str]:
    yield "a"
    if fail:
        raise RuntimeError("the swarm failed")
    yield "b"


def test_a_reply_closed_before_it_began_gives_its_turn_back() -> None:
    async def go() -> None:
        turn = Counted()
        reply = Admitted(turn, pieces())  # type: ignore[arg-type]
        await reply.aclose()
        await reply.aclose()  # twice: still once
        assert turn.left == 1

    asyncio.run(go())


def test_a_reply_that_runs_out_or_fails_gives_its_turn_back_once() -> None:
    async def go() -> None:
        turn = Counted()
        assert [p async for p in Admitted(turn, pieces())] == ["a", "b"]  # type: ignore[arg-type]
        assert turn.left == 1
        failing = Admitted(turn, pieces(fail=True))  # type: ignore[arg-type]
        with pytest.raises(RuntimeError):
            async for _ in failing:
                pass
        await failing.aclose()
        assert turn.left == 2

    asyncio.run(go())


def test_forks_no_choice_took_are_closed() -> None:
    class Fork:
        closed = False

        async def aclose(self) -> None:
            self.closed = True

    async def go() -> None:
        group = Choices(3)
        forks = [Fork(), Fork()]
        group._forks = list(forks)  # type: ignore[arg-type]  # as the first choice left them
        await group.aclose()
        assert all(f.closed for f in forks) and group._forks == []

    asyncio.run(go())
