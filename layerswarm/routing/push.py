"""One step pushed down the hops of a session: each peer hands its output to the next.

The client sends the step to the first hop with the rest of the route (each later hop's
address, session and token, `swarm/push.py`), and at the same time a `Collect` to every hop.
Each hop answers its collect with its output as soon as it ran: the last hop's is the step's
result (N+1 link crossings in all, against 2N when the client relays), the others' are the
inputs the client keeps for failover, which arrive before the result, off the critical path.

When a hop fails (its collect fails, or the first hop's reply says that the step could not be
handed to it: `forward_failed`), the outputs collected before it are kept, the failed hop is
replaced as in relay mode (`RemoteSession._replace`: a new path for its span, the kept inputs
replayed), and the step is pushed again from there.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import torch

from layerswarm.errors import RemoteError
from layerswarm.routing.session import FAULTS, NOT_A_FAULT, ActiveHop, HopFailed
from layerswarm.swarm.protocol import Collect, ErrorCode, Message, Pushed, PushHop, Step, StepResult
from layerswarm.swarm.push import parse_forward_failure, push_token

if TYPE_CHECKING:
    from layerswarm.routing.session import RemoteSession

log = logging.getLogger(__name__)


class _Failed(Exception):
    """Hop `index` failed; `hidden` is its input for this step (kept, the last at its boundary)."""

    def __init__(self, index: int, hidden: torch.Tensor, failure: HopFailed) -> None:
        super().__init__(str(failure))
        self.index, self.hidden, self.failure = index, hidden, failure


async def push_forward(session: RemoteSession, hidden: torch.Tensor, start: int) -> torch.Tensor:
    """Run every hop of `session` on `hidden` by push; reroute around hops that fail.

    Raises:
        HopFailed: a hop failed more than `max_reroutes` times over; RemoteError, as relay.
    """
    session.history.setdefault(session.hops[0].span.start, []).append((start, hidden))
    index = 0
    for attempt in range(session.config.max_reroutes + 1):
        try:
            return await _push_from(session, index, hidden, start)
        except _Failed as f:
            if attempt == session.config.max_reroutes:
                raise f.failure from None
            index, hidden = f.index, f.hidden
            avoid: set[str] = set()
            session._failed(f.failure, avoid)
            await session._replace(index, avoid)
    raise AssertionError("unreachable")


def push_route(hops: list[ActiveHop]) -> tuple[PushHop, ...]:
    """The route after `hops[0]`, each hop with the token its key makes for the rest."""
    route: list[PushHop] = []
    for hop in reversed(hops[1:]):
        token = push_token(hop.push_key, hop.session_id, route)
        route.insert(0, PushHop(hop.view.address, hop.session_id, token))
    return tuple(route)


async def _push_from(
    session: RemoteSession, first: int, hidden: torch.Tensor, start: int
) -> torch.Tensor:
    """Push the step through hops `first..` (up to a leaving one); record their outputs."""
    hops = session.hops
    end = first
    while end < len(hops) and not session.client.is_leaving(hops[end].view.peer_id):
        end += 1
    if end == first:
        raise _Failed(first, hidden, _leaving(hops[first]))
    segment = hops[first:end]
    wait = session.config.max_step_wait
    step = Step(segment[0].session_id, hidden, start, route=push_route(segment))
    ack = asyncio.ensure_future(segment[0].conn.request(step, wait))
    collects = [
        asyncio.ensure_future(hop.conn.request(Collect(hop.session_id, start), wait))
        for hop in segment
    ]
    failed_at: tuple[int, HopFailed] | None = None  # what the first hop's reply blamed
    try:
        for k, (hop, collect) in enumerate(zip(segment, collects, strict=True)):
            index = first + k
            patience = _patience(session, hop, hidden)
            waiting = asyncio.ensure_future(session._await_reply(hop, collect, patience, True))
            try:
                while not waiting.done():
                    if failed_at is not None and failed_at[0] == index:
                        raise _Failed(index, hidden, failed_at[1])
                    pending = {waiting} if ack.done() else {waiting, ack}
                    await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                    if ack in pending and ack.done():
                        failed_at = _blame(session, ack, first, end)
                reply = waiting.result()
            except HopFailed as e:
                raise _Failed(index, hidden, e) from None
            finally:
                waiting.cancel()
            if not isinstance(reply, StepResult) or reply.hidden.shape != hidden.shape:
                malformed = f"peer {hop.view.address} sent a malformed result"
                raise _Failed(index, hidden, HopFailed(hop.view.peer_id, malformed))
            session.client.bans.succeeded(hop.view.peer_id)
            hidden = reply.hidden
            if index + 1 < len(hops):
                session.history.setdefault(hops[index + 1].span.start, []).append((start, hidden))
    finally:
        for collect in collects:
            collect.cancel()
        _settle(ack)
    if end < len(hops):
        raise _Failed(end, hidden, _leaving(hops[end]))
    return hidden


def _blame(
    session: RemoteSession, ack: asyncio.Future[Message], first: int, end: int
) -> tuple[int, HopFailed] | None:
    """Which hop the first hop's reply says failed (None: it says the step went through)."""
    hops = session.hops
    exc = ack.exception()
    if exc is None:
        if not isinstance(ack.result(), Pushed):
            failure = HopFailed(hops[first].view.peer_id, "the first hop sent a malformed reply")
            return first, failure
        return None
    if not isinstance(exc, RemoteError):  # the first hop's connection broke, or went silent
        return first, HopFailed(hops[first].view.peer_id, str(exc))
    if exc.code == ErrorCode.FORWARD_FAILED:
        peer_id, code, message = parse_forward_failure(exc.message)
        for index in range(first + 1, end):
            if hops[index].view.peer_id == peer_id:
                reason = f"{hops[index].view.address} did not take a pushed step: {code}: {message}"
                if code in NOT_A_FAULT:
                    return index, HopFailed(peer_id, reason, fault=False)
                if code in FAULTS or code in ("unreachable", "protocol"):
                    return index, HopFailed(peer_id, reason)
                raise RemoteError(code, message)
        raise RemoteError(exc.code, f"{hops[first].view.address} blamed a hop not on the route")
    if exc.code in NOT_A_FAULT:
        return first, HopFailed(hops[first].view.peer_id, str(exc), fault=False)
    if exc.code in FAULTS:
        return first, HopFailed(hops[first].view.peer_id, str(exc))
    raise exc


def _patience(session: RemoteSession, hop: ActiveHop, hidden: torch.Tensor) -> float:
    """How long this hop may take for its part of a step before it is probed (as relay)."""
    expected = len(hop.span) * hop.view.seconds_per_layer * hidden.shape[1] + hop.view.rtt
    return session.config.step_timeout_floor + session.config.step_timeout_factor * expected


def _settle(ack: asyncio.Future[Message]) -> None:
    """The first hop's reply comes once the whole route took the step, after the result: let
    it finish on its own (a failure it reports then has already been handled or is moot)."""

    def done(future: asyncio.Future[Message]) -> None:
        if not future.cancelled() and future.exception() is not None:
            log.debug("a pushed step's late reply: %s", future.exception())

    if ack.done():
        done(ack)
    else:
        ack.add_done_callback(done)


def _leaving(hop: ActiveHop) -> HopFailed:
    return HopFailed(hop.view.peer_id, "the peer is leaving", fault=False)
