"""Sessions that start on a prefix the peers keep, and forks, against fake hops
(`test_route_fake.FakeHop`, taught here to keep prefixes and fork sessions as peers do).

A cached prefix means the client never sent those positions through the later hops: when such
a hop fails, the route must rebuild the whole path from the first boundary, and the reply must
still equal the one computed without any cache."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest
import torch

from layerswarm.routing.pipeline import Prefix
from layerswarm.routing.session import RemoteSession
from layerswarm.shards.config import Span
from layerswarm.swarm.messages import PREFIX_BLOCK_TOKENS
from layerswarm.swarm.protocol import CloseSession, OpenSession, SessionOpened, Step

from .test_route_fake import (
    HIDDEN,
    LAYERS,
    FakeHop,
    FakeSwarm,
    Fault,
    check_invariants,
    config,
    toy_layers,
)

PROMPT = 2 * PREFIX_BLOCK_TOKENS + 8  # two whole blocks can be kept, and the rest is computed
TABLE = torch.randn(64, HIDDEN, generator=torch.Generator().manual_seed(3))


def embed(ids: Sequence[int]) -> torch.Tensor:
    return TABLE[list(ids)].unsqueeze(0)


@dataclass
class CachingHop(FakeHop):
    """A fake hop that keeps each closed session's inputs by prefix chain, as a peer keeps
    its KV pages, and forks sessions (a test double)."""

    chains: dict[str, tuple[bytes, ...]] = field(default_factory=dict)
    kept: dict[tuple[Span, tuple[bytes, ...]], list[torch.Tensor]] = field(default_factory=dict)
    cached_opens: list[int] = field(default_factory=list)  # tokens each open took from the cache
    starts: list[int] = field(default_factory=list)  # where each step started

    async def request(self, msg: object, timeout: float | None = None) -> object:
        if isinstance(msg, OpenSession) and not self.dead and (msg.prefix or msg.fork_of):
            await asyncio.sleep(0)
            self.opens += 1
            span = Span(msg.span_start, msg.span_end)
            self.spans[msg.session_id] = span
            if msg.fork_of is not None:
                self.sessions[msg.session_id] = list(self.sessions[msg.fork_of])
                return SessionOpened(msg.session_id, len(self.sessions[msg.fork_of]))
            chain = msg.prefix or ()
            self.chains[msg.session_id] = chain
            held: list[torch.Tensor] = []
            for n in range(len(chain), 0, -1):
                if (span, chain[:n]) in self.kept:
                    held = list(self.kept[(span, chain[:n])])
                    break
            self.sessions[msg.session_id] = held
            self.cached_opens.append(len(held))
            return SessionOpened(msg.session_id, len(held))
        if isinstance(msg, CloseSession):
            inputs = self.sessions.get(msg.session_id, [])
            chain = self.chains.pop(msg.session_id, ())
            for n in range(1, len(chain) + 1):
                if len(inputs) >= n * PREFIX_BLOCK_TOKENS:
                    key = (self.spans[msg.session_id], chain[:n])
                    self.kept[key] = inputs[: n * PREFIX_BLOCK_TOKENS]
        if isinstance(msg, Step):
            self.starts.append(msg.start_position)
            past = self.sessions.get(msg.session_id)
            if past is not None and msg.truncate_to is None and msg.start_position < len(past):
                del past[msg.start_position :]  # as a peer's scheduler rolls a session back
        return await super().request(msg, timeout)


def caching_swarm(push: bool, tilings: list[list[Span]]) -> FakeSwarm:
    swarm = FakeSwarm(config(push), tilings)
    swarm.hops = {
        peer_id: CachingHop(peer_id, hop.span, swarm, hop.seconds_per_layer)
        for peer_id, hop in swarm.hops.items()
    }
    return swarm


TWO_TILINGS = [[Span(0, 3), Span(3, 6)], [Span(0, 6)]]
DECODE = [torch.randn(1, 1, HIDDEN, generator=torch.Generator().manual_seed(i)) for i in range(5)]


def reference(prompt: torch.Tensor, decode: list[torch.Tensor]) -> list[torch.Tensor]:
    whole, past, outs = Span(0, LAYERS), torch.zeros(1, 0, HIDDEN), []
    for hidden in [prompt, *decode]:
        outs.append(toy_layers(whole, hidden, past))
        past = torch.cat([past, hidden], dim=1)
    return outs


async def reply(swarm: FakeSwarm, tokens: list[int]) -> tuple[list[torch.Tensor], int]:
    """A reply's outputs (the prompt's positions it computed, then each decode step) and how
    many prompt tokens it took from the peers' cache."""
    session = RemoteSession(swarm, 128)  # type: ignore[arg-type]
    try:
        await session.open(Prefix(tokens, embed))
        start = session.cached
        outs = [await session.aforward(embed(tokens[start:]), start)]
        for i, hidden in enumerate(DECODE):
            outs.append(await session.aforward(hidden, len(tokens) + i))
        return outs, start
    finally:
        await session.aclose()


def same(outs: list[torch.Tensor], expected: list[torch.Tensor], cached: int) -> None:
    torch.testing.assert_close(outs[0], expected[0][:, cached:])
    for got, want in zip(outs[1:], expected[1:], strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("push", [True, False], ids=["push", "relay"])
def test_a_second_reply_takes_the_kept_prefix_and_computes_only_the_rest(push: bool) -> None:
    swarm = caching_swarm(push, TWO_TILINGS[:1])
    tokens = list(range(PROMPT))
    expected = reference(embed(tokens), DECODE)
    first, cached = asyncio.run(reply(swarm, tokens))
    assert cached == 0
    same(first, expected, 0)
    second, cached = asyncio.run(reply(swarm, tokens))
    assert cached == 2 * PREFIX_BLOCK_TOKENS
    same(second, expected, cached)
    hops = [swarm.hops["hop-0-3-0"], swarm.hops["hop-3-6-0"]]
    assert all(h.starts[len(DECODE) + 1] == cached for h in hops)  # the prefix was not sent
    other = [*range(PREFIX_BLOCK_TOKENS), *range(40, 40 + PROMPT - PREFIX_BLOCK_TOKENS)]
    _, cached = asyncio.run(reply(swarm, other))  # the same first block only
    assert cached == PREFIX_BLOCK_TOKENS
    check_invariants(swarm, set())


@pytest.mark.parametrize("push", [True, False], ids=["push", "relay"])
@pytest.mark.parametrize("dies", ["hop-0-3-0", "hop-3-6-0"], ids=["first-hop", "later-hop"])
def test_a_hop_that_fails_after_a_cached_prefix_is_rebuilt_and_the_reply_holds(
    push: bool, dies: str
) -> None:
    swarm = caching_swarm(push, TWO_TILINGS)
    tokens = list(range(PROMPT))
    expected = reference(embed(tokens), DECODE)
    asyncio.run(reply(swarm, tokens))  # fills the caches of the fast tiling
    hop = swarm.hops[dies]
    hop.faults = [Fault(hop.steps + 3, "die")]  # mid-reply, after the cached open
    outs, cached = asyncio.run(reply(swarm, tokens))
    assert cached == 2 * PREFIX_BLOCK_TOKENS and hop.dead
    same(outs, expected, cached)
    rebuilt = any("without the cached prefix" in e for e in swarm.events)
    assert rebuilt == (dies == "hop-3-6-0")  # the first hop's inputs are all kept
    check_invariants(swarm, {dies})


@pytest.mark.parametrize("push", [True, False], ids=["push", "relay"])
def test_forks_continue_apart_from_their_parents_context(push: bool) -> None:
    swarm = caching_swarm(push, TWO_TILINGS[:1])
    tokens = list(range(PROMPT))
    prompt = embed(tokens)

    async def run() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        parent = RemoteSession(swarm, 128)  # type: ignore[arg-type]
        await parent.open()
        await parent.aforward(prompt, 0)
        child = await parent.afork()
        a = [await parent.aforward(h, PROMPT + i) for i, h in enumerate(DECODE)]
        b = [await child.aforward(-h, PROMPT + i) for i, h in enumerate(DECODE)]
        await asyncio.gather(parent.aclose(), child.aclose())
        return a, b

    opens = sum(h.opens for h in swarm.hops.values())
    a, b = asyncio.run(run())
    for got, want in zip(a, reference(prompt, DECODE)[1:], strict=True):
        torch.testing.assert_close(got, want)
    for got, want in zip(b, reference(prompt, [-h for h in DECODE])[1:], strict=True):
        torch.testing.assert_close(got, want)
    assert sum(h.opens for h in swarm.hops.values()) - opens == 4  # 2 hops, opened and forked
    assert all(h.starts.count(0) == 1 for h in swarm.hops.values() if h.starts)  # one prefill
    check_invariants(swarm, set())


def test_checks_of_a_hop_after_a_cached_prefix_happen_and_match() -> None:
    """The checked hop's boundary lacks the cached positions: they are computed again, once,
    so that its replica can be fed the whole context."""
    swarm = caching_swarm(True, TWO_TILINGS)
    tokens = list(range(PROMPT))
    expected = reference(embed(tokens), DECODE)
    asyncio.run(reply(swarm, tokens))
    swarm.config = swarm.calls.config = dataclasses.replace(swarm.config, verify_fraction=1.0)
    outs, cached = asyncio.run(reply(swarm, tokens))
    assert cached == 2 * PREFIX_BLOCK_TOKENS
    same(outs, expected, cached)
    assert swarm.verify_counts["error"] == 0 and swarm.verify_counts["mismatch"] == 0
    assert swarm.verify_counts["match"] >= len(DECODE)
    first = swarm.hops["hop-0-3-0"]
    assert first.starts[-len(DECODE) - 2 :].count(0) == 1  # computed again once, at the start
    check_invariants(swarm, set())
