"""Push on a peer: take a step from the hop before, hand the output to the next hop, and keep
each output until the client collects it.

A pushed step comes from the client (on the first hop) or from the hop before (with a token,
see `swarm/push.py`). The peer runs it, puts the output where the client's `Collect` finds it
(the client learns every hop's input for failover, off the critical path), then sends the
same step on to the next hop of its route, over a connection of its own dialled pinned to
that hop's peer ID (through a relay, then punched direct where the NATs let it). The reply
(`Pushed`) goes back once the whole rest of the route took the step, so a failure further down
comes back to the client as `forward_failed`, naming the hop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable

import torch

from layerswarm.errors import LayerswarmError, ProtocolError, RemoteError
from layerswarm.peer.sessions import Session, SessionTable
from layerswarm.swarm.dial import Connection
from layerswarm.swarm.identity import Identity
from layerswarm.swarm.protocol import ErrorCode, Pushed, Step
from layerswarm.swarm.punch import open_punched
from layerswarm.swarm.push import forward_failure, token_matches
from layerswarm.swarm.transport import TransportConfig, parse_address

log = logging.getLogger(__name__)

KEPT_OUTPUTS = 16  # finished outputs a session keeps uncollected; older ones are dropped
# Slots of a session in all, finished or awaited (a flowing prefill's chunks each have one
# while they run, and their collects wait on them: an 8,192-token prompt in 256-token chunks
# is 32); past this, the oldest goes, whatever its state
MAX_OUTPUT_SLOTS = 256
Activations = tuple[torch.Tensor, bytes | None]  # hidden states as sent, and their int8 scales
RunStep = Callable[[Session, Step], Awaitable[Activations]]


class Forwarder:
    """This peer's connections to the next hops of its sessions' routes, one per peer."""

    def __init__(self, identity: Identity, transport: TransportConfig, timeout: float) -> None:
        self.identity = identity
        self.transport = transport
        self.timeout = timeout  # unit: s the rest of a route may take to take a step
        self._conns: dict[str, asyncio.Future[Connection]] = {}  # by address

    async def connection(self, address: str) -> Connection:
        """The connection to `address` (host:port/PEERID), dialled once, pinned to the ID."""
        dialing = self._conns.get(address)
        if dialing is None or (dialing.done() and _unusable(dialing)):
            dialing = asyncio.ensure_future(self._dial(address))
            self._conns[address] = dialing
        return await asyncio.shield(dialing)

    async def _dial(self, address: str) -> Connection:
        # A relayed next hop: punched direct where the NATs let it (`swarm/punch.py`), so
        # pushes between peers behind NAT leave the relay.
        return await open_punched(parse_address(address), self.identity, self.transport)

    async def push(self, step: Step, out: Activations, sent: asyncio.Future[None]) -> None:
        """Hand `out` on to the first hop of `step.route`, as the same step; `sent` is set
        once the step is queued for sending on the connection (in order: see `PushSteps`).

        Raises:
            RemoteError: FORWARD_FAILED, naming the first hop down the route that failed.
        """
        assert step.route  # the caller forwards only routed steps
        nxt, rest = step.route[0], step.route[1:]
        # Every field of the client's step travels on (speculation's, too): only where it goes
        # and the tensor change.
        forwarded = dataclasses.replace(
            step,
            session_id=nxt.session_id,
            hidden=out[0],
            scales=out[1],
            route=rest,
            token=nxt.token,
        )
        # checked by `_check_route`: pinned; a relayed address names its relay's ID first
        peer_id = parse_address(nxt.address).peer_id or nxt.address
        try:
            conn = await self.connection(nxt.address)
            request = asyncio.ensure_future(conn.request(forwarded, self.timeout))
            sent.set_result(None)  # the next step's task runs after this one has sent
            reply = await request
        except RemoteError as e:
            if e.code == ErrorCode.FORWARD_FAILED:
                raise  # it names a hop further down already
            raise RemoteError(
                ErrorCode.FORWARD_FAILED, forward_failure(peer_id, e.code, e.message)
            ) from None
        except (LayerswarmError, ValueError, OSError) as e:  # unreachable, or not that peer
            raise RemoteError(
                ErrorCode.FORWARD_FAILED, forward_failure(peer_id, "unreachable", str(e))
            ) from None
        if not isinstance(reply, Pushed):
            message = f"answered a pushed step with {type(reply).__name__}"
            raise RemoteError(
                ErrorCode.FORWARD_FAILED, forward_failure(peer_id, "protocol", message)
            )

    async def aclose(self) -> None:
        conns = [f.result() for f in self._conns.values() if f.done() and not _unusable(f)]
        for f in self._conns.values():
            f.cancel()
        self._conns.clear()
        for conn in conns:
            conn.close()
        await asyncio.gather(*(c.wait_closed() for c in conns), return_exceptions=True)


def _unusable(dialed: asyncio.Future[Connection]) -> bool:
    return dialed.cancelled() or dialed.exception() is not None or dialed.result().closed


class PushSteps:
    """Pushed steps and the client's collects of their outputs, on one peer."""

    def __init__(self, forwarder: Forwarder, collect_timeout: float) -> None:
        self.forwarder = forwarder
        self.collect_timeout = collect_timeout  # unit: s a collect waits for its step
        self.handed_steps = 0  # steps handed here by another hop (`InfoReply.extra`)

    def session(self, table: SessionTable, owner: str, step: Step) -> Session:
        """The session a routed step runs in: the sender's own, or the one its token opens.

        Raises:
            RemoteError: UNKNOWN_SESSION, or FORBIDDEN for a token that does not match.
        """
        if step.token is None:  # from the session's own client
            return table.get(owner, step.session_id)
        candidates = [
            s
            for (_, sid), s in table.sessions.items()
            if sid == step.session_id and s.push_key is not None
        ]
        if not candidates:
            raise RemoteError(
                ErrorCode.UNKNOWN_SESSION,
                f"no session {step.session_id!r} here takes pushed steps (closed or expired)",
            )
        for s in candidates:
            assert s.push_key is not None
            if token_matches(s.push_key, step.session_id, step.route or (), step.token):
                return table.get(*s.key)
        raise RemoteError(
            ErrorCode.FORBIDDEN,
            f"the token of this pushed step does not open session {step.session_id!r} "
            "for this route",
        )

    async def step(self, session: Session, step: Step, run: RunStep) -> Pushed:
        """Run a routed step, keep its output for the client, and push it down the route."""
        _check_route(step)
        self.handed_steps += step.token is not None
        future = self._slot(session, step.start_position, fresh=True)
        # Steps of a session are handed on in the order they came (a prompt's chunks must
        # reach the next hop in order), whatever order their tasks wake up in.
        before, sent = session.handed_on, asyncio.get_running_loop().create_future()
        session.handed_on = sent
        try:
            try:
                out = await run(session, step)
            except Exception as e:
                if not future.done():
                    future.set_exception(e)
                    future.exception()  # retrieved: the client may never collect it
                raise
            if not future.done():
                future.set_result(out)
            if step.route:
                if before is not None:
                    await before
                await self.forwarder.push(step, out, sent)
        finally:
            if not sent.done():
                sent.set_result(None)
        return Pushed(step.session_id)

    async def collect(self, session: Session, start: int) -> Activations:
        """This hop's output of the routed step at `start`, once it ran.

        Raises:
            RemoteError: what the step raised, or TIMEOUT when it never came.
        """
        future = self._slot(session, start, fresh=False)
        try:
            return await asyncio.wait_for(asyncio.shield(future), self.collect_timeout)
        except TimeoutError:
            raise RemoteError(
                ErrorCode.TIMEOUT,
                f"no step at position {start} reached this hop in {self.collect_timeout:g} s",
            ) from None
        finally:
            if future.done() and session.outputs.get(start) is future:
                del session.outputs[start]

    def _slot(self, session: Session, start: int, fresh: bool) -> asyncio.Future[Activations]:
        """Where the output of the step at `start` goes. `fresh`: for a step arriving now, so a
        finished output of an older step at the same position (never collected) is dropped."""
        outputs = session.outputs
        future = outputs.get(start)
        if future is None or (fresh and future.done()):
            future = outputs[start] = asyncio.get_running_loop().create_future()
        if len(outputs) > KEPT_OUTPUTS:  # a client that never collects: drop the oldest
            finished = [at for at, f in outputs.items() if f.done() and f is not future]
            for at in finished[: len(finished) - KEPT_OUTPUTS]:
                del outputs[at]
        while len(outputs) > MAX_OUTPUT_SLOTS:
            old = outputs.pop(next(iter(outputs)))
            if not old.done():
                old.set_exception(RemoteError(ErrorCode.TIMEOUT, "output dropped uncollected"))
                old.exception()
        return future


def _check_route(step: Step) -> None:
    """Every hop of a route is named by an address pinned to its peer ID: checked before any
    work is done, so a bad route costs no compute."""
    for hop in step.route or ():
        try:
            pinned = parse_address(hop.address).peer_id is not None
        except ValueError as e:
            raise ProtocolError(f"route: {e}") from None
        if not pinned:
            raise ProtocolError(f"route: {hop.address!r} does not name the peer ID")
