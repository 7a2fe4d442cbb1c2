"""Relay: the client sends a step to each hop in turn, and each hop's output to the next.

2N link crossings a token through N hops (push needs N+1), but every hop's output passes
through the client: the step strategy of one-hop routes, of `ClientConfig(push=False)`, and of
the steps that verification checks (`verify.Verifier.step` runs each hop's part).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import torch

from layerswarm.routing.failures import HopFailed, leaving
from layerswarm.routing.hops import ActiveHop
from layerswarm.routing.route import Route

# One hop's part of a step: (hop, hidden, start, truncate) -> its output.
HopStep = Callable[[ActiveHop, torch.Tensor, int, "int | None"], Awaitable[torch.Tensor]]


class RelayStrategy:
    """Steps relayed hop by hop; `hop_step` runs each hop's part (checked or not)."""

    def __init__(self, route: Route, hop_step: HopStep) -> None:
        self.route = route
        self.hop_step = hop_step

    async def forward(
        self, hidden: torch.Tensor, start: int, truncate: int | None = None
    ) -> torch.Tensor:
        """Run every hop on `hidden (1, T, hidden)`; a hop that fails is replaced.

        Raises:
            LayerswarmError, NoRouteError, SwarmBusy: the step's budget ran out, or no path.
        """
        route, budget = self.route, self.route.budget()
        swarm = route.swarm
        first, i = hidden, 0
        while i < len(route.hops):
            route.keep(route.hops[i].span.start, start, hidden)
            while True:
                hop = route.hops[i]
                try:
                    if swarm.is_leaving(hop.view.peer_id):
                        raise leaving(hop.view.peer_id)
                    hidden = await self.hop_step(hop, hidden, start, truncate)
                    swarm.book.served(hop.view.peer_id)
                    break
                except HopFailed as e:
                    if await route.recover(i, e, budget, start):  # a new path: from its start
                        i, hidden = -1, first
                        break
            i += 1
        return hidden
