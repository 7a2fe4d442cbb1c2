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
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from layerswarm.errors import LayerswarmError, RemoteError
from layerswarm.routing.hops import FAULTS, NOT_A_FAULT, ActiveHop, HopFailed
from layerswarm.routing.verify import reply_fault
from layerswarm.shards.config import DTYPES, Span
from layerswarm.swarm.compress import compress_int8, decompress_int8, groups
from layerswarm.swarm.messages import MAX_SCALES
from layerswarm.swarm.protocol import Collect, ErrorCode, Message, Pushed, PushHop, Step, StepResult
from layerswarm.swarm.push import parse_forward_failure, push_token

if TYPE_CHECKING:
    from layerswarm.routing.session import RemoteSession

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


class _Failed(Exception):
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


async def push_forward(
    session: RemoteSession, hidden: torch.Tensor, start: int, truncate: int | None = None
) -> torch.Tensor:
    """Run every hop of `session` on `hidden` by push; reroute around hops that fail.

    `truncate`: every hop rolls back to it first (`Step.truncate_to`, speculation's rollback;
    the pushed step carries it down the route). Only a prompt's first chunk carries it.

    Raises:
        HopFailed: a hop failed more than `max_reroutes` times over; RemoteError, as relay.
    """
    config = session.config
    compress = config.prefill_compression == "int8" and hidden.shape[1] > 1
    chunk = config.prefill_chunk_tokens
    if compress:  # a step's scales travel in its header: at most MAX_SCALES of them
        fits = MAX_SCALES // groups(hidden.shape[2])
        chunk = min(chunk or fits, fits)
    if not 0 < chunk < hidden.shape[1]:
        return await _push_one(session, Wire.pack(hidden, compress), start, truncate)
    pieces = [
        (start + i, Wire.pack(hidden[:, i : i + chunk], compress))
        for i in range(0, hidden.shape[1], chunk)
    ]
    try:
        outs = await _flow(session, pieces, truncate)
    except _Failed as f:
        session.client.on_event(f"a hop failed during a prefill ({f.failure}): starting it again")
        await _restart(session, f.failure, start)
        outs = [await _push_one(session, wire, s, truncate) for s, wire in pieces]
    return torch.cat(outs, dim=1)


async def _push_one(
    session: RemoteSession, wire: Wire, start: int, truncate: int | None = None
) -> torch.Tensor:
    """One pushed step, rerouted around failures (up to `max_reroutes`). `truncate` applies
    only to a step that starts there (a prompt's first chunk)."""
    truncate = truncate if truncate == start else None
    _keep(session, session.hops[0].span.start, start, wire.seen)
    index = 0
    for attempt in range(session.config.max_reroutes + 1):
        try:
            return await _push_from(session, index, wire, start, truncate)
        except _Failed as f:
            if attempt == session.config.max_reroutes:
                raise f.failure from None
            index, wire = f.index, f.wire
            avoid: set[str] = set()
            session._failed(f.failure, avoid)
            await session._replace(index, avoid)
    raise AssertionError("unreachable")


async def _flow(
    session: RemoteSession, pieces: list[tuple[int, Wire]], truncate: int | None = None
) -> list[torch.Tensor]:
    """Every chunk of a prompt pushed at once; each hop runs them in order as they come.

    Raises:
        _Failed: a hop failed (the other chunks' steps are cancelled).
    """
    for start, wire in pieces:
        _keep(session, session.hops[0].span.start, start, wire.seen)
    steps = [
        asyncio.ensure_future(_push_from(session, 0, w, s, truncate if s == truncate else None))
        for s, w in pieces
    ]
    try:
        return list(await asyncio.gather(*steps))
    finally:
        for step in steps:
            step.cancel()
        await asyncio.gather(*steps, return_exceptions=True)


async def _restart(session: RemoteSession, failure: HopFailed, start: int) -> None:
    """A new path for every layer, rebuilt from the inputs kept before position `start`."""
    avoid: set[str] = set()
    session._failed(failure, avoid)
    await session._close_hops(session.hops)
    first = session.hops[0].span.start
    before = [(s, h) for s, h in session.history.get(first, []) if s < start]
    for _ in range(session.config.max_reroutes):
        session.history = {first: list(before)}
        new = await session._open_path(Span(first, session.hops[-1].span.end), avoid)
        try:
            await session._replay(new, before)
        except HopFailed as e:
            session._failed(e, avoid)
            await session._close_hops(new)
            continue
        session.hops = new
        return
    raise LayerswarmError("could not rebuild the session's path: too many failures")


def _keep(session: RemoteSession, boundary: int, start: int, hidden: torch.Tensor) -> None:
    """Keep an input of `boundary`, in the order of positions (chunks may come out of order)."""
    kept = session.history.setdefault(boundary, [])
    at = len(kept)
    while at > 0 and kept[at - 1][0] > start:
        at -= 1
    kept.insert(at, (start, hidden))


def push_route(hops: list[ActiveHop]) -> tuple[PushHop, ...]:
    """The route after `hops[0]`, each hop with the token its key makes for the rest."""
    route: list[PushHop] = []
    for hop in reversed(hops[1:]):
        token = push_token(hop.push_key, hop.session_id, route)
        route.insert(0, PushHop(hop.view.address, hop.session_id, token))
    return tuple(route)


async def _push_from(
    session: RemoteSession, first: int, wire: Wire, start: int, truncate: int | None = None
) -> torch.Tensor:
    """Push the step through hops `first..` (up to a leaving one); keep their outputs."""
    hops = session.hops
    end = first
    while end < len(hops) and not session.client.is_leaving(hops[end].view.peer_id):
        end += 1
    if end == first:
        raise _Failed(first, wire, _leaving(hops[first]))
    segment = hops[first:end]
    wait = session.config.max_step_wait
    route = push_route(segment)
    step = Step(
        segment[0].session_id,
        wire.sent,
        start,
        route=route,
        scales=wire.scales,
        truncate_to=truncate,
    )
    ack = asyncio.ensure_future(segment[0].conn.request(step, wait))
    collects = [
        asyncio.ensure_future(hop.conn.request(Collect(hop.session_id, start), wait))
        for hop in segment
    ]
    failed_at: tuple[int, HopFailed] | None = None  # what the first hop's reply blamed
    try:
        for k, (hop, collect) in enumerate(zip(segment, collects, strict=True)):
            index = first + k
            patience = _patience(session, hop, wire.sent)
            waiting = asyncio.ensure_future(session._await_reply(hop, collect, patience, True))
            try:
                while not waiting.done():
                    if failed_at is not None and failed_at[0] == index:
                        raise _Failed(index, wire, failed_at[1])
                    pending = {waiting} if ack.done() else {waiting, ack}
                    await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                    if ack in pending and ack.done():
                        failed_at = _blame(session, ack, first, end)
                reply = waiting.result()
            except HopFailed as e:
                raise _Failed(index, wire, e) from None
            finally:
                waiting.cancel()
            wire = _output(hop, reply, wire, index)
            session.client.bans.succeeded(hop.view.peer_id)
            session.client.trust.checks(hop.view.peer_id).served += 1
            if index + 1 < len(hops):
                _keep(session, hops[index + 1].span.start, start, wire.seen)
    finally:
        for collect in collects:
            collect.cancel()
        _settle(ack)
    if end < len(hops):
        raise _Failed(end, wire, _leaving(hops[end]))
    return wire.seen


def _output(hop: ActiveHop, reply: object, wire: Wire, index: int) -> Wire:
    """A hop's collected output, checked to be what its input was sent as."""
    if (
        not isinstance(reply, StepResult)
        or reply.hidden.shape != wire.sent.shape
        or reply.hidden.dtype != wire.sent.dtype
        or (reply.scales is None) != (wire.scales is None)
    ):
        malformed = f"peer {hop.view.address} sent a malformed result"
        raise _Failed(index, wire, HopFailed(hop.view.peer_id, malformed))
    out = Wire(reply.hidden, None, reply.hidden)
    if reply.scales is not None:
        seen = decompress_int8(reply.hidden, reply.scales, wire.seen.dtype)
        out = Wire(reply.hidden, reply.scales, seen)
    if fault := reply_fault(wire.seen, out.seen):  # the checks relay makes on every reply
        raise _Failed(index, wire, HopFailed(hop.view.peer_id, f"{hop.view.address} sent {fault}"))
    return out


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
