"""One inference session across the hops of a path, and failover when a hop fails.

The client keeps every input it sent into each hop. When a hop fails (its connection breaks,
it answers with an error, or it stops answering at all) the peer is banned for a while, a new
path is chosen for that hop's span only, the kept inputs are replayed to the new hop(s), and
the step carries on. Retries and bans live here and nowhere else: transports raise, they do
not retry.

What is a failure and what is not:
- A broken connection, a malformed reply, an internal error, or silence: a failure. The peer is
  banned (once per failure, however many sessions saw it) and the session moves.
- "Cache full", "session full", "busy", "shutting down": the peer is popular, not broken. No
  ban; the session tries another replica, and when none has room it waits for one.
- A step that runs long: the client asks the peer (a cheap Info request the peer answers off
  its compute thread) whether it still has work queued. A peer that answers and is busy is
  given more time; one that does not answer has failed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Collection
from typing import TYPE_CHECKING

import torch

from layerswarm import metrics
from layerswarm.errors import LayerswarmError, NoRouteError, PeerUnavailable, RemoteError
from layerswarm.routing.hops import (
    FAULTS,
    FIRST_PAUSE,
    NOT_A_FAULT,
    ActiveHop,
    HopFailed,
    SwarmBusy,
    host,
)
from layerswarm.routing.kept_inputs import merge_inputs, truncate_inputs
from layerswarm.routing.paths import PathHop, choose_path, missing_layers
from layerswarm.routing.verify import Verifier, reply_fault
from layerswarm.shards.config import Span
from layerswarm.swarm.protocol import (
    CloseSession,
    InfoReply,
    InfoRequest,
    Message,
    OpenSession,
    Step,
    StepResult,
)

if TYPE_CHECKING:
    from layerswarm.routing.swarm_client import SwarmClient

log = logging.getLogger(__name__)


class RemoteSession:
    """A `Pipeline` whose layers run on peers; survives peers that fail, leave or fill up."""

    def __init__(self, client: SwarmClient, max_length: int) -> None:
        self.client = client
        self.config = client.config
        self.max_length = max_length
        self.hops: list[ActiveHop] = []
        # Inputs sent into the layer boundary `b`: every (start, hidden) in order.
        self.history: dict[int, list[tuple[int, torch.Tensor]]] = {}
        self.length = 0  # unit: tokens the hops hold (sent so far, less what was rolled back)
        self.rolled_back = 0  # unit: tokens every hop was asked to drop, all steps together
        self.truncations = 0  # steps that asked every hop to roll back
        self.reroute_seconds: list[float] = []  # unit: s each reroute took, replay included
        self.verifier = Verifier(self)  # checks some steps on replicas

    @property
    def route(self) -> list[tuple[str, Span]]:
        return [(h.view.address, h.span) for h in self.hops]

    async def open(self) -> None:
        if time.monotonic() - self.client.last_refresh > self.config.refresh_interval:
            # Peers that joined since are used by new sessions; loads are fresh for spreading.
            await self.client.refresh()
        self.hops = await self._open_path(Span(0, self.client.model_config.num_layers), set())

    async def _open_path(self, span: Span, avoid: set[str]) -> list[ActiveHop]:
        """Choose a path for `span` and open the session on each hop.

        Peers that fail are banned; peers that are full or busy are avoided (`avoid` grows).
        Hops opened before a later one failed are closed, so no reservation leaks. Failures
        count against `max_reroutes`; full and busy peers against `busy_wait_timeout`.

        Raises:
            NoRouteError, SwarmBusy: as `_choose`; SwarmBusy too when peers kept refusing.
            LayerswarmError: too many peers failed.
        """
        faults = 0
        waited_until = time.monotonic() + self.config.busy_wait_timeout
        while True:
            path = await self._choose(span, avoid)
            views = {v.peer_id: v for v in self.client.views()}
            hops = [
                ActiveHop(views[h.peer_id], h.span, self.client.connection(h.peer_id)) for h in path
            ]
            opened: list[ActiveHop] = []
            try:
                for hop in hops:
                    key = hop.push_key if self.config.push else None
                    opening = OpenSession(
                        hop.session_id, hop.span.start, hop.span.end, self.max_length, key
                    )
                    await self._request(hop, opening, self.config.request_timeout)
                    opened.append(hop)
                return hops
            except HopFailed as e:
                self._failed(e, avoid)
                await self._close_hops(opened)
                faults += e.fault
                if faults >= self.config.max_reroutes:
                    raise LayerswarmError(
                        f"could not open a session on layers {span}: too many failures ({e})"
                    ) from None
                if time.monotonic() > waited_until:
                    raise SwarmBusy(f"the swarm has no room for a session now: {e}") from None

    async def _choose(self, span: Span, avoid: set[str]) -> list[PathHop]:
        """A path for `span`, trying harder as usable peers run out.

        In turn: the peers neither banned nor avoided; the same after re-dialling every known
        peer (one that answers again, restarted or rediscovered, is no longer banned); banned
        peers too, as a last resort. When only full or busy peers serve some layers, wait for
        room (`busy_wait_timeout`), asking them again now and then.

        Raises:
            NoRouteError: no known peer serves some layers, even after re-dialling.
            SwarmBusy: the peers that serve some layers stayed full or busy.
        """
        waited_until = time.monotonic() + self.config.busy_wait_timeout
        pause = FIRST_PAUSE
        while True:
            path = self._path(span, self.client.bans.banned() | avoid)
            if path is None:
                await self._redial()
                path = self._path(span, self.client.bans.banned() | avoid) or self._path(
                    span, avoid
                )
            if path is not None:
                return path
            if missing := missing_layers(self.client.views(), span):
                raise NoRouteError(missing, self.client.liars_note(missing))
            if time.monotonic() + pause > waited_until:
                raise SwarmBusy(
                    f"the peers serving layers {span} stayed full or busy for "
                    f"{self.config.busy_wait_timeout:g} s: try again later"
                )
            if pause == FIRST_PAUSE:
                self.client.on_event(f"the peers serving layers {span} are full: waiting for room")
            await asyncio.sleep(pause)  # popular peers: wait for room, then ask them all again
            pause = min(pause * 2, 1.0)
            avoid.clear()

    def _path(self, span: Span, leave_out: Collection[str]) -> list[PathHop] | None:
        try:
            return choose_path(self.client.views(), span, leave_out, self.client.rng)
        except NoRouteError:
            return None

    async def _redial(self) -> None:
        try:
            await self.client.refresh()
        except LayerswarmError as e:  # nobody answered: the route search says which layers
            log.debug("refresh during failover: %s", e)

    def forward(self, hidden: torch.Tensor, start: int) -> torch.Tensor:
        """`aforward` for synchronous callers."""
        return self.client.net.run(self.aforward(hidden, start))

    async def aforward(self, hidden: torch.Tensor, start: int) -> torch.Tensor:
        """Run `hidden (1, T, hidden)` at positions `start ..` through every hop.

        A step that starts before the session's end first rolls every hop back to `start`
        (`Step.truncate_to`: a speculative step's rejected drafts), and the inputs kept for
        failover are cut there too: a replay rebuilds only the accepted positions.
        """
        from layerswarm.routing.push import push_forward, wire_dtype  # they build on this

        if not 0 <= start <= self.length:
            raise ValueError(f"start {start} is outside the session's {self.length} tokens")
        truncate = start if start < self.length else None
        if truncate is not None:
            self.rolled_back += self.length - start
            self.truncations += 1
            for boundary, inputs in self.history.items():
                self.history[boundary] = truncate_inputs(inputs, start)
        self.length = start + hidden.shape[1]
        wanted, hidden = hidden.dtype, hidden.to(wire_dtype(self.config.wire_dtype, self.hops))
        if self.config.push and len(self.hops) > 1:
            if not self.verifier.plan(self.hops):  # a step to check goes hop by hop instead
                return (await push_forward(self, hidden, start, truncate)).to(wanted)
        else:
            self.verifier.planned = None
        return (await self._relay(hidden, start, truncate)).to(wanted)

    async def _relay(
        self, hidden: torch.Tensor, start: int, truncate: int | None = None
    ) -> torch.Tensor:
        """Run every hop on `hidden`, the client sending each hop's output to the next."""
        i = 0
        while i < len(self.hops):
            self.history.setdefault(self.hops[i].span.start, []).append((start, hidden))
            for attempt in range(self.config.max_reroutes + 1):
                hop = self.hops[i]
                try:
                    if self.client.is_leaving(hop.view.peer_id):
                        raise HopFailed(hop.view.peer_id, "the peer is leaving", fault=False)
                    hidden = await self.verifier.step(hop, hidden, start, truncate)
                    self.client.bans.succeeded(hop.view.peer_id)
                    break
                except HopFailed as e:
                    if attempt == self.config.max_reroutes:
                        raise
                    avoid: set[str] = set()
                    self._failed(e, avoid)
                    await self._replace(i, avoid)
            i += 1
        return hidden

    async def _step(
        self, hop: ActiveHop, hidden: torch.Tensor, start: int, truncate: int | None = None
    ) -> torch.Tensor:
        tokens = hidden.shape[1]
        # the deadline follows what this client measured of the peer, once it has
        per_layer = self.client.stats.seconds_per_layer(hop.view.peer_id)
        expected = len(hop.span) * (per_layer or hop.view.seconds_per_layer) * tokens + hop.view.rtt
        patience = self.config.step_timeout_floor + self.config.step_timeout_factor * expected
        t0 = time.perf_counter()
        step = Step(hop.session_id, hidden, start, truncate_to=truncate)
        reply = await self._request(hop, step, patience, probe=True)
        if not isinstance(reply, StepResult):
            raise HopFailed(hop.view.peer_id, f"peer {hop.view.address} sent a malformed result")
        if fault := reply_fault(hidden, reply.hidden):  # blamed on the sender, not the next hop
            raise HopFailed(hop.view.peer_id, f"peer {hop.view.address} sent {fault}")
        seconds = time.perf_counter() - t0
        self.client.stats.observe(hop.view.peer_id, seconds, len(hop.span), tokens, hop.view.rtt)
        return reply.hidden

    async def _request(
        self, hop: ActiveHop, msg: object, patience: float, probe: bool = False
    ) -> object:
        """One request to a hop; failures another peer could avoid become HopFailed.

        With `probe`, a reply slower than `patience` is not yet a failure: the peer is asked
        whether it still has work queued, and while it answers that it has, the wait goes on
        (up to `max_step_wait`). A busy peer is slow; only a silent one has failed.
        """
        request = asyncio.ensure_future(
            hop.conn.request(msg, self.config.max_step_wait if probe else patience)  # type: ignore[arg-type]
        )
        return await self._await_reply(hop, request, patience, probe)

    async def _await_reply(
        self, hop: ActiveHop, request: asyncio.Future[Message], patience: float, probe: bool
    ) -> object:
        """`_request`'s wait for a request already sent; cancels it if it fails."""
        try:
            wait, last = (patience, False) if probe else (patience + 1.0, True)
            while True:
                done, _ = await asyncio.wait({request}, timeout=wait)
                if done:
                    return request.result()
                if last:  # no probe, or a peer with nothing queued stayed silent
                    raise HopFailed(hop.view.peer_id, f"no reply from {hop.view.address} in time")
                # Busy: wait on. Nothing queued: the reply may be on its way; one short wait.
                busy = await self._still_busy(hop)
                wait, last = (patience, False) if busy else (self.config.probe_timeout, True)
        except PeerUnavailable as e:
            raise HopFailed(hop.view.peer_id, str(e)) from None
        except RemoteError as e:
            if e.code in NOT_A_FAULT:
                raise HopFailed(hop.view.peer_id, str(e), fault=False) from None
            if e.code in FAULTS:
                raise HopFailed(hop.view.peer_id, str(e)) from None
            raise
        finally:
            request.cancel()

    async def _still_busy(self, hop: ActiveHop) -> bool:
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

    def _failed(self, failure: HopFailed, avoid: set[str]) -> None:
        """Ban a peer that failed; only avoid, for this choice, one that is full or busy."""
        if failure.fault:
            seconds = self.client.bans.ban(failure.peer_id)
            log.debug("banned %s for %.0f s: %s", failure.peer_id, seconds, failure)
            metrics.note_event("ban", f"banned {failure.peer_id} for {seconds:.0f} s: {failure}")
        else:
            log.debug("moving away from %s: %s", failure.peer_id, failure)
        avoid.add(failure.peer_id)

    async def _replace(self, index: int, avoid: set[str]) -> None:
        """Put new hop(s), rebuilt from the kept inputs, in place of the failed hop `index`.

        The current step's input (the last one kept at that boundary) is not replayed: the
        caller sends it next, to the first new hop. The old hop's session is closed (a peer
        that is only full gets its pages back).
        """
        old = self.hops[index]
        t0 = time.perf_counter()
        await self._close_hops([old])
        for _ in range(self.config.max_reroutes):
            new = await self._open_path(old.span, avoid)
            try:
                await self._replay(new, self.history.get(old.span.start, [])[:-1])
            except HopFailed as e:
                self._failed(e, avoid)
                await self._close_hops(new)
                continue
            self.hops[index : index + 1] = new
            self.reroute_seconds.append(time.perf_counter() - t0)
            news = f"rerouted layers {old.span} from {host(old.view.address)} to " + ", ".join(
                f"{host(h.view.address)} ({h.span})" for h in new
            )
            metrics.note_event("reroute", news)
            self.client.on_event(news)
            return
        raise LayerswarmError(f"could not rebuild layers {old.span}: too many failures")

    async def _replay(self, hops: list[ActiveHop], inputs: list[tuple[int, torch.Tensor]]) -> None:
        """Send past inputs through new hops, merged into steps of up to `replay_chunk_tokens`.

        One merged step instead of hundreds of one-token ones: the peer runs it as a chunked
        prefill, so rebuilding 1,000 tokens costs about one prefill, not 1,000 decode steps in
        a queue (`scripts/bench_failover.py`). The keys and values come out of a GEMM rather
        than GEMVs, equal to rounding; the greedy replies of the failover tests stay identical.
        """
        inputs = merge_inputs(inputs, self.config.replay_chunk_tokens)
        for n, hop in enumerate(hops):
            if n:
                self.history[hop.span.start] = list(inputs)
            outputs = [await self._step(hop, h, start) for start, h in inputs]
            inputs = [(start, out) for (start, _), out in zip(inputs, outputs, strict=True)]

    async def _close_hops(self, hops: list[ActiveHop]) -> None:
        """Close these hops' sessions, best effort (a dead peer has dropped them anyway)."""

        async def close(hop: ActiveHop) -> None:
            try:
                await hop.conn.request(CloseSession(hop.session_id), self.config.probe_timeout)
            except LayerswarmError as e:
                log.debug("close on %s: %s", hop.view.address, e)

        await asyncio.gather(*(close(hop) for hop in hops if not hop.conn.closed))

    def close(self) -> None:
        """`aclose` for synchronous callers."""
        try:
            self.client.net.run(self.aclose(), timeout=self.config.request_timeout + 1)
        except (LayerswarmError, TimeoutError) as e:
            log.debug("closing a session: %s", e)

    async def aclose(self) -> None:
        hops, self.hops = self.hops, []
        await asyncio.gather(self._close_hops(hops), self.verifier.aclose())
