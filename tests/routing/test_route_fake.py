"""The route and the step strategies against in-memory fake hops, under failure schedules.

`FakeHop` (a fake, named so) stands in for a peer process and its connection: it keeps a KV
cache of its own per session and computes a toy layer whose output depends on every input the
session saw before (so a replay that lost or doubled a token gives a wrong answer). It speaks
the real messages (`OpenSession`, `Step` with a push route, `Collect`, `CloseSession`) and
fails on a schedule: it dies, answers busy, sends NaN, says it is leaving, or forgets a session.

For every schedule that leaves a replica of each span, the reply must equal the undisturbed
one; no session may stay open on any hop; no healthy hop may be banned; and no step may try
more failed peers than its budget.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from layerswarm.errors import LayerswarmError, NoRouteError, PeerUnavailable, RemoteError
from layerswarm.routing.client_config import ClientConfig
from layerswarm.routing.failures import ClientBug
from layerswarm.routing.hop_calls import HopCalls
from layerswarm.routing.paths import PeerView
from layerswarm.routing.peer_book import PeerBook
from layerswarm.routing.session import RemoteSession
from layerswarm.shards.config import Span
from layerswarm.swarm.protocol import (
    Closed,
    CloseSession,
    Collect,
    ErrorCode,
    InfoReply,
    InfoRequest,
    OpenSession,
    Pushed,
    SessionOpened,
    Step,
    StepResult,
)
from layerswarm.swarm.push import forward_failure

LAYERS = 6
HIDDEN = 4
PROMPT = 5  # tokens
DECODE = 6  # one-token steps after the prompt


def toy_layers(span: Span, hidden: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
    """A toy span, causal as attention is: each layer adds its index and a share of every
    input before; the output for `hidden (1, T, H)` after `past (1, P, H)` (what the session
    saw before this step, in order). Split anywhere, the spans compose to the whole."""
    seen = torch.cat([past, hidden], dim=1)  # (1, P + T, H)
    for layer in range(span.start, span.end):
        seen = seen + 0.01 * seen.cumsum(dim=1) + layer
    return seen[:, past.shape[1] :]


@dataclass
class Fault:
    """What a fake hop does at its `at`-th step (counted over every session it serves)."""

    at: int
    kind: str  # die | busy | nan | leaving | forget


@dataclass
class FakeHop:
    """A fake peer and its connection, in this process (named so: a test double)."""

    peer_id: str
    span: Span
    swarm: FakeSwarm
    seconds_per_layer: float = 0.01  # what its view claims: the router prefers the fastest
    faults: list[Fault] = field(default_factory=list)
    sessions: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # inputs, in order
    spans: dict[str, Span] = field(default_factory=dict)  # the layers each session runs
    outputs: dict[tuple[str, int], asyncio.Future[torch.Tensor]] = field(default_factory=dict)
    steps: int = 0
    opens: int = 0
    dead: bool = False
    closed: bool = False  # as `Connection.closed`

    @property
    def view(self) -> PeerView:
        return PeerView(
            self.peer_id, f"127.0.0.1:1/{self.peer_id}", self.span, self.seconds_per_layer
        )

    async def request(self, msg: object, timeout: float | None = None) -> object:
        await asyncio.sleep(0)  # a real request yields to the loop
        if self.dead:
            raise PeerUnavailable(f"fake hop {self.peer_id} is dead")
        if isinstance(msg, InfoRequest):
            return InfoReply(
                peer_id=self.peer_id,
                model="fake",
                num_layers=LAYERS,
                span_start=self.span.start,
                span_end=self.span.end,
                dtype="float32",
                cache_tokens_free=1000,
                cache_tokens_total=1000,
                active_sessions=len(self.sessions),
                extra={"queued_tokens": 0},
            )
        if isinstance(msg, OpenSession):
            self.opens += 1
            if not self.span.start <= msg.span_start < msg.span_end <= self.span.end:
                raise RemoteError(ErrorCode.BAD_SPAN, "not my layers")
            self.sessions[msg.session_id] = []
            self.spans[msg.session_id] = Span(msg.span_start, msg.span_end)
            return SessionOpened(msg.session_id)
        if isinstance(msg, CloseSession):
            self.sessions.pop(msg.session_id, None)
            return Closed(msg.session_id)
        if isinstance(msg, Collect):
            # As on a peer: the collect goes on when the client stops waiting for it, and
            # takes the output once it comes (`peer/forward.py`).
            served = asyncio.ensure_future(self._collect((msg.session_id, msg.start_position)))
            self.swarm.tasks.add(served)
            return StepResult(msg.session_id, await asyncio.shield(served))
        if isinstance(msg, Step):
            return await self._step(msg)
        raise AssertionError(f"the client sent {msg!r}")

    async def _collect(self, key: tuple[str, int]) -> torch.Tensor:
        future = self._output(key)
        try:
            return await future
        finally:
            if self.outputs.get(key) is future:
                del self.outputs[key]

    def _output(self, key: tuple[str, int]) -> asyncio.Future[torch.Tensor]:
        if key not in self.outputs or self.outputs[key].cancelled():
            self.outputs[key] = asyncio.get_running_loop().create_future()
        return self.outputs[key]

    def _fault_now(self) -> str | None:
        self.steps += 1
        for fault in self.faults:
            if fault.at == self.steps:
                return fault.kind
        return None

    async def _step(self, msg: Step) -> object:
        fault = self._fault_now()
        if fault == "die":
            self.die()
            raise PeerUnavailable(f"fake hop {self.peer_id} died")
        if fault == "busy":
            raise RemoteError(ErrorCode.BUSY, "too many sessions")
        if fault == "leaving":
            self.swarm.leaving.add(self.peer_id)
            raise RemoteError(ErrorCode.SHUTTING_DOWN, "stopping")
        if fault == "forget":
            self.sessions.pop(msg.session_id, None)
        past = self.sessions.get(msg.session_id)
        if past is None:
            raise RemoteError(ErrorCode.UNKNOWN_SESSION, "no such session")
        start = msg.start_position
        if msg.truncate_to is not None:
            del past[msg.truncate_to :]
        if start != len(past):
            raise RemoteError(ErrorCode.BAD_POSITION, f"at {len(past)}, asked {start}")
        before = torch.stack(past).unsqueeze(0) if past else torch.zeros(1, 0, HIDDEN)
        out = toy_layers(self.spans[msg.session_id], msg.hidden, before)
        past.extend(msg.hidden[0].unbind(0))
        if fault == "nan":
            out = out * float("nan")
        future = self._output((msg.session_id, start))
        if future.done():  # a step redone at the same position: the newest output counts
            self.outputs[(msg.session_id, start)] = future = (
                asyncio.get_running_loop().create_future()
            )
        future.set_result(out)
        if msg.route is None:  # a relayed step: reply with its output
            return StepResult(msg.session_id, out)
        if not msg.route:  # the last hop of a pushed step: the client collects its output
            return Pushed(msg.session_id)
        head, rest = msg.route[0], msg.route[1:]
        target = self.swarm.hops[head.address.rpartition("/")[2]]
        pushed = Step(  # the same step, as a peer hands it on (`peer/forward.py`)
            head.session_id, out, start, route=rest, token=head.token, truncate_to=msg.truncate_to
        )
        try:
            await target.request(pushed)
        except PeerUnavailable:
            message = forward_failure(target.peer_id, "unreachable", "it died")
            raise RemoteError(ErrorCode.FORWARD_FAILED, message) from None
        except RemoteError as e:
            if e.code == ErrorCode.FORWARD_FAILED:
                raise
            message = forward_failure(target.peer_id, e.code, e.message)
            raise RemoteError(ErrorCode.FORWARD_FAILED, message) from None
        return Pushed(msg.session_id)

    def die(self) -> None:
        self.dead = self.closed = True
        self.sessions.clear()
        for future in self.outputs.values():
            if not future.done():
                future.set_exception(PeerUnavailable(f"fake hop {self.peer_id} died"))
                future.exception()  # retrieved: a collect nobody waits on is not an error


class FakeSwarm:
    """The swarm client as a route sees it, over fake hops (the `route.Swarm` protocol)."""

    def __init__(self, config: ClientConfig, spans: list[list[Span]]) -> None:
        self.config = config
        self.book = PeerBook(config.ban_seconds, config.max_ban_seconds)
        self.calls = HopCalls(config, self.book.stats)
        self.rng = random.Random(0)
        self.hops: dict[str, FakeHop] = {}
        for replica, tiling in enumerate(spans):
            for span in tiling:
                peer_id = f"hop-{span.start}-{span.end}-{replica}"
                # the first tiling is by far the fastest, so routes start on it whatever the
                # router's random spread (`choose_path`), and fail over to the others
                speed = 0.001 * 1000.0**replica
                self.hops[peer_id] = FakeHop(peer_id, span, self, speed)
        self.leaving: set[str] = set()
        self.events: list[str] = []
        self.tasks: set[asyncio.Future[torch.Tensor]] = set()  # collects the hops still serve
        self.local = None
        self.verify_counts = {"match": 0, "mismatch": 0, "error": 0}
        self.last_refresh = float("inf")  # sessions do not re-read the swarm first
        self.net = None

        class Model:
            num_layers = LAYERS

        self.model_config = Model()

    def views(self) -> list[PeerView]:
        return [h.view for h in self.hops.values() if not h.dead and h.peer_id not in self.leaving]

    def connection(self, peer_id: str) -> FakeHop:  # type: ignore[override]
        return self.hops[peer_id]

    def is_leaving(self, peer_id: str) -> bool:
        return peer_id in self.leaving

    def on_event(self, text: str) -> None:
        self.events.append(text)

    def liars_note(self, layers: list[int]) -> str:
        return ""

    async def refresh(self) -> None:
        return None


def config(push: bool, chunk: int = 0, max_reroutes: int = 8) -> ClientConfig:
    return ClientConfig(
        push=push,
        prefill_chunk_tokens=chunk,
        verify_fraction=0.0,
        verify_first_steps=0,
        max_reroutes=max_reroutes,
        route_wait=0.2,
        busy_wait_timeout=2.0,
        step_timeout_floor=5.0,
    )


TWO_REPLICAS = [[Span(0, 3), Span(3, 6)], [Span(0, 2), Span(2, 6)], [Span(0, 6)]]


def inputs() -> list[tuple[int, torch.Tensor]]:
    gen = torch.Generator().manual_seed(7)
    prompt = torch.randn(1, PROMPT, HIDDEN, generator=gen)
    steps = [(0, prompt)]
    steps += [(PROMPT + i, torch.randn(1, 1, HIDDEN, generator=gen)) for i in range(DECODE)]
    return steps


def reference() -> list[torch.Tensor]:
    whole, past, outs = Span(0, LAYERS), torch.zeros(1, 0, HIDDEN), []
    for _, hidden in inputs():
        outs.append(toy_layers(whole, hidden, past))
        past = torch.cat([past, hidden], dim=1)
    return outs


async def run_reply(swarm: FakeSwarm) -> list[torch.Tensor]:
    session = RemoteSession(swarm, 64)  # type: ignore[arg-type]
    try:
        await session.open()
        return [await session.aforward(hidden, start) for start, hidden in inputs()]
    finally:
        await session.aclose()
        for task in swarm.tasks:  # collects nobody took: as a peer does when they time out
            task.cancel()
        await asyncio.gather(*swarm.tasks, return_exceptions=True)


def check_invariants(swarm: FakeSwarm, faulty: set[str]) -> None:
    leaks = {p: list(h.sessions) for p, h in swarm.hops.items() if h.sessions and not h.dead}
    assert not leaks, f"sessions left open: {leaks}"
    banned = swarm.book.bans.banned()
    assert banned <= faulty, f"healthy hops banned: {banned - faulty}"


SCHEDULES = {
    "quiet": {},
    "first hop dies at the prompt": {"hop-0-3-0": [Fault(1, "die")]},
    "last hop dies mid-reply": {"hop-3-6-0": [Fault(4, "die")]},
    "a hop sends NaN": {"hop-3-6-0": [Fault(3, "nan")]},
    "a hop is busy twice": {"hop-0-3-0": [Fault(2, "busy"), Fault(3, "busy")]},
    "a hop is leaving": {"hop-3-6-0": [Fault(2, "leaving")]},
    "a hop forgets the session": {"hop-0-3-0": [Fault(3, "forget")]},
    "two hops die one after the other": {
        "hop-0-3-0": [Fault(2, "die")],
        "hop-0-2-1": [Fault(2, "die")],
    },
}


@pytest.mark.parametrize("push", [True, False], ids=["push", "relay"])
@pytest.mark.parametrize("name", list(SCHEDULES))
def test_a_schedule_leaving_a_replica_of_each_span_gives_the_same_reply(
    name: str, push: bool
) -> None:
    swarm = FakeSwarm(config(push), TWO_REPLICAS)
    for peer_id, faults in SCHEDULES[name].items():
        swarm.hops[peer_id].faults = list(faults)
    outs = asyncio.run(run_reply(swarm))
    for got, want in zip(outs, reference(), strict=True):
        torch.testing.assert_close(got, want)
    faulty = {p for p, h in swarm.hops.items() if any(f.kind in ("die", "nan") for f in h.faults)}
    check_invariants(swarm, faulty)
    assert swarm.hops["hop-0-3-0"].steps > 0  # the route started on the first tiling
    if SCHEDULES[name]:
        assert swarm.events  # a reroute or a wait was told


def test_a_flowing_prefill_restarts_after_a_failure_and_gives_the_same_reply() -> None:
    swarm = FakeSwarm(config(push=True, chunk=2), TWO_REPLICAS)
    swarm.hops["hop-3-6-0"].faults = [Fault(2, "die")]  # the prompt's second chunk
    outs = asyncio.run(run_reply(swarm))
    for got, want in zip(outs, reference(), strict=True):
        torch.testing.assert_close(got, want)
    check_invariants(swarm, {"hop-3-6-0"})
    assert any("during a prefill" in e for e in swarm.events)


def test_a_hop_busy_at_a_flowing_prefills_first_chunk_is_waited_out_not_called_our_bug() -> None:
    """The chunks after the refused one reach that hop with a gap before them (`bad_position`,
    our bug if alone): the earlier chunk's failure is what happened (found by hypothesis)."""
    swarm = FakeSwarm(config(True, 2), TWO_REPLICAS)
    swarm.hops["hop-3-6-0"].faults.append(Fault(1, "busy"))
    outs = asyncio.run(run_reply(swarm))
    for got, want in zip(outs, reference(), strict=True):
        torch.testing.assert_close(got, want)
    check_invariants(swarm, set())


def test_our_own_malformed_request_is_raised_at_once_not_retried() -> None:
    swarm = FakeSwarm(config(push=True), TWO_REPLICAS)
    hop = swarm.hops["hop-0-3-0"]

    async def refuse(msg: Step) -> object:
        raise RemoteError(ErrorCode.PROTOCOL, "route[0].address must name the peer ID")

    hop._step = refuse  # type: ignore[method-assign]
    with pytest.raises(ClientBug, match="must name the peer ID"):
        asyncio.run(run_reply(swarm))
    assert sum(h.opens for h in swarm.hops.values()) <= 3  # one path opened, no retries
    assert not swarm.book.bans.banned()


def test_a_step_tries_no_more_failed_peers_than_its_budget() -> None:
    spans = [[Span(0, 6)] for _ in range(6)]  # six replicas of everything, all dying
    swarm = FakeSwarm(config(push=False, max_reroutes=2), spans)
    for hop in swarm.hops.values():
        hop.faults = [Fault(1, "die")]
    with pytest.raises(LayerswarmError, match="too many peers failed"):
        asyncio.run(run_reply(swarm))
    assert sum(h.opens for h in swarm.hops.values()) == 3  # the first and two reroutes


def test_layers_no_live_peer_serves_are_waited_for_then_named() -> None:
    swarm = FakeSwarm(config(push=True), [[Span(0, 3), Span(3, 6)]])
    swarm.hops["hop-3-6-0"].faults = [Fault(2, "die")]
    with pytest.raises(NoRouteError) as e:
        asyncio.run(run_reply(swarm))
    assert e.value.missing_layers == [3, 4, 5]
    assert any("no peer serves layers 3-5 now: waiting" in ev for ev in swarm.events)


def test_a_peer_that_comes_back_within_the_wait_is_used() -> None:
    swarm = FakeSwarm(replace_wait(config(push=True), 5.0), [[Span(0, 3), Span(3, 6)]])
    lost = swarm.hops["hop-3-6-0"]
    lost.faults = [Fault(2, "die")]

    async def bring_back() -> None:
        while not lost.dead:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)
        swarm.hops["hop-3-6-back"] = FakeHop("hop-3-6-back", Span(3, 6), swarm)

    async def both() -> list[torch.Tensor]:
        back = asyncio.ensure_future(bring_back())
        try:
            return await run_reply(swarm)
        finally:
            await back

    outs = asyncio.run(both())
    for got, want in zip(outs, reference(), strict=True):
        torch.testing.assert_close(got, want)


def replace_wait(config: ClientConfig, seconds: float) -> ClientConfig:
    from dataclasses import replace

    return replace(config, route_wait=seconds)


KINDS = ["die", "busy", "nan", "leaving", "forget"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    push=st.booleans(),
    chunk=st.sampled_from([0, 2]),
    faults=st.lists(
        st.tuples(
            st.sampled_from(["hop-0-3-0", "hop-3-6-0", "hop-0-2-1", "hop-2-6-1"]),
            st.integers(1, 8),
            st.sampled_from(KINDS),
        ),
        max_size=4,
    ),
)
def test_random_schedules_that_leave_the_whole_span_replica_give_the_same_reply(
    push: bool, chunk: int, faults: list[tuple[str, int, str]]
) -> None:
    """Whatever the two tilings suffer, the third replica (0:6) stays healthy."""
    swarm = FakeSwarm(config(push, chunk), TWO_REPLICAS)
    for peer_id, at, kind in faults:
        swarm.hops[peer_id].faults.append(Fault(at, kind))
    outs = asyncio.run(run_reply(swarm))
    for got, want in zip(outs, reference(), strict=True):
        torch.testing.assert_close(got, want)
    faulty = {p for p, h in swarm.hops.items() if any(f.kind in ("die", "nan") for f in h.faults)}
    check_invariants(swarm, faulty)
