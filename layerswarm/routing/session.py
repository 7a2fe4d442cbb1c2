"""One inference session across the hops of a route: a `Pipeline` whose layers run on peers.

The session sits on the layers below it, each using only those under it:
- `failures`: what an error means (the peer failed, is full, is leaving, or this client erred);
- `peer_book`: bans, trust, measured speed (the one place a ban is made);
- `hop_calls`: open, step and close one hop, with measured deadlines;
- `route`: the hops, the inputs kept for failover, a step's one retry budget, the waits;
- the step strategies: `push` (each hop hands its output to the next) and `relay` (the client
  sends each hop's output on, every hop's part run by `verify.Verifier`, which checks a share
  of them on replicas).

A step goes by push when the route has more than one hop and no hop of it is to be checked;
otherwise by relay. Either way, a hop that fails is replaced and the step carries on, so a
greedy reply is the same as without the failure.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Protocol

import torch

from layerswarm.errors import LayerswarmError
from layerswarm.routing.hops import ActiveHop
from layerswarm.routing.loop import BackgroundLoop
from layerswarm.routing.pipeline import Prefix
from layerswarm.routing.prefix import prefix_hashes
from layerswarm.routing.push import PushStrategy, wire_dtype
from layerswarm.routing.relay import RelayStrategy
from layerswarm.routing.route import Route
from layerswarm.routing.verify import CheckedSwarm, Verifier
from layerswarm.shards.config import ModelConfig, Span

log = logging.getLogger(__name__)


class SessionSwarm(CheckedSwarm, Protocol):
    """What a session needs of the swarm client beyond what routes and checks do."""

    model_config: ModelConfig
    net: BackgroundLoop  # the loop the network runs on
    last_refresh: float  # unit: monotonic s of the last time the swarm was read


class RemoteSession:
    """A `Pipeline` whose layers run on peers; survives peers that fail, leave or fill up.

    `swarm` is the swarm client (`swarm_client.SwarmClient`): the live peers, the peer book,
    the hop calls, and how to re-read the swarm.
    """

    def __init__(self, swarm: SessionSwarm, max_length: int, route: Route | None = None) -> None:
        self.swarm = swarm
        self.config = swarm.config
        self.max_length = max_length
        self.route_state = route or Route(swarm, max_length)
        self.verifier = Verifier(self.route_state, swarm)  # checks some steps on replicas
        self.relay = RelayStrategy(self.route_state, self.verifier.step)
        self.push = PushStrategy(self.route_state)
        self.length = 0  # unit: tokens the hops hold (sent so far, less what was rolled back)
        self.rolled_back = 0  # unit: tokens every hop was asked to drop, all steps together
        self.truncations = 0  # steps that asked every hop to roll back
        self.cached = 0  # unit: tokens of the prompt the peers held at open (`Prefix`)

    @property
    def hops(self) -> list[ActiveHop]:
        return self.route_state.hops

    @property
    def history(self) -> dict[int, list[tuple[int, torch.Tensor]]]:
        return self.route_state.history

    @property
    def reroute_seconds(self) -> list[float]:
        return self.route_state.reroute_seconds

    @property
    def route(self) -> list[tuple[str, Span]]:
        return [(h.view.address, h.span) for h in self.route_state.hops]

    async def open(self, prefix: Prefix | None = None) -> None:
        """Open the session on a path through every layer; with the prompt (`prefix`) and
        `ClientConfig.prefix_cache`, on the KV pages the peers keep for its first tokens:
        `cached` says how many, and the first step starts there."""
        if time.monotonic() - self.swarm.last_refresh > self.config.refresh_interval:
            # Peers that joined since are used by new sessions; loads are fresh for spreading.
            try:
                await self.swarm.refresh()
            except LayerswarmError as e:  # none answers now: the route waits for some
                log.debug("refresh before a session: %s", e)
        use = prefix is not None and self.config.prefix_cache
        hashes = prefix_hashes(prefix.tokens) if use and prefix is not None else ()
        span = Span(0, self.swarm.model_config.num_layers)
        cached = await self.route_state.open(span, hashes)
        if cached and prefix is not None:
            # The skipped positions' inputs, kept as if sent: failover replays them.
            hops = self.route_state.hops
            hidden = prefix.embed(prefix.tokens[:cached])
            self.route_state.keep(0, 0, hidden.to(wire_dtype(self.config.wire_dtype, hops)))
            self.length = self.cached = cached

    async def afork(self) -> RemoteSession:
        """A new session that holds what this one holds: the peers fork their sessions,
        sharing the KV pages (`n` choices of one prompt, one prefill). Call it between steps."""
        child = RemoteSession(self.swarm, self.max_length, await self.route_state.fork())
        child.length = self.length
        return child

    def forward(self, hidden: torch.Tensor, start: int) -> torch.Tensor:
        """`aforward` for synchronous callers."""
        return self.swarm.net.run(self.aforward(hidden, start))

    async def aforward(self, hidden: torch.Tensor, start: int) -> torch.Tensor:
        """Run `hidden (1, T, hidden)` at positions `start ..` through every hop.

        A step that starts before the session's end first rolls every hop back to `start`
        (`Step.truncate_to`: a speculative step's rejected drafts), and the inputs kept for
        failover are cut there too: a replay rebuilds only the accepted positions.
        """
        if not 0 <= start <= self.length:
            raise ValueError(f"start {start} is outside the session's {self.length} tokens")
        truncate = start if start < self.length else None
        if truncate is not None:
            self.rolled_back += self.length - start
            self.truncations += 1
            self.route_state.truncate(start)
        self.length = start + hidden.shape[1]
        hops = self.route_state.hops
        wanted, hidden = hidden.dtype, hidden.to(wire_dtype(self.config.wire_dtype, hops))
        pushed = self.config.push and len(hops) > 1
        if pushed and not self.verifier.plan(hops):  # a step to check goes hop by hop instead
            return (await self.push.forward(hidden, start, truncate)).to(wanted)
        if not pushed:
            self.verifier.planned = None
        return (await self.relay.forward(hidden, start, truncate)).to(wanted)

    def close(self) -> None:
        """`aclose` for synchronous callers."""
        try:
            self.swarm.net.run(self.aclose(), timeout=self.config.request_timeout + 1)
        except (LayerswarmError, TimeoutError) as e:
            log.debug("closing a session: %s", e)

    async def aclose(self) -> None:
        await asyncio.gather(self.route_state.close(), self.verifier.aclose())
