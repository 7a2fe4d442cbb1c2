"""The local engine on the real SmolLM2: replies, sampling, streaming text, clear errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from layerswarm.errors import ContextOverflow
from layerswarm.routing.generate import Generator
from layerswarm.routing.local import open_local_generator
from layerswarm.routing.sampling import Sampler, SamplingConfig
from layerswarm.routing.text import ChatTokenizer, TextStream

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def engine(smollm2_dir: Path) -> Generator:
    return open_local_generator(smollm2_dir)


def test_greedy_reply_names_paris(engine: Generator) -> None:
    reply = "".join(engine.chat(QUESTION, SamplingConfig(max_new_tokens=24)))
    assert "Paris" in reply
    assert engine.last_stats.new_tokens <= 24


def test_reply_stops_at_eos_and_max_new_tokens(engine: Generator) -> None:
    list(engine.chat(QUESTION, SamplingConfig(max_new_tokens=64)))
    assert engine.last_stats.new_tokens < 64  # the model ends its short answer itself
    list(engine.chat(QUESTION, SamplingConfig(max_new_tokens=3)))
    assert engine.last_stats.new_tokens == 3


def test_seeded_sampling_is_reproducible_and_varies_with_seed(engine: Generator) -> None:
    story = [{"role": "user", "content": "Tell me a story about a cat."}]

    def reply(seed: int) -> str:
        cfg = SamplingConfig(max_new_tokens=20, temperature=1.0, top_p=0.95, top_k=50, seed=seed)
        return "".join(engine.chat(story, cfg))

    assert reply(1) == reply(1)
    assert len({reply(1), reply(2), reply(3)}) > 1


def test_stop_string_ends_the_reply_without_showing_it(engine: Generator) -> None:
    reply = "".join(engine.chat(QUESTION, SamplingConfig(max_new_tokens=24, stop=("Paris",))))
    assert "Paris" not in reply
    assert reply.startswith("The capital of France is")


def test_prompt_longer_than_the_context_is_refused(engine: Generator) -> None:
    too_long = [1] * (engine.head.config.max_position_embeddings + 1)
    with pytest.raises(ContextOverflow, match="context holds"):
        list(engine.stream_ids(too_long, SamplingConfig(max_new_tokens=4)))


def test_text_stream_never_splits_a_multibyte_character(smollm2_dir: Path) -> None:
    tok = ChatTokenizer(smollm2_dir)
    text = "Grüße aus Köln: 東京 🚀🌍 naïve café"
    ids = tok.encode(text)
    stream = TextStream(tok)
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert len(ids) > len([p for p in pieces if p])  # some tokens were held back mid-character


def test_text_stream_holds_back_a_partial_stop_string(smollm2_dir: Path) -> None:
    tok = ChatTokenizer(smollm2_dir)
    stream = TextStream(tok, stop=["<END>"])
    out = "".join(stream.push(i) for i in tok.encode("one two <EN"))
    assert out == "one two "  # "<EN" could begin the stop string
    out += "".join(stream.push(i) for i in tok.encode("D> three"))
    assert out + stream.flush() == "one two "


def test_sampler_top_k_one_is_greedy_and_penalty_discourages_repeats() -> None:
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0])
    sampler = Sampler(SamplingConfig(temperature=1.5, top_k=1, seed=0))
    assert all(sampler(logits, []) == 1 for _ in range(20))
    greedy_penalised = Sampler(SamplingConfig(repetition_penalty=2.0))
    assert greedy_penalised(logits, [1]) == 2


@pytest.mark.parametrize(
    "bad", [{"temperature": -1.0}, {"top_p": 0.0}, {"top_k": -2}, {"max_new_tokens": -1}]
)
def test_bad_sampling_settings_are_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        SamplingConfig(**bad)  # type: ignore[arg-type]


# Runs swarm-chat and reports, as the interpreter exits, the threads still alive.
THREADS_AT_EXIT = """
import atexit, runpy, sys, threading
def report():
    names = sorted(t.name for t in threading.enumerate() if t is not threading.main_thread())
    print("threads at exit:", names, file=sys.stderr)
atexit.register(report)
sys.argv = ["swarm-chat", *sys.argv[1:]]
runpy.run_module("layerswarm.cli.chat", run_name="__main__", alter_sys=True)
"""


def test_cli_one_shot_prints_the_reply_and_stops_its_network_thread(smollm2_dir: Path) -> None:
    # A process that exits with its network thread inside uvloop can crash as the interpreter
    # finalizes (a swarm-chat SIGSEGV was seen under load): swarm-chat closes it first.
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            THREADS_AT_EXIT,
            "--local",
            "--model",
            str(smollm2_dir),
            "--prompt",
            "What is the capital of France?",
            "--max-new-tokens",
            "24",
            "--temperature",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    assert "Paris" in out.stdout
    at_exit = [line for line in out.stderr.splitlines() if line.startswith("threads at exit:")]
    assert at_exit and "layerswarm-net" not in at_exit[0], out.stderr[-2000:]


def test_cli_names_a_missing_model_clearly(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "layerswarm.cli.chat",
            "--local",
            "--model",
            str(tmp_path / "nope"),
            "--prompt",
            "hi",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 0
    assert out.stderr.startswith("error:") and "Traceback" not in out.stderr


def test_the_fixed_cpu_rule_decodes_with_the_bag_gemvs(
    smollm2_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With `cpu_plans="fixed"` (no timing at load), the engine's CPU linears (30 layers x qkv,
    # o, gate_up, down, and the head) run each one-token decode step as embedding_bags. The
    # default, "measure", uses what the timing chose (`tests/kernels/test_cpu_tuning.py`).
    engine = open_local_generator(smollm2_dir, cpu_plans="fixed")
    bags: list[int] = []
    real_bag = F.embedding_bag

    def counting_bag(*args: Any, **kwargs: Any) -> torch.Tensor:
        bags.append(1)
        return real_bag(*args, **kwargs)

    monkeypatch.setattr(F, "embedding_bag", counting_bag)
    reply = "".join(engine.chat(QUESTION, SamplingConfig(max_new_tokens=5)))
    assert reply.startswith("The capital of France")  # the same reply as without bags
    assert len(bags) >= (30 * 4 + 1) * 4  # the 4 decode steps after the prefill's token
