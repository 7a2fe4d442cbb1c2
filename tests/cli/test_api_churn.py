"""Several users through `swarm-api` while peers are killed with SIGKILL and restarted.

Real processes: four peers (two replicas of 0:15 and of 15:30) given to `swarm-api` as
`host:port`, the README's form, and three users asking greedy questions in a loop with the
official `openai` client (no retries of its own). A churner kills a random peer and restarts it
on the same key and port, four times; once it kills both replicas of one span at
the same moment, so that for a while no peer serves those layers: requests then wait for them
(`--route-wait`) instead of failing. Every reply must equal the quiet swarm's, with no 5xx.
"""

from __future__ import annotations

import random
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import openai
import pytest

from layerswarm.peer.launch import PeerProcess, start_peer
from layerswarm.shards.config import Span

pytestmark = pytest.mark.slow

QUESTIONS = ["What is the capital of France?", "Name three primary colors.", "What do bees make?"]
MAX_TOKENS = 12


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Replica:
    """One peer slot: a span, a key and a port that every restart reuses."""

    def __init__(self, model: Path, span: Span, workdir: Path, n: int) -> None:
        self.model, self.span, self.workdir = model, span, workdir
        self.args = ["--key", str(workdir / f"r{n}.key"), "--port", str(free_port())]
        self.peer: PeerProcess | None = None
        self.start()

    def start(self) -> None:
        self.peer = start_peer(self.model, self.span, self.workdir, self.args)

    def kill(self) -> None:
        assert self.peer is not None
        self.peer.stop(signal.SIGKILL)
        self.peer = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.args[-1]}"  # host:port, as the README writes it


@pytest.fixture
def replicas(smollm2_dir: Path, tmp_path: Path) -> Iterator[list[Replica]]:
    made: list[Replica] = []
    try:
        for n, span in enumerate([Span(0, 15), Span(0, 15), Span(15, 30), Span(15, 30)]):
            made.append(Replica(smollm2_dir, span, tmp_path, n))
        yield made
    finally:
        for replica in made:
            if replica.peer is not None:
                replica.peer.stop()


def churn(replicas: list[Replica], kills: list[str]) -> None:
    """Kill and restart peers: one at a time while its twin serves, and once both replicas of
    15:30 together (a gap in coverage while they load again); a pause before each."""
    rng = random.Random(5)
    for event in ("one", "gap", "one", "one"):
        time.sleep(rng.uniform(2.0, 5.0))
        victims = [r for r in replicas if r.span == Span(15, 30)]
        if event == "one":
            victims = [rng.choice(replicas)]
        for r in victims:
            r.kill()
        kills.append(" and ".join(str(r.span) for r in victims))
        for r in victims:
            r.start()


def test_users_get_the_quiet_replies_while_peers_are_killed_and_restarted(
    smollm2_dir: Path,
    replicas: list[Replica],
    open_api: Callable[..., AbstractContextManager[str]],
    tmp_path: Path,
) -> None:
    log = tmp_path / "api.log"
    peers = [r.address for r in replicas]
    with open_api(smollm2_dir, peers, ("--route-wait", "60"), log=log) as url:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=300)

        def ask(question: str) -> str:
            reply = client.chat.completions.create(
                model="smollm2-135m",
                messages=[{"role": "user", "content": question}],
                max_tokens=MAX_TOKENS,
                temperature=0,
            )
            return reply.choices[0].message.content or ""

        quiet = {q: ask(q) for q in QUESTIONS}
        churning = threading.Event()
        churning.set()
        kills: list[str] = []
        replies: list[tuple[str, str]] = []
        errors: list[BaseException] = []

        def user(n: int) -> None:
            i = n
            while churning.is_set():
                question = QUESTIONS[i % len(QUESTIONS)]
                try:
                    replies.append((question, ask(question)))
                except Exception as e:  # an HTTP error fails the test below, with its reason
                    errors.append(e)
                i += 1

        users = [threading.Thread(target=user, args=(n,)) for n in range(3)]
        for t in users:
            t.start()
        try:
            churn(replicas, kills)
        finally:
            churning.clear()
        for t in users:
            t.join(timeout=600)
    assert not errors, (errors[:3], log.read_text()[-3000:])
    assert "15:30 and 15:30" in kills
    assert "no peer serves layers 15-29 now: waiting for one" in log.read_text()  # the gap
    assert replies
    wrong = [(q, got) for q, got in replies if got != quiet[q]]
    assert not wrong, wrong


def test_a_streamed_tool_call_survives_kill_9_of_its_last_hop(
    smollm2_dir: Path,
    replicas: list[Replica],
    open_api: Callable[..., AbstractContextManager[str]],
) -> None:
    """A forced tool call, streamed, whose last hop dies mid-reply: the grammar's state lives in
    the client's sampler, so the call completes, validates, and equals the undisturbed one. The
    reply starts on the pages its undisturbed twin left on the peers (the prefix cache), so the
    route is rebuilt whole from the first boundary (`Route.recover`)."""
    import json

    import httpx
    import jsonschema

    from tests.cli.test_api import BREAD, STEPS

    tool = {"type": "function", "function": {"name": "bake", "parameters": STEPS}}
    args: dict[str, Any] = {
        "model": "smollm2-135m",
        "messages": BREAD,
        "tools": [tool],
        "tool_choice": "required",
        "temperature": 0,
        "max_tokens": 200,
    }
    with open_api(smollm2_dir, [r.address for r in replicas]) as url:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=300)
        undisturbed = client.chat.completions.create(**args).choices[0]
        assert undisturbed.finish_reason == "tool_calls"
        assert (
            undisturbed.message.tool_calls
            and len(json.loads(undisturbed.message.tool_calls[0].function.arguments)) > 0
        )
        killed: list[Span] = []
        state_url = url.rsplit("/v1", 1)[0] + "/dashboard/state"

        def kill_mid_reply() -> None:
            deadline = time.monotonic() + 120
            while not killed and time.monotonic() < deadline:
                for route in httpx.get(state_url, timeout=30).json()["routes"]:
                    if route["steps"] >= 10 and route["hops"]:
                        address = route["hops"][-1]["address"].split("/")[0]
                        victim = next(r for r in replicas if r.address == address)
                        victim.kill()
                        killed.append(victim.span)
                        return
                time.sleep(0.05)

        killer = threading.Thread(target=kill_mid_reply)
        killer.start()
        name, arguments, reasons = "", "", []
        for chunk in client.chat.completions.create(**args, stream=True):
            for choice in chunk.choices:
                reasons.append(choice.finish_reason)
                for call in choice.delta.tool_calls or []:
                    name += call.function.name or ""
                    arguments += call.function.arguments or ""
        killer.join()
    assert killed == [Span(15, 30)]  # the kill landed while the call was being generated
    expected = undisturbed.message.tool_calls[0].function
    assert (name, arguments) == (expected.name, expected.arguments)
    jsonschema.validate(json.loads(arguments), STEPS)
    assert reasons[-1] == "tool_calls"
