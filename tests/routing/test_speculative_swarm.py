"""Speculative decoding through real peer processes: the same replies, every peer rolled back,
failover mid-speculation, and the user's commands reaching it."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from layerswarm.peer.launch import LocalSwarm, start_peers
from layerswarm.routing.client import AsyncClient, Client
from layerswarm.routing.conversation import ChatSession
from layerswarm.routing.drafters import open_speculator
from layerswarm.routing.generate import Generator, Pipeline
from layerswarm.routing.sampling import SamplingConfig
from layerswarm.routing.session import RemoteSession
from layerswarm.routing.swarm_client import ClientConfig, SwarmClient, open_swarm_generator
from layerswarm.shards.config import Span
from layerswarm.swarm.protocol import InfoReply, InfoRequest, JsonValue

from .test_speculative import prompts

GREEDY = SamplingConfig(max_new_tokens=40, temperature=0.0)
PAGE = 16  # unit: tokens per KV page on a peer


@pytest.fixture(scope="module")
def swarm(tiny_words_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSwarm]:
    with start_peers(tiny_words_dir, [Span(0, 2), Span(2, 4)], tmp_path_factory.mktemp("s")) as s:
        yield s


def peer_extras(gen: Generator) -> dict[str, dict[str, JsonValue]]:
    """Each peer's `InfoReply.extra`, by peer ID."""
    client: SwarmClient = gen.client  # type: ignore[attr-defined]
    out = {}
    for link in client.links:
        assert link.conn is not None
        info = client.net.run(link.conn.request(InfoRequest()))
        assert isinstance(info, InfoReply)
        out[link.conn.peer_id] = info.extra
    return out


def recording(gen: Generator) -> list[RemoteSession]:
    """The sessions `gen` opens from now on."""
    opened: list[RemoteSession] = []
    open_pipeline = gen.open_pipeline

    async def open_and_record(max_length: int) -> Pipeline:
        session = await open_pipeline(max_length)
        assert isinstance(session, RemoteSession)
        opened.append(session)
        return session

    gen.open_pipeline = open_and_record  # type: ignore[method-assign]
    return opened


@pytest.mark.parametrize(
    ("mode", "quant", "push"),
    [("lookup", None, True), ("lookup", None, False), ("draft", "int8", True)],
    ids=["lookup-push", "lookup-relay", "draft-push"],
)
def test_speculative_greedy_equals_plain_greedy_and_every_peer_rolls_back(
    swarm: LocalSwarm, tiny_words_dir: Path, mode: str, quant: str | None, push: bool
) -> None:
    gen = open_swarm_generator(tiny_words_dir, swarm.addresses, config=ClientConfig(push=push))
    plain = [list(gen.tokens(p, GREEDY)) for p in prompts()]
    gen.speculator = open_speculator(gen, mode, tiny_words_dir, None, quant)
    sessions = recording(gen)
    before = peer_extras(gen)
    for p, expected in zip(prompts(), plain, strict=True):
        assert list(gen.tokens(p, GREEDY)) == expected
        assert gen.last_stats.tokens_per_pass > 1
    asked = sum(s.rolled_back for s in sessions)
    steps = sum(s.truncations for s in sessions)
    assert asked > 0  # some guesses fell
    for peer_id, after in peer_extras(gen).items():
        rolled = after["rolled_back_tokens"] - before[peer_id]["rolled_back_tokens"]  # type: ignore[operator]
        assert rolled == asked, f"peer {peer_id} dropped {rolled} tokens, the client asked {asked}"
        # With push, the second hop gets `truncate_to` from the first: the field travels on.
        told = after["truncating_steps"] - before[peer_id]["truncating_steps"]  # type: ignore[operator]
        assert told == steps, f"peer {peer_id} got {told} rollbacks of {steps}"
        assert after["session_tokens"] == after["kv_pages_used"] == 0  # replies closed theirs
    gen.client.close()  # type: ignore[attr-defined]


def test_every_peer_holds_what_a_speculative_conversation_holds(
    swarm: LocalSwarm, tiny_words_dir: Path
) -> None:
    gen = open_swarm_generator(tiny_words_dir, swarm.addresses)
    gen.speculator = open_speculator(gen, "lookup", tiny_words_dir)
    chat, context = ChatSession(gen), []
    for turn in prompts(2):
        context += turn
        context += list(chat.tokens(context, GREEDY))
        session = chat.pipeline
        assert isinstance(session, RemoteSession)
        for peer_id, extra in peer_extras(gen).items():
            # Fallen guesses of the last pass are dropped by the next step; none before.
            assert extra["session_tokens"] == session.length, peer_id
            assert extra["kv_pages_used"] == -(-session.length // PAGE), peer_id
    assert session.rolled_back > 0
    chat.close()
    gen.client.close()  # type: ignore[attr-defined]


def test_speculation_with_every_step_checked_then_kill_9_of_a_peer_mid_speculation(
    tiny_words_dir: Path, tmp_path: Path
) -> None:
    spans = [Span(0, 2), Span(0, 2), Span(2, 4), Span(2, 4)]
    cfg = SamplingConfig(max_new_tokens=64, temperature=0.0)
    prompt = prompts(1)[0]
    with start_peers(tiny_words_dir, spans, tmp_path) as four:
        # The client relaying, every step re-run on the other replica: its shadow session
        # rolls back as the hop's session does.
        checked = ClientConfig(push=False, verify_fraction=1.0)
        gen = open_swarm_generator(tiny_words_dir, four.addresses, config=checked)
        reference = list(gen.tokens(prompt, cfg))
        assert len(reference) == 64
        gen.speculator = open_speculator(gen, "lookup", tiny_words_dir)
        sessions = recording(gen)
        assert list(gen.tokens(prompt, cfg)) == reference
        assert sessions[0].rolled_back > 0
        swarm = gen.client  # type: ignore[attr-defined]
        assert swarm.verify_counts["mismatch"] == 0 and swarm.verify_counts["match"] > 0
        swarm.close()

        # Push (the default), and the second hop's peer killed mid-speculation.
        events: list[str] = []
        gen = open_swarm_generator(tiny_words_dir, four.addresses, on_event=events.append)
        gen.speculator = open_speculator(gen, "lookup", tiny_words_dir)
        sessions = recording(gen)
        tokens: list[int] = []
        for token in gen.tokens(prompt, cfg):
            tokens.append(token)
            if len(tokens) == 24:
                assert sessions[0].rolled_back > 0  # the kept inputs were cut already
                victim = sessions[0].hops[1].view.peer_id
                next(p for p in four.peers if p.peer_id == victim).stop(signal.SIGKILL)
        assert tokens == reference
        assert any("rerouted" in e for e in events)
        gen.client.close()  # type: ignore[attr-defined]


def test_the_client_and_swarm_chat_speculate_when_asked(
    swarm: LocalSwarm, tiny_words_dir: Path
) -> None:
    question = "t5 t6 t7 t5 t6"
    gen = open_swarm_generator(tiny_words_dir, swarm.addresses)
    plain = "".join(gen.chat([{"role": "user", "content": question}], GREEDY)) + "\n"
    gen.client.close()  # type: ignore[attr-defined]
    assert len(plain.split()) > 10

    async def ask_async() -> str:
        client = await AsyncClient.connect(
            str(tiny_words_dir), peers=swarm.addresses, speculate="lookup", temperature=0
        )
        try:
            return await client.generate(question, max_new_tokens=40)
        finally:
            await client.close()

    with Client.connect(str(tiny_words_dir), peers=swarm.addresses, speculate="lookup") as client:
        assert client.generate(question, max_new_tokens=40, temperature=0) + "\n" == plain
        assert client.generator.last_stats.tokens_per_pass > 1
    assert asyncio.run(ask_async()) + "\n" == plain
    peers = [arg for address in swarm.addresses for arg in ("--peer", address)]
    command = [sys.executable, "-m", "layerswarm.cli.chat", "--model", str(tiny_words_dir)]
    command += [*peers, "--prompt", question, "--temperature", "0", "--max-new-tokens", "40"]
    command += ["--speculate", "draft", "--draft-model", str(tiny_words_dir)]
    command += ["--draft-quant", "int8"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=os.environ)
    assert done.returncode == 0, done.stderr
    assert done.stdout == plain
