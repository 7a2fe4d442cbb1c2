"""Churn with real peer processes: kill -9 and SIGTERM mid-reply, and no token is lost."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from layerswarm.errors import NoRouteError
from layerswarm.peer.launch import LocalSwarm, PeerProcess, start_peer, start_peers
from layerswarm.routing.generate import Generator
from layerswarm.routing.sampling import SamplingConfig
from layerswarm.routing.session import RemoteSession
from layerswarm.routing.swarm_client import ClientConfig, open_swarm_generator
from layerswarm.shards.config import Span

GREEDY_128 = SamplingConfig(max_new_tokens=128, temperature=0.0)
STORY = [{"role": "user", "content": "Write a long story about a lighthouse keeper and a storm."}]
HALVES = [Span(0, 15), Span(0, 15), Span(15, 30), Span(15, 30)]


@pytest.fixture(scope="module")
def reference(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[int]:
    """The undisturbed greedy reply, generated through a swarm of the same shape."""
    with start_peers(smollm2_dir, HALVES[1:3], tmp_path_factory.mktemp("ref")) as swarm:
        gen = open_swarm_generator(smollm2_dir, swarm.addresses)
        tokens = list(gen.tokens(gen.tokenizer.encode_chat(STORY), GREEDY_128))
    assert len(tokens) == 128  # the story does not end early: the kill lands mid-reply
    return tokens


@pytest.fixture
def four_peers(smollm2_dir: Path, tmp_path: Path) -> Iterator[LocalSwarm]:
    with start_peers(smollm2_dir, HALVES, tmp_path) as swarm:
        yield swarm


def peer_in_use(gen: Generator, swarm: LocalSwarm, hop: int) -> PeerProcess:
    session = gen.active
    assert isinstance(session, RemoteSession)
    peer_id = session.hops[hop].view.peer_id
    return next(p for p in swarm.peers if p.peer_id == peer_id)


@pytest.mark.parametrize("hop", [0, 1])
def test_reply_survives_kill_9_of_the_peer_in_use(
    smollm2_dir: Path, four_peers: LocalSwarm, reference: list[int], hop: int
) -> None:
    events: list[str] = []
    gen = open_swarm_generator(smollm2_dir, four_peers.addresses, on_event=events.append)
    tokens = []
    for token in gen.tokens(gen.tokenizer.encode_chat(STORY), GREEDY_128):
        tokens.append(token)
        if len(tokens) == 40:
            peer_in_use(gen, four_peers, hop).stop(signal.SIGKILL)
    assert tokens == reference
    assert any("rerouted" in e for e in events)


def test_reply_survives_kill_9_of_the_first_hop_during_prefill(
    smollm2_dir: Path, four_peers: LocalSwarm
) -> None:
    # A long prompt, so that the first hop is busy with the prefill for a second or more.
    long_story = [{"role": "user", "content": "Summarise this. " + "The sea was calm. " * 400}]
    cfg = SamplingConfig(max_new_tokens=8, temperature=0.0)
    undisturbed = open_swarm_generator(smollm2_dir, four_peers.addresses)
    prompt = undisturbed.tokenizer.encode_chat(long_story)
    expected = list(undisturbed.tokens(prompt, cfg))

    gen = open_swarm_generator(smollm2_dir, four_peers.addresses)
    got: list[int] = []
    worker = threading.Thread(target=lambda: got.extend(gen.tokens(prompt, cfg)))
    worker.start()
    deadline = time.monotonic() + 30
    while not (isinstance(gen.active, RemoteSession) and gen.active.hops):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(0.3)  # the prefill has reached the first hop
    victim = peer_in_use(gen, four_peers, 0)
    victim.stop(signal.SIGKILL)
    worker.join(timeout=120)
    assert got == expected
    assert gen.active is None  # the reply finished and closed its session
    assert victim.process.returncode == -signal.SIGKILL


def test_sigterm_of_the_peer_in_use_moves_the_session_quietly(
    smollm2_dir: Path, four_peers: LocalSwarm, reference: list[int]
) -> None:
    events: list[str] = []
    gen = open_swarm_generator(smollm2_dir, four_peers.addresses, on_event=events.append)
    tokens = []
    for token in gen.tokens(gen.tokenizer.encode_chat(STORY), GREEDY_128):
        tokens.append(token)
        if len(tokens) == 30:
            assert peer_in_use(gen, four_peers, 1).stop(signal.SIGTERM) == 0
    assert tokens == reference
    assert any("leaving" in e for e in events) and any("rerouted" in e for e in events)


def test_missing_span_is_reported_then_a_returning_peer_is_used(
    smollm2_dir: Path, tmp_path: Path
) -> None:
    first = start_peer(smollm2_dir, Span(0, 15), tmp_path)
    key = tmp_path / "second.key"
    second = start_peer(smollm2_dir, Span(15, 30), tmp_path, ["--key", str(key)])
    try:
        # route_wait: how long a step waits for a peer of the missing layers before it errs
        config = ClientConfig(route_wait=1.0)
        gen = open_swarm_generator(smollm2_dir, [first.address, second.address], config=config)
        question = [{"role": "user", "content": "What is the capital of France?"}]
        assert "Paris" in "".join(gen.chat(question, SamplingConfig(max_new_tokens=16)))
        second.stop(signal.SIGKILL)
        with pytest.raises(NoRouteError) as e:
            "".join(gen.chat(question, SamplingConfig(max_new_tokens=16)))
        assert e.value.missing_layers == list(range(15, 30))
        assert "no peer serves layers 15-29" in str(e.value)
        # The same peer comes back at the same address, with the same key.
        back = ["--key", str(key), "--port", str(second.port)]
        second = start_peer(smollm2_dir, Span(15, 30), tmp_path, back)
        assert "Paris" in "".join(gen.chat(question, SamplingConfig(max_new_tokens=16)))
    finally:
        first.stop()
        second.stop()


def test_kill_restart_kill_during_one_reply_returns_to_the_restarted_peer(
    smollm2_dir: Path, tmp_path: Path, reference: list[int]
) -> None:
    """a1 serves 0:15, b1 and b2 15:30; kill -9 b1, restart it on its address, kill -9 b2: the
    reply must go back to b1, banned or not, although no new session ever refreshed."""
    a1 = start_peer(smollm2_dir, Span(0, 15), tmp_path)
    key = tmp_path / "b1.key"
    b1 = start_peer(smollm2_dir, Span(15, 30), tmp_path, ["--key", str(key)])
    b2 = start_peer(smollm2_dir, Span(15, 30), tmp_path)
    try:
        events: list[str] = []
        gen = open_swarm_generator(
            smollm2_dir, [a1.address, b1.address, b2.address], on_event=events.append
        )
        tokens = []
        for token in gen.tokens(gen.tokenizer.encode_chat(STORY), GREEDY_128):
            tokens.append(token)
            if len(tokens) == 20:
                b1.stop(signal.SIGKILL)
                b1 = start_peer(
                    smollm2_dir, Span(15, 30), tmp_path, ["--key", str(key), "--port", str(b1.port)]
                )
            if len(tokens) == 24:
                b2.stop(signal.SIGKILL)
        assert tokens == reference
        assert sum("rerouted" in e for e in events) >= 1
    finally:
        for peer in (a1, b1, b2):
            peer.stop()


def test_reply_survives_kill_9_after_1000_tokens_of_context(
    smollm2_dir: Path, four_peers: LocalSwarm
) -> None:
    """The new replica rebuilds 1,000 tokens of KV cache from the kept inputs (merged into large
    steps), and the greedy reply goes on exactly as if nothing happened."""
    story = [{"role": "user", "content": "Summarise this. " + "The sea was calm at dawn. " * 140}]
    cfg = SamplingConfig(max_new_tokens=24, temperature=0.0)
    undisturbed = open_swarm_generator(smollm2_dir, four_peers.addresses)
    prompt = undisturbed.tokenizer.encode_chat(story)
    assert len(prompt) >= 1000
    expected = list(undisturbed.tokens(prompt, cfg))
    assert len(expected) > 8

    events: list[str] = []
    gen = open_swarm_generator(smollm2_dir, four_peers.addresses, on_event=events.append)
    tokens = []
    for token in gen.tokens(prompt, cfg):
        tokens.append(token)
        if len(tokens) == 4:
            peer_in_use(gen, four_peers, 1).stop(signal.SIGKILL)
    assert tokens == expected
    assert any("rerouted" in e for e in events)


def test_a_busy_peer_is_given_time_not_banned(smollm2_dir: Path, four_peers: LocalSwarm) -> None:
    """A step far slower than the client expects (a long prefill, with a deadline floor of
    10 ms) is waited for while the peer answers probes: no ban, no reroute, the same reply."""
    story = [{"role": "user", "content": "Summarise this. " + "The sea was calm. " * 300}]
    cfg = SamplingConfig(max_new_tokens=4, temperature=0.0)
    patient = open_swarm_generator(smollm2_dir, four_peers.addresses)
    prompt = patient.tokenizer.encode_chat(story)
    expected = list(patient.tokens(prompt, cfg))

    events: list[str] = []
    hasty = ClientConfig(step_timeout_floor=0.01, step_timeout_factor=0.0)
    gen = open_swarm_generator(
        smollm2_dir, four_peers.addresses, config=hasty, on_event=events.append
    )
    assert list(gen.tokens(prompt, cfg)) == expected
    assert not any("rerouted" in e for e in events), events
    assert gen.client.bans.banned() == set()  # type: ignore[attr-defined]
