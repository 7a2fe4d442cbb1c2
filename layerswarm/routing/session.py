"""One inference session across the hops of a path, and failover when a hop fails.

The client keeps every input it sent into each hop. When a hop fails (its connection breaks,
it answers with an error, its step runs past a timeout derived from its measured speed, or it
says Goodbye) the peer is banned for a while, a new path is chosen for that hop's span only,
the kept inputs are replayed to the new hop(s) in the same chunks as the original steps (so
their KV cache is built by the very same computation), and the step carries on. Retries and
bans live here and nowhere else: transports raise, they do not retry.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from layerswarm.errors import LayerswarmError, NoRouteError, PeerUnavailable, RemoteError
from layerswarm.routing.paths import PeerView, choose_path
from layerswarm.shards.config import Span
from layerswarm.swarm.protocol import CloseSession, ErrorCode, OpenSession, Step, StepResult
from layerswarm.swarm.transport import Connection

if TYPE_CHECKING:
    from layerswarm.routing.swarm_client import SwarmClient

log = logging.getLogger(__name__)

# Errors after which another replica may well succeed; others are the client's own fault.
RETRYABLE_CODES = {
    ErrorCode.CACHE_FULL,
    ErrorCode.SHUTTING_DOWN,
    ErrorCode.TIMEOUT,
    ErrorCode.UNKNOWN_SESSION,
    ErrorCode.INTERNAL,
}


def host(address: str) -> str:
    """`host:port` of an address, without the peer ID."""
    return address.split("/")[0]


class HopFailed(LayerswarmError):
    """A hop could not run a step; the session reroutes around it."""

    def __init__(self, peer_id: str, reason: str) -> None:
        super().__init__(reason)
        self.peer_id = peer_id


@dataclass
class ActiveHop:
    view: PeerView
    span: Span
    conn: Connection


class RemoteSession:
    """A `Pipeline` whose layers run on peers; survives peers that fail or leave."""

    def __init__(self, client: SwarmClient, max_length: int) -> None:
        self.client = client
        self.max_length = max_length
        self.session_id = uuid.uuid4().hex
        self.hops: list[ActiveHop] = []
        # Inputs sent into the layer boundary `b`: every (start, hidden) in order.
        self.history: dict[int, list[tuple[int, torch.Tensor]]] = {}
        self.reroute_seconds: list[float] = []  # unit: s each reroute took, replay included

    @property
    def route(self) -> list[tuple[str, Span]]:
        return [(h.view.address, h.span) for h in self.hops]

    async def open(self) -> None:
        span = Span(0, self.client.model_config.num_layers)
        if time.monotonic() - self.client.last_refresh > self.client.config.refresh_interval:
            # Peers that joined since are used by new sessions; loads are fresh for spreading.
            await self.client.refresh()
        try:
            self.hops = await self._open_path(span)
        except NoRouteError:
            await self.client.refresh()  # peers may have come back
            self.hops = await self._open_path(span)

    async def _open_path(self, span: Span) -> list[ActiveHop]:
        """Choose a path for `span` and open the session on each hop, avoiding peers that fail."""
        for _ in range(self.client.config.max_reroutes):
            path = choose_path(
                self.client.views(), span, self.client.bans.banned(), self.client.rng
            )
            views = {v.peer_id: v for v in self.client.views()}
            hops = [
                ActiveHop(views[h.peer_id], h.span, self.client.connection(h.peer_id)) for h in path
            ]
            try:
                for hop in hops:
                    await self._request(
                        hop,
                        OpenSession(self.session_id, hop.span.start, hop.span.end, self.max_length),
                        self.client.config.request_timeout,
                    )
                return hops
            except HopFailed as e:
                self._ban(e)
        raise LayerswarmError(f"could not open a session on layers {span}: too many failures")

    def forward(self, hidden: torch.Tensor, start: int) -> torch.Tensor:
        return self.client.net.run(self._forward(hidden, start))

    async def _forward(self, hidden: torch.Tensor, start: int) -> torch.Tensor:
        i = 0
        while i < len(self.hops):
            self.history.setdefault(self.hops[i].span.start, []).append((start, hidden))
            for attempt in range(self.client.config.max_reroutes + 1):
                hop = self.hops[i]
                try:
                    if self.client.is_leaving(hop.view.peer_id):
                        raise HopFailed(hop.view.peer_id, "the peer is leaving")
                    hidden = await self._step(hop, hidden, start)
                    break
                except HopFailed as e:
                    if attempt == self.client.config.max_reroutes:
                        raise
                    self._ban(e)
                    await self._replace(i)
            i += 1
        return hidden

    async def _step(self, hop: ActiveHop, hidden: torch.Tensor, start: int) -> torch.Tensor:
        tokens = hidden.shape[1]
        expected = len(hop.span) * hop.view.seconds_per_layer * tokens + hop.view.rtt
        timeout = self.client.config.step_timeout_floor + (
            self.client.config.step_timeout_factor * expected
        )
        reply = await self._request(hop, Step(self.session_id, hidden, start), timeout)
        if not isinstance(reply, StepResult) or reply.hidden.shape != hidden.shape:
            raise HopFailed(hop.view.peer_id, f"peer {hop.view.address} sent a malformed result")
        return reply.hidden

    async def _request(self, hop: ActiveHop, msg: object, timeout: float) -> object:
        """One request to a hop; failures another peer could avoid become HopFailed."""
        try:
            return await asyncio.wait_for(hop.conn.request(msg, timeout), timeout + 1.0)  # type: ignore[arg-type]
        except (PeerUnavailable, asyncio.TimeoutError) as e:
            raise HopFailed(hop.view.peer_id, str(e) or "no reply in time") from None
        except RemoteError as e:
            if e.code in RETRYABLE_CODES:
                raise HopFailed(hop.view.peer_id, str(e)) from None
            raise

    def _ban(self, failure: HopFailed) -> None:
        seconds = self.client.bans.ban(failure.peer_id)
        log.debug("banned %s for %.0f s: %s", failure.peer_id, seconds, failure)

    async def _replace(self, index: int) -> None:
        """Put new hop(s), rebuilt from the kept inputs, in place of the failed hop `index`.

        The current step's input (the last one kept at that boundary) is not replayed: the
        caller sends it next, to the first new hop.
        """
        old = self.hops[index]
        t0 = time.perf_counter()
        for _ in range(self.client.config.max_reroutes):
            new = await self._open_path(old.span)
            try:
                await self._replay(new, self.history.get(old.span.start, [])[:-1])
            except HopFailed as e:
                self._ban(e)
                await self._close_hops(new)
                continue
            self.hops[index : index + 1] = new
            self.reroute_seconds.append(time.perf_counter() - t0)
            self.client.on_event(
                f"rerouted layers {old.span} from {host(old.view.address)} to "
                + ", ".join(f"{host(h.view.address)} ({h.span})" for h in new)
            )
            return
        raise LayerswarmError(f"could not rebuild layers {old.span}: too many failures")

    async def _replay(self, hops: list[ActiveHop], inputs: list[tuple[int, torch.Tensor]]) -> None:
        """Send past inputs through new hops, in the original chunks and order.

        Each hop gets all its steps at once (the peer queues a session's steps in order), so a
        replay costs the peer's compute, not one round trip per past token.
        """
        for n, hop in enumerate(hops):
            if n:
                self.history[hop.span.start] = list(inputs)
            tasks = [asyncio.ensure_future(self._step(hop, h, start)) for start, h in inputs]
            try:
                outputs = await asyncio.gather(*tasks)
            finally:
                for task in tasks:
                    task.cancel()
            inputs = [(start, out) for (start, _), out in zip(inputs, outputs, strict=True)]

    async def _close_hops(self, hops: list[ActiveHop]) -> None:
        for hop in hops:
            if not hop.conn.closed:
                try:
                    await hop.conn.request(CloseSession(self.session_id), 2.0)
                except LayerswarmError as e:
                    log.debug("close on %s: %s", hop.view.address, e)

    def close(self) -> None:
        try:
            self.client.net.run(self._close(), timeout=self.client.config.request_timeout + 1)
        except (LayerswarmError, TimeoutError) as e:
            log.debug("closing session %s: %s", self.session_id, e)

    async def _close(self) -> None:
        await self._close_hops(self.hops)
        self.hops = []
