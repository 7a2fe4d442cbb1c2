"""Real peer processes on loopback serve SmolLM2: the same tokens as the local engine."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from layerswarm.errors import LayerswarmError, NoRouteError
from layerswarm.peer.launch import LocalSwarm, even_spans, start_peers
from layerswarm.routing.generate import Generator
from layerswarm.routing.local import open_local_generator
from layerswarm.routing.sampling import SamplingConfig
from layerswarm.routing.swarm_client import ClientConfig, open_swarm_generator
from layerswarm.shards.config import Span

GREEDY_32 = SamplingConfig(max_new_tokens=32, temperature=0.0)
LONG_QUESTION = (
    "I am planning a week-long trip through the south of France in early autumn. I will arrive "
    "in Marseille, rent a small car, and I would like to visit a few villages in Provence, spend "
    "a day in Avignon, see the Pont du Gard, and end in Montpellier. Could you suggest an order "
    "for these stops and say which single place I should not miss?"
)


def prompt_ids(gen: Generator, text: str) -> list[int]:
    return gen.tokenizer.encode_chat([{"role": "user", "content": text}])


@pytest.fixture(scope="module")
def local(smollm2_dir: Path) -> Generator:
    return open_local_generator(smollm2_dir)


@pytest.fixture(scope="module")
def three_peers(
    smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalSwarm]:
    with start_peers(smollm2_dir, even_spans(30, 3), tmp_path_factory.mktemp("peers3")) as swarm:
        yield swarm


def test_long_prompt_is_about_100_tokens(local: Generator) -> None:
    assert 90 <= len(prompt_ids(local, LONG_QUESTION)) <= 140


@pytest.mark.parametrize("n_peers", [2, 3])
def test_swarm_gives_the_local_engines_greedy_tokens(
    smollm2_dir: Path, local: Generator, tmp_path: Path, n_peers: int, three_peers: LocalSwarm
) -> None:
    prompt = prompt_ids(local, LONG_QUESTION)
    expected = list(local.tokens(prompt, GREEDY_32))
    if n_peers == 3:
        swarm_gen = open_swarm_generator(smollm2_dir, three_peers.addresses)
        assert list(swarm_gen.tokens(prompt, GREEDY_32)) == expected
        return
    with start_peers(smollm2_dir, even_spans(30, 2), tmp_path) as swarm:
        swarm_gen = open_swarm_generator(smollm2_dir, swarm.addresses)
        assert list(swarm_gen.tokens(prompt, GREEDY_32)) == expected


def test_two_clients_at_once_both_get_their_replies(
    smollm2_dir: Path, local: Generator, three_peers: LocalSwarm
) -> None:
    questions = ["What is the capital of France?", "Name three colours of the rainbow."]
    expected = [list(local.tokens(prompt_ids(local, q), GREEDY_32)) for q in questions]
    got: dict[int, list[int]] = {}
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            gen = open_swarm_generator(smollm2_dir, three_peers.addresses)
            got[i] = list(gen.tokens(prompt_ids(gen, questions[i]), GREEDY_32))
        except BaseException as e:  # reported below, in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors
    assert [got[0], got[1]] == expected


def test_sigterm_mid_session_stops_the_peer_cleanly_and_the_client_is_told(
    smollm2_dir: Path, local: Generator, tmp_path: Path
) -> None:
    with start_peers(smollm2_dir, even_spans(30, 2), tmp_path) as swarm:
        # route_wait: how long a step waits for a peer of the missing layers before it errs
        config = ClientConfig(route_wait=1.0)
        gen = open_swarm_generator(smollm2_dir, swarm.addresses, config=config)
        tokens = gen.tokens(prompt_ids(gen, LONG_QUESTION), SamplingConfig(max_new_tokens=200))
        next(tokens)
        assert swarm.peers[1].stop() == 0  # SIGTERM: exits cleanly, with status 0
        t0 = time.monotonic()
        with pytest.raises(LayerswarmError) as failure:
            for _ in tokens:
                pass
        assert time.monotonic() - t0 < 10  # told at once, not after a long timeout
        # With no replica to move to, the client names the layers nobody serves now.
        assert isinstance(failure.value, NoRouteError)
        assert failure.value.missing_layers == list(range(15, 30))
        log = swarm.peers[1].stderr_path.read_text()  # type: ignore[union-attr]
        assert "stopped" in log and "Traceback" not in log


def test_quantized_peers_serve_a_chat_reply(smollm2_dir: Path, tmp_path: Path) -> None:
    common = ["--dtype", "bfloat16"]
    with (
        start_peers(smollm2_dir, [Span(0, 15)], tmp_path, [*common, "--quant", "int8"]) as a,
        start_peers(smollm2_dir, [Span(15, 30)], tmp_path, [*common, "--quant", "int4"]) as b,
    ):
        gen = open_swarm_generator(smollm2_dir, a.addresses + b.addresses)
        question = [{"role": "user", "content": "What is the capital of France?"}]
        reply = "".join(gen.chat(question, SamplingConfig(max_new_tokens=24)))
        assert "Paris" in reply
        quant = [link.info.extra["quant"] for link in gen.client.links]  # type: ignore[attr-defined]
        assert sorted(quant) == ["int4", "int8"]


def test_a_peer_of_another_model_is_named_in_one_line(
    smollm2_dir: Path, tmp_path: Path, write_tiny_gguf: Any
) -> None:
    """`swarm-chat` pointed at a peer that serves another model says so, with no traceback."""
    write_tiny_gguf(tmp_path / "tiny.gguf", n_layers=2)
    with start_peers(tmp_path / "tiny.gguf", [Span(0, 2)], tmp_path / "peers") as swarm:
        chat = [sys.executable, "-m", "layerswarm.cli.chat", "--model", str(smollm2_dir)]
        chat += ["--peer", swarm.addresses[0], "--prompt", "hi", "--max-new-tokens", "2"]
        out = subprocess.run(chat, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    err = out.stderr.strip()
    assert err.startswith("error: peer ") and "serves another model" in err, err[-3000:]
    assert "start both with the same --model" in err and "Traceback" not in err
    assert len(err.splitlines()) == 1, err


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_peers_on_a_cpu_serve_two_users_the_local_engines_tokens(
    dtype: str, smollm2_dir: Path, tmp_path: Path
) -> None:
    """`swarm-peer start --dtype float16|bfloat16` on a CPU: fp16 weights once made such a peer
    fail to load (oneDNN cannot pack them here); bf16 weights are packed by oneDNN where the CPU
    has bf16 instructions and laid out in the arena elsewhere. Two users at once get the local
    engine's tokens in that dtype."""
    import torch

    torch_dtype = getattr(torch, dtype)
    greedy = SamplingConfig(max_new_tokens=8, temperature=0.0)
    prompts = [list(range(300, 312)), list(range(900, 907))]
    local_gen = open_local_generator(smollm2_dir, torch_dtype)
    expected = [list(local_gen.tokens(p, greedy)) for p in prompts]
    with start_peers(smollm2_dir, even_spans(30, 2), tmp_path, ["--dtype", dtype]) as swarm:
        gen = open_swarm_generator(smollm2_dir, swarm.addresses, dtype=torch_dtype)
        got: list[list[int]] = [[], []]

        def run(i: int) -> None:
            got[i] = list(gen.tokens(prompts[i], greedy))

        users = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for t in users:
            t.start()
        for t in users:
            t.join(timeout=300)
        assert got == expected
        links = gen.client.links  # type: ignore[attr-defined]
        assert [link.info.dtype for link in links] == [dtype, dtype]
