"""A session's route: its hops, the inputs kept for failover, and what to do when a hop fails.

The route keeps every input sent into each layer boundary. When a hop fails, `replace` bans
the peer (if it failed, not if it is only full or leaving), chooses a new path for that hop's
span only, replays the kept inputs to the new hop(s) and puts them in its place; the strategy
then sends the step on from there. `restart` rebuilds the whole path (a failure in the middle
of a flowing prefill leaves the hops' caches at different lengths).

Every step has one `Budget`: failed peers spend it (`max_reroutes` in all, opening, replaying
and stepping together), so a step can never nest retries inside retries. Full or busy peers
do not spend it: the route waits for room, up to `busy_wait_timeout`. Layers that no live peer
serves at the moment (the only replica restarting) are waited for, up to `route_wait`, the
swarm re-read now and then; only then does the step fail.

A session that opened on a prefix the peers keep (`open` with its hash chain) never sent the
cached positions: the route keeps them at the first boundary only (the client embeds them
again), and the later boundaries lack them (`lacking`). A hop at such a boundary that fails
cannot be rebuilt alone, so `recover` rebuilds the whole path from the first boundary's inputs
(`restart`); a check there first runs them through the hops before it again (`fill`).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Collection, Sequence
from typing import Protocol

import torch

from layerswarm import metrics
from layerswarm.errors import LayerswarmError, NoRouteError
from layerswarm.routing.client_config import ClientConfig
from layerswarm.routing.failures import HopFailed, SwarmBusy
from layerswarm.routing.hop_calls import HopCalls
from layerswarm.routing.hops import ActiveHop, host
from layerswarm.routing.kept_inputs import KeptInputs, merge_inputs, truncate_inputs
from layerswarm.routing.paths import PathHop, PeerView, choose_path, missing_layers
from layerswarm.routing.peer_book import PeerBook
from layerswarm.shards.config import Span
from layerswarm.swarm.dial import Connection

log = logging.getLogger(__name__)

FIRST_PAUSE = 0.05  # unit: s before asking full peers again; doubles up to MAX_PAUSE
MAX_PAUSE = 1.0  # unit: s between two looks at a swarm that lacks room or layers


class Swarm(Protocol):
    """What a route needs of the swarm client: the live peers and a way to re-read them."""

    config: ClientConfig
    book: PeerBook
    calls: HopCalls
    rng: random.Random

    def views(self) -> list[PeerView]: ...

    def connection(self, peer_id: str) -> Connection: ...

    def is_leaving(self, peer_id: str) -> bool: ...

    def on_event(self, text: str) -> None: ...

    def liars_note(self, layers: list[int]) -> str: ...

    async def refresh(self) -> None: ...


class Budget:
    """One step's allowance for failures: `max_reroutes` failed peers, whatever they failed in
    (opening, replaying, stepping); full or busy peers are waited for against a deadline."""

    def __init__(self, config: ClientConfig) -> None:
        self.faults_left = config.max_reroutes
        self.busy_wait = config.busy_wait_timeout
        self.busy_until: float | None = None  # unit: monotonic s; set at the first full peer

    def spend(self, failure: HopFailed) -> None:
        """Count a failure against the step.

        Raises:
            LayerswarmError: too many peers failed in this step.
            SwarmBusy: peers stayed full or busy past `busy_wait_timeout`.
        """
        now = time.monotonic()
        if failure.fault:
            self.faults_left -= 1
            if self.faults_left < 0:
                raise LayerswarmError(f"too many peers failed in one step (the last: {failure})")
            return
        if self.busy_until is None:
            self.busy_until = now + self.busy_wait
        elif now > self.busy_until:
            raise SwarmBusy(f"the swarm has no room for this session now: {failure}")


class Route:
    """The hops of one session and the inputs kept at each of their boundaries."""

    def __init__(self, swarm: Swarm, max_length: int) -> None:
        self.swarm = swarm
        self.config = swarm.config
        self.calls = swarm.calls
        self.max_length = max_length
        self.hops: list[ActiveHop] = []
        # Inputs sent into the layer boundary `b`: every (start, hidden) in position order.
        self.history: dict[int, list[tuple[int, torch.Tensor]]] = {}
        self.reroute_seconds: list[float] = []  # unit: s each reroute took, replay included
        # Boundaries whose kept inputs lack the positions a cached prefix skipped (the module)
        self.lacking: set[int] = set()

    def budget(self) -> Budget:
        return Budget(self.config)

    async def open(self, span: Span, prefix: tuple[bytes, ...] = ()) -> int:
        """Open the session on a path for `span`; with a prefix's hash chain, on the pages the
        peers keep for it. Returns how many tokens every hop holds from the start (0 without).
        A hop that holds more drops the rest when the first step starts before its end."""
        self.hops = await self.open_path(span, set(), self.budget(), prefix)
        cached = min(h.cached for h in self.hops) if prefix else 0
        self.lacking = {h.span.start for h in self.hops[1:]} if cached else set()
        return cached

    async def open_path(
        self, span: Span, avoid: set[str], budget: Budget, prefix: tuple[bytes, ...] = ()
    ) -> list[ActiveHop]:
        """Choose a path for `span` and open the session on each hop (with `prefix`: see
        `open`).

        Hops opened before a later one failed are closed, so no reservation leaks.

        Raises:
            NoRouteError, SwarmBusy, LayerswarmError: as `choose` and `Budget.spend`.
        """
        while True:
            path = await self.choose(span, avoid)
            views = {v.peer_id: v for v in self.swarm.views()}
            hops = [
                ActiveHop(views[h.peer_id], h.span, self.swarm.connection(h.peer_id)) for h in path
            ]
            opened: list[ActiveHop] = []
            try:
                for hop in hops:
                    await self.calls.open(hop, self.max_length, self.config.push, prefix)
                    opened.append(hop)
                return hops
            except HopFailed as e:
                self.failed(e, avoid)
                await self.calls.close(opened)
                budget.spend(e)
            except LayerswarmError:  # our bug, or a code no peer answers differently
                await self.calls.close(opened)
                raise

    async def choose(self, span: Span, avoid: set[str]) -> list[PathHop]:
        """A path for `span`, trying harder as usable peers run out.

        In turn: the peers neither banned nor avoided; the same after re-dialling every known
        peer (one that answers again, restarted or rediscovered, is no longer banned); banned
        peers too, as a last resort. When only full or busy peers serve some layers, wait for
        room (`busy_wait_timeout`); when no live peer serves some layers, wait for one
        (`route_wait`), re-reading the swarm now and then.

        Raises:
            NoRouteError: no peer served some layers within `route_wait`.
            SwarmBusy: the peers that serve some layers stayed full or busy.
        """
        now = time.monotonic()
        busy_until = now + self.config.busy_wait_timeout
        missing_until = now + self.config.route_wait
        pause, told = FIRST_PAUSE, ""
        while True:
            path = self._path(span, self.swarm.book.banned() | avoid)
            if path is None:
                await self._redial()
                path = self._path(span, self.swarm.book.banned() | avoid) or self._path(span, avoid)
            if path is not None:
                return path
            now = time.monotonic()
            if missing := missing_layers(self.swarm.views(), span):
                if now + pause > missing_until:
                    raise NoRouteError(missing, self.swarm.liars_note(missing))
                news = f"no peer serves layers {_ranges(missing)} now: waiting for one"
            elif now + pause > busy_until:
                raise SwarmBusy(
                    f"the peers serving layers {span} stayed full or busy for "
                    f"{self.config.busy_wait_timeout:g} s: try again later"
                )
            else:
                news = f"the peers serving layers {span} are full: waiting for room"
                avoid.clear()  # ask them all again after the pause
            if news != told:
                self.swarm.on_event(news)
                told = news
            await asyncio.sleep(pause)
            pause = min(pause * 2, MAX_PAUSE)

    def _path(self, span: Span, leave_out: Collection[str]) -> list[PathHop] | None:
        try:
            return choose_path(self.swarm.views(), span, leave_out, self.swarm.rng)
        except NoRouteError:
            return None

    async def _redial(self) -> None:
        try:
            await self.swarm.refresh()
        except LayerswarmError as e:  # nobody answered: the route search says which layers
            log.debug("refresh during failover: %s", e)

    def failed(self, failure: HopFailed, avoid: set[str]) -> None:
        """Ban a peer that failed; only avoid, for this choice, one that is full or leaving."""
        if failure.fault:
            self.swarm.book.ban(failure.peer_id, str(failure))
        else:
            log.debug("moving away from %s: %s", failure.peer_id, failure)
        avoid.add(failure.peer_id)

    async def recover(self, index: int, failure: HopFailed, budget: Budget, start: int) -> bool:
        """Rebuild around the failed hop `index`: `replace` it, or, where its boundary lacks a
        cached prefix's inputs, `restart` the whole path. Returns whether it restarted (the
        step then goes again from the first hop, its input kept anew)."""
        if self.hops[index].span.start not in self.lacking:
            await self.replace(index, failure, budget)
            return False
        self.swarm.on_event(f"rebuilding the route without the cached prefix ({failure})")
        await self.restart(failure, start, budget)
        return True

    async def replace(self, index: int, failure: HopFailed, budget: Budget) -> None:
        """Put new hop(s), rebuilt from the kept inputs, in place of the failed hop `index`.

        The current step's input (the last one kept at that boundary) is not replayed: the
        caller sends it next, to the first new hop. The old hop's session is closed (a peer
        that is only full gets its pages back).

        Raises:
            LayerswarmError, NoRouteError, SwarmBusy: the step's budget ran out, or no path.
        """
        old = self.hops[index]
        if old.span.start in self.lacking:  # `recover` restarts instead
            raise LayerswarmError(f"layers {old.span} lack a cached prefix's inputs: restart")
        t0 = time.perf_counter()
        avoid: set[str] = set()
        self.failed(failure, avoid)
        budget.spend(failure)
        await self.calls.close([old])
        while True:
            new = await self.open_path(old.span, avoid, budget)
            try:
                await self.replay(new, self.history.get(old.span.start, [])[:-1])
                break
            except HopFailed as e:
                self.failed(e, avoid)
                await self.calls.close(new)
                budget.spend(e)
        self.hops[index : index + 1] = new
        self.reroute_seconds.append(time.perf_counter() - t0)
        news = f"rerouted layers {old.span} from {host(old.view.address)} to " + ", ".join(
            f"{host(h.view.address)} ({h.span})" for h in new
        )
        metrics.note_event("reroute", news)
        self.swarm.on_event(news)

    async def restart(self, failure: HopFailed, start: int, budget: Budget) -> None:
        """A new path for every layer, rebuilt from the inputs kept before position `start`."""
        avoid: set[str] = set()
        self.failed(failure, avoid)
        budget.spend(failure)
        await self.calls.close(self.hops)
        first, end = self.hops[0].span.start, self.hops[-1].span.end
        before = [(s, h) for s, h in self.history.get(first, []) if s < start]
        while True:
            self.history = {first: list(before)}
            new = await self.open_path(Span(first, end), avoid, budget)
            try:
                await self.replay(new, before)
                break
            except HopFailed as e:
                self.failed(e, avoid)
                await self.calls.close(new)
                budget.spend(e)
        self.hops = new
        self.lacking = set()  # every boundary's inputs came from the replay

    async def replay(self, hops: list[ActiveHop], inputs: list[tuple[int, torch.Tensor]]) -> None:
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
            inputs = await self._through(hop, inputs)

    async def _through(self, hop: ActiveHop, inputs: KeptInputs) -> KeptInputs:
        outputs = [await self.calls.step(hop, h, start) for start, h in inputs]
        return [(start, out) for (start, _), out in zip(inputs, outputs, strict=True)]

    async def fill(self, index: int) -> None:
        """Give the boundary of hop `index` the inputs a cached prefix skipped: every input
        kept at the first boundary runs through the hops before it again (they start over
        from position 0, a prefill), and each boundary on the way keeps what comes out.

        Raises:
            HopFailed: a hop before it failed (the boundary still lacks them).
        """
        boundary = self.hops[index].span.start
        if boundary not in self.lacking:
            return
        first = self.hops[0].span.start
        inputs = merge_inputs(self.history.get(first, []), self.config.replay_chunk_tokens)
        for hop in self.hops[:index]:
            inputs = await self._through(hop, inputs)
            self.history[hop.span.end] = list(inputs)
            self.lacking.discard(hop.span.end)

    async def fork(self) -> Route:
        """A route for a fork of this session: the same hops, each session forked there
        (sharing its pages), the kept inputs shared. Where a fork fails, the new route is
        rebuilt from the kept inputs on a path of its own.

        Raises:
            LayerswarmError, NoRouteError, SwarmBusy: as `restart`; ClientBug.
        """
        child = Route(self.swarm, self.max_length)
        child.history = {b: list(kept) for b, kept in self.history.items()}
        child.lacking = set(self.lacking)
        child.hops = [ActiveHop(h.view, h.span, h.conn) for h in self.hops]
        try:
            for hop, parent in zip(child.hops, self.hops, strict=True):
                await self.calls.open(
                    hop, self.max_length, self.config.push, fork_of=parent.session_id
                )
        except HopFailed as e:
            await child.restart(e, 2**62, child.budget())  # every kept input, on new hops
        return child

    def keep(self, boundary: int, start: int, hidden: torch.Tensor) -> None:
        """Keep an input of `boundary`, in position order (chunks may come out of order)."""
        kept = self.history.setdefault(boundary, [])
        at = len(kept)
        while at > 0 and kept[at - 1][0] > start:
            at -= 1
        kept.insert(at, (start, hidden))

    def truncate(self, start: int) -> None:
        """Forget every kept input from position `start` on (a speculative step's rollback)."""
        for boundary, inputs in self.history.items():
            self.history[boundary] = truncate_inputs(inputs, start)

    async def close(self) -> None:
        hops, self.hops = self.hops, []
        await self.calls.close(hops)


def _ranges(layers: Sequence[int]) -> str:
    """`[3, 4, 5, 9]` as `3-5, 9`."""
    parts: list[str] = []
    for layer in layers:
        if parts and int(parts[-1].split("-")[-1]) == layer - 1:
            parts[-1] = f"{parts[-1].split('-')[0]}-{layer}"
        else:
            parts.append(str(layer))
    return ", ".join(parts)
