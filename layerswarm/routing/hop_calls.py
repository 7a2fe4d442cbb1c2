"""The calls a client makes to one hop: open, step, close, each with a deadline of its own.

A step's deadline comes from what this client measured of the peer (`PeerStats`; the peer's
claim only until a first step is timed) times the tokens and layers, plus its round trip. A
step that runs past it is not yet a failure: the peer is asked (a cheap Info request it answers
off its compute thread) whether it still has work queued, and while it says so, the wait goes
on, up to `max_step_wait`. A busy peer is slow; only a silent one has failed. Every step's time
is recorded, relayed or pushed alike, so routing and deadlines run on measurements.

Transports raise; these calls turn what they raise into a `HopFailed` (`failures.classify`) and
never retry: retries live in the route.
"""

from __future__ import annotations

import asyncio
import logging
import time

import torch

from layerswarm.errors import LayerswarmError
from layerswarm.routing.client_config import ClientConfig
from layerswarm.routing.failures import HopFailed, classify, reply_fault
from layerswarm.routing.hops import ActiveHop
from layerswarm.routing.peer_stats import PeerStats
from layerswarm.swarm.protocol import (
    CloseSession,
    InfoReply,
    InfoRequest,
    Message,
    OpenSession,
    SessionOpened,
    Step,
    StepResult,
)

log = logging.getLogger(__name__)


class HopCalls:
    """Open, step and close sessions on hops, with measured deadlines; errors classified."""

    def __init__(self, config: ClientConfig, stats: PeerStats) -> None:
        self.config = config
        self.stats = stats

    async def open(
        self,
        hop: ActiveHop,
        max_length: int,
        push: bool,
        prefix: tuple[bytes, ...] = (),
        fork_of: str | None = None,
    ) -> None:
        """Open the hop's session (with its push key when steps are pushed into it), as a fork
        of the session `fork_of` of the same peer, or taking the pages the peer keeps for
        `prefix` (a hash chain). `hop.cached` says what it then holds.

        Raises:
            HopFailed, ClientBug: as `await_reply`.
        """
        key = hop.push_key if push else None
        opening = OpenSession(
            hop.session_id,
            hop.span.start,
            hop.span.end,
            max_length,
            key,
            prefix=prefix or None,
            fork_of=fork_of,
        )
        reply = await self.request(hop, opening, self.config.request_timeout)
        if not isinstance(reply, SessionOpened):
            raise HopFailed(hop.view.peer_id, f"peer {hop.view.address} sent a malformed reply")
        hop.cached = reply.cached_tokens or 0
        if hop.cached > max_length or (not prefix and fork_of is None and hop.cached):
            raise HopFailed(
                hop.view.peer_id, f"peer {hop.view.address} claims {hop.cached} tokens cached"
            )

    async def step(
        self, hop: ActiveHop, hidden: torch.Tensor, start: int, truncate: int | None = None
    ) -> torch.Tensor:
        """One step of `hidden (1, T, hidden)` at positions `start ..` on the hop, checked.

        Raises:
            HopFailed: the hop failed, is full or leaving, or sent a malformed reply.
        """
        t0 = time.perf_counter()
        step = Step(hop.session_id, hidden, start, truncate_to=truncate)
        reply = await self.request(hop, step, self.patience(hop, hidden.shape[1]), probe=True)
        if not isinstance(reply, StepResult):
            raise HopFailed(hop.view.peer_id, f"peer {hop.view.address} sent a malformed result")
        if fault := reply_fault(hidden, reply.hidden):  # blamed on the sender, not the next hop
            raise HopFailed(hop.view.peer_id, f"peer {hop.view.address} sent {fault}")
        self.record(hop, time.perf_counter() - t0, hidden.shape[1])
        return reply.hidden

    def patience(self, hop: ActiveHop, tokens: int) -> float:
        """How long the hop may take for a step of `tokens` before it is probed."""
        measured = self.stats.seconds_per_layer(hop.view.peer_id)
        per_layer = measured or hop.view.seconds_per_layer
        expected = len(hop.span) * per_layer * tokens + hop.view.rtt
        return self.config.step_timeout_floor + self.config.step_timeout_factor * expected

    def record(self, hop: ActiveHop, seconds: float, tokens: int) -> None:
        """Record that the hop's part of a step took `seconds` (its round trip included)."""
        self.stats.observe(hop.view.peer_id, seconds, len(hop.span), tokens, hop.view.rtt)

    async def request(
        self, hop: ActiveHop, msg: Message, patience: float, probe: bool = False
    ) -> Message:
        """One request to a hop (see `await_reply`)."""
        wait = self.config.max_step_wait if probe else patience
        return await self.await_reply(
            hop, asyncio.ensure_future(hop.conn.request(msg, wait)), patience, probe
        )

    async def await_reply(
        self, hop: ActiveHop, request: asyncio.Future[Message], patience: float, probe: bool
    ) -> Message:
        """The reply to a request already sent; cancels the request if it fails.

        With `probe`, a reply slower than `patience` is not yet a failure: see the module.

        Raises:
            HopFailed: as `failures.classify` says of the error, or the peer stayed silent.
            ClientBug: the peer says this client sent something malformed.
        """
        try:
            wait, last = (patience, False) if probe else (patience + 1.0, True)
            while True:
                done, _ = await asyncio.wait({request}, timeout=wait)
                if done:
                    return request.result()
                if last:  # no probe, or a peer with nothing queued stayed silent
                    raise HopFailed(hop.view.peer_id, f"no reply from {hop.view.address} in time")
                # Busy: wait on. Nothing queued: the reply may be on its way; one short wait.
                busy = await self.still_busy(hop)
                wait, last = (patience, False) if busy else (self.config.probe_timeout, True)
        except LayerswarmError as e:
            raise classify(hop.view.peer_id, hop.view.address, e) from None
        finally:
            request.cancel()

    async def still_busy(self, hop: ActiveHop) -> bool:
        """Whether the peer answers a probe and says it has steps queued or running."""
        try:
            info = await hop.conn.request(InfoRequest(), self.config.probe_timeout)
        except LayerswarmError:
            return False
        if not isinstance(info, InfoReply):
            return False
        queued = info.extra.get("queued_tokens")
        busy = not isinstance(queued, (int, float)) or queued > 0  # older peers do not say
        if busy:
            log.debug("%s is slow but busy (%s tokens queued): waiting", hop.view.address, queued)
        return busy

    async def close(self, hops: list[ActiveHop]) -> None:
        """Close these hops' sessions, best effort (a dead peer has dropped them anyway)."""

        async def close(hop: ActiveHop) -> None:
            try:
                await hop.conn.request(CloseSession(hop.session_id), self.config.probe_timeout)
            except LayerswarmError as e:
                log.debug("close on %s: %s", hop.view.address, e)

        await asyncio.gather(*(close(hop) for hop in hops if not hop.conn.closed))
