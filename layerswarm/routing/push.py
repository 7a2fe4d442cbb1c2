"""One step pushed down the hops of a session: each peer hands its output to the next.

The client sends the step to the first hop with the rest of the route (each later hop's
address, session and token, `swarm/push.py`), and at the same time a `Collect` to every hop.
Each hop answers its collect with its output as soon as it ran: the last hop's is the step's
result (N+1 link crossings in all, against 2N when the client relays), the others' are the
inputs the client keeps for failover, which arrive before the result, off the critical path.

When a hop fails (its collect fails, or the first hop's reply says that the step could not be
handed to it: `forward_failed`), the outputs collected before it are kept, the failed hop is
replaced as in relay mode (`Route.replace`: a new path for its span, the kept inputs
replayed), and the step is pushed again from there.

A long prompt flows: it goes down the hops in steps of `prefill_chunk_tokens`, all sent at
once, so the second hop computes the first chunk while the first hop computes the second. If a
hop fails during such a prefill, the chunks in flight leave the hops' caches at different
lengths: the client then opens a new path for every layer, replays what came before the
prompt, and sends the prompt again chunk after chunk.

With `prefill_compression="int8"` a prefill's activations travel as int8 with a scale per
token (`swarm/compress.py`); every hop sends its output on in the same form. The inputs the
client keeps are what the hops computed on (the int8 values times their scales), so a replay
rebuilds the same caches.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import torch

from layerswarm.errors import RemoteError
from layerswarm.routing.failures import (
    HopFailed,
    classify,
    from_code,
    from_forward,
    leaving,
    reply_fault,
)
from layerswarm.routing.hops import ActiveHop
from layerswarm.routing.route import Budget, Route
from layerswarm.shards.config import DTYPES
from layerswarm.swarm.compress import compress_int8, decompress_int8, groups
from layerswarm.swarm.messages import MAX_SCALES
from layerswarm.swarm.protocol import Collect, ErrorCode, Message, Pushed, PushHop, Step, StepResult
from layerswarm.swarm.push import parse_forward_failure, push_token

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Wire:
    """Activations as sent (`sent`, with int8 `scales` or None) and as computed on (`seen`)."""

    sent: torch.Tensor  # (1, T, hidden)
    scales: bytes | None
    seen: torch.Tensor  # (1, T, hidden), in the wire dtype

    @staticmethod
    def pack(hidden: torch.Tensor, compress: bool) -> Wire:
        if not compress:
            return Wire(hidden, None, hidden)
        q, scales = compress_int8(hidden)
        return Wire(q, scales, decompress_int8(q, scales, hidden.dtype))


class HopStepFailed(Exception):
    """Hop `index` failed; `wire` is its input for this step (kept, the last at its boundary)."""

    def __init__(self, index: int, wire: Wire, failure: HopFailed) -> None:
        super().__init__(str(failure))
        self.index, self.wire, self.failure = index, wire, failure


def wire_dtype(wanted: str | None, hops: list[ActiveHop]) -> torch.dtype:
    """The dtype activations travel in: `wanted`, else the hops' compute dtype; where they
    differ, float32 (a bf16 hop's output widens exactly; an fp32 hop's would not narrow)."""
    if wanted is not None:
        return DTYPES[wanted]
    dtypes = {DTYPES.get(hop.view.dtype, torch.float32) for hop in hops}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


class PushStrategy:
    """Steps pushed down the route; a hop that fails is replaced and the step pushed again."""

    def __init__(self, route: Route) -> None:
        self.route = route

    async def forward(
        self, hidden: torch.Tensor, start: int, truncate: int | None = None
    ) -> torch.Tensor:
        """Run every hop on `hidden (1, T, hidden)` by push; reroute around hops that fail.

        `truncate`: every hop rolls back to it first (`Step.truncate_to`, speculation's
        rollback; the pushed step carries it down the route). Only a prompt's first chunk
        carries it.

        Raises:
            LayerswarmError, NoRouteError, SwarmBusy: the step's budget ran out, or no path.
        """
        route, config = self.route, self.route.config
        budget = route.budget()
        compress = config.prefill_compression == "int8" and hidden.shape[1] > 1
        chunk = config.prefill_chunk_tokens
        if compress:  # a step's scales travel in its header: at most MAX_SCALES of them
            fits = MAX_SCALES // groups(hidden.shape[2])
            chunk = min(chunk or fits, fits)
        if not 0 < chunk < hidden.shape[1]:
            return await self._push_one(Wire.pack(hidden, compress), start, truncate, budget)
        pieces = [
            (start + i, Wire.pack(hidden[:, i : i + chunk], compress))
            for i in range(0, hidden.shape[1], chunk)
        ]
        try:
            outs = await self._flow(pieces, truncate)
        except HopStepFailed as f:
            route.swarm.on_event(f"a hop failed during a prefill ({f.failure}): starting it again")
            await route.restart(f.failure, start, budget)
            outs = [await self._push_one(wire, s, truncate, budget) for s, wire in pieces]
        return torch.cat(outs, dim=1)

    async def _push_one(
        self, wire: Wire, start: int, truncate: int | None, budget: Budget
    ) -> torch.Tensor:
        """One pushed step, rerouted around failures within `budget`. `truncate` applies
        only to a step that starts there (a prompt's first chunk)."""
        route = self.route
        truncate = truncate if truncate == start else None
        first = wire
        route.keep(route.hops[0].span.start, start, wire.seen)
        index = 0
        while True:
            try:
                return await self._push_from(index, wire, start, truncate)
            except HopStepFailed as f:
                index, wire = f.index, f.wire
                if await route.recover(index, f.failure, budget, start):  # a new path
                    index, wire = 0, first
                    route.keep(route.hops[0].span.start, start, wire.seen)
                # The hops after it may have taken the step already (a hop that sent NaN
                # pushed it on): pushed again, it rolls them back to `start` first.
                truncate = start

    async def _flow(
        self, pieces: list[tuple[int, Wire]], truncate: int | None = None
    ) -> list[torch.Tensor]:
        """Every chunk of a prompt pushed at once; each hop runs them in order as they come.

        Raises:
            HopStepFailed: a hop failed (the other chunks' steps are cancelled).
        """
        route = self.route
        for start, wire in pieces:
            route.keep(route.hops[0].span.start, start, wire.seen)
        steps = [
            asyncio.ensure_future(self._push_from(0, w, s, truncate if s == truncate else None))
            for s, w in pieces
        ]
        try:
            await asyncio.wait(steps, return_when=asyncio.FIRST_EXCEPTION)
            failed = [i for i, step in enumerate(steps) if step.done() and step.exception()]
            if not failed:
                return [step.result() for step in steps]
            error = steps[failed[0]].exception()
            if not isinstance(error, HopStepFailed):
                # A hop that failed one chunk holds a gap, so it refuses the chunks after it
                # (`bad_position`): not this client's bug if an earlier chunk failed there.
                if failed[0]:
                    await asyncio.wait(steps[: failed[0]])
                for step in steps[: failed[0]]:
                    if isinstance(step.exception(), HopStepFailed):
                        error = step.exception()
                        break
            assert error is not None
            raise error
        finally:
            for step in steps:
                step.cancel()
            await asyncio.gather(*steps, return_exceptions=True)

    async def _push_from(
        self, first: int, wire: Wire, start: int, truncate: int | None = None
    ) -> torch.Tensor:
        """Push the step through hops `first..` (up to a leaving one); keep their outputs."""
        route = self.route
        swarm, calls, hops = route.swarm, route.calls, route.hops
        end = first
        while end < len(hops) and not swarm.is_leaving(hops[end].view.peer_id):
            end += 1
        if end == first:
            raise HopStepFailed(first, wire, leaving(hops[first].view.peer_id))
        segment = hops[first:end]
        wait = route.config.max_step_wait
        step = Step(
            segment[0].session_id,
            wire.sent,
            start,
            route=push_route(segment),
            scales=wire.scales,
            truncate_to=truncate,
        )
        sent = time.perf_counter()
        ack = asyncio.ensure_future(segment[0].conn.request(step, wait))
        collects = [
            asyncio.ensure_future(hop.conn.request(Collect(hop.session_id, start), wait))
            for hop in segment
        ]
        failed_at: tuple[int, HopFailed] | None = None  # what the first hop's reply blamed
        try:
            for k, (hop, collect) in enumerate(zip(segment, collects, strict=True)):
                index = first + k
                patience = calls.patience(hop, wire.sent.shape[1])
                waiting = asyncio.ensure_future(calls.await_reply(hop, collect, patience, True))
                try:
                    while not waiting.done():
                        if failed_at is not None and failed_at[0] == index:
                            raise HopStepFailed(index, wire, failed_at[1])
                        pending = {waiting} if ack.done() else {waiting, ack}
                        await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                        if ack in pending and ack.done():
                            failed_at = _blame(hops, ack, first, end)
                    reply = waiting.result()
                except HopFailed as e:
                    raise HopStepFailed(index, wire, e) from None
                finally:
                    waiting.cancel()
                wire = _output(hop, reply, wire, index)
                # This hop's part: from the previous hop's output (or the send) to its own,
                # one link crossing and its compute.
                now = time.perf_counter()
                calls.record(hop, now - sent, wire.sent.shape[1])
                sent = now
                swarm.book.served(hop.view.peer_id)
                if index + 1 < len(hops):
                    route.keep(hops[index + 1].span.start, start, wire.seen)
        finally:
            for collect in collects:
                collect.cancel()
            _settle(ack)
        if end < len(hops):
            raise HopStepFailed(end, wire, leaving(hops[end].view.peer_id))
        return wire.seen


def push_route(hops: list[ActiveHop]) -> tuple[PushHop, ...]:
    """The route after `hops[0]`, each hop with the token its key makes for the rest."""
    route: list[PushHop] = []
    for hop in reversed(hops[1:]):
        token = push_token(hop.push_key, hop.session_id, route)
        route.insert(0, PushHop(hop.view.address, hop.session_id, token))
    return tuple(route)


def _output(hop: ActiveHop, reply: object, wire: Wire, index: int) -> Wire:
    """A hop's collected output, checked to be what its input was sent as."""
    if (
        not isinstance(reply, StepResult)
        or reply.hidden.shape != wire.sent.shape
        or reply.hidden.dtype != wire.sent.dtype
        or (reply.scales is None) != (wire.scales is None)
    ):
        malformed = f"peer {hop.view.address} sent a malformed result"
        raise HopStepFailed(index, wire, HopFailed(hop.view.peer_id, malformed))
    out = Wire(reply.hidden, None, reply.hidden)
    if reply.scales is not None:
        seen = decompress_int8(reply.hidden, reply.scales, wire.seen.dtype)
        out = Wire(reply.hidden, reply.scales, seen)
    if fault := reply_fault(wire.seen, out.seen):  # the checks relay makes on every reply
        failure = HopFailed(hop.view.peer_id, f"{hop.view.address} sent {fault}")
        raise HopStepFailed(index, wire, failure)
    return out


def _blame(
    hops: list[ActiveHop], ack: asyncio.Future[Message], first: int, end: int
) -> tuple[int, HopFailed] | None:
    """Which hop the first hop's reply says failed (None: it says the step went through).

    Raises:
        ClientBug, RemoteError: as `failures.from_code`.
    """
    head = hops[first].view
    exc = ack.exception()
    if exc is None:
        if not isinstance(ack.result(), Pushed):
            return first, HopFailed(head.peer_id, "the first hop sent a malformed reply")
        return None
    if not isinstance(exc, RemoteError):  # the first hop's connection broke, or went silent
        return first, classify(head.peer_id, head.address, exc)
    if exc.code == ErrorCode.FORWARD_FAILED:
        peer_id, code, message = parse_forward_failure(exc.message)
        for index in range(first + 1, end):
            view = hops[index].view
            if view.peer_id == peer_id:
                return index, from_forward(peer_id, view.address, code, message)
        raise RemoteError(exc.code, f"{head.address} blamed a hop not on the route")
    return first, from_code(head.peer_id, head.address, exc.code, exc.message)


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
