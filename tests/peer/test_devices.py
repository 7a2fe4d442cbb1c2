"""Where a peer runs: `--device` and `--kernels` from the command line to the work.

No GPU here: CUDA is refused in one line that says what torch found, and the Triton path runs
end to end in Triton's interpreter (`--kernels triton`) inside a real peer process.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from layerswarm.peer.launch import start_peers
from layerswarm.routing.session import RemoteSession
from layerswarm.routing.swarm_client import SwarmClient
from layerswarm.shards.config import ModelConfig, Span
from layerswarm.shards.device import (
    DeviceUnavailable,
    check_kernels,
    default_dtype,
    most_free,
    resolve_device,
)
from layerswarm.shards.weights import load_client_head, load_span


@pytest.mark.parametrize(
    ("free", "chosen"),
    [
        ([10], 0),
        ([4 << 30, 20 << 30, 8 << 30], 1),
        ([8 << 30, 8 << 30], 0),  # equals: the first
        ([0, 1], 1),
    ],
)
def test_auto_takes_the_cuda_device_with_the_most_free_memory(free: list[int], chosen: int) -> None:
    assert most_free(free) == chosen


def test_cpu_and_auto_resolve_here_and_the_cpu_defaults_to_fp32() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
    assert default_dtype(torch.device("cpu")) == "float32"


@pytest.mark.parametrize("spec", ["gpu", "cuda:x", "cuda0", "cuda:-1", "tpu", ""])
def test_unknown_device_names_are_refused_with_the_choices(spec: str) -> None:
    with pytest.raises(DeviceUnavailable, match="use auto, cpu, cuda or cuda:N"):
        resolve_device(spec)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_where_there_is_none_says_what_was_found(spec: str) -> None:
    with pytest.raises(DeviceUnavailable) as e:
        resolve_device(spec)
    assert f"device {spec} asked for" in str(e.value)
    assert "CPU-only build" in str(e.value) or "sees no CUDA device" in str(e.value)


def test_triton_kernels_on_a_cpu_need_the_interpreter() -> None:
    cpu = torch.device("cpu")
    assert check_kernels("auto", cpu, False) is None
    assert check_kernels("torch", cpu, False) == "torch"
    assert check_kernels("triton", cpu, True) == "triton"
    with pytest.raises(DeviceUnavailable, match="TRITON_INTERPRET=1"):
        check_kernels("triton", cpu, False)
    with pytest.raises(DeviceUnavailable, match="unknown kernels"):
        check_kernels("cuda", cpu, True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--device", "cuda"], "error: --device: device cuda asked for, but "),
        (["--device", "gpu"], "error: --device: unknown device 'gpu': use auto, cpu, cuda"),
    ],
)
def test_swarm_peer_start_refuses_a_missing_device_in_one_line(
    tiny_llama_dir: Path, args: list[str], expected: str
) -> None:
    cmd = [sys.executable, "-m", "layerswarm.cli.peer", "start", "--model", str(tiny_llama_dir)]
    one_line_error([*cmd, *args], expected)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_swarm_chat_refuses_a_missing_device_in_one_line(tiny_llama_dir: Path) -> None:
    cmd = [sys.executable, "-m", "layerswarm.cli.chat", "--local", "--device", "cuda:0"]
    one_line_error([*cmd, "--prompt", "hi"], "error: --device: device cuda:0 asked for, but ")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_client_connect_refuses_a_missing_device(tiny_llama_dir: Path) -> None:
    from layerswarm import Client

    with pytest.raises(DeviceUnavailable, match="device cuda asked for"):
        Client.connect(str(tiny_llama_dir), local=True, device="cuda")


def one_line_error(cmd: list[str], expected: str) -> None:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    err = out.stderr.strip()
    assert err.startswith(expected), err[-2000:]
    assert len(err.splitlines()) == 1, err


def greedy(
    forward: object, model_dir: Path, prompt: list[int], new_tokens: int
) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens after `prompt` through `forward(hidden, start)`; also the first output."""
    head = load_client_head(model_dir)
    ids, start, first = list(prompt), 0, None
    for _ in range(new_tokens):
        out = forward(head.embed_tokens(torch.tensor([ids[start:]])), start)  # type: ignore[operator]
        first = out if first is None else first
        start = len(ids)
        ids.append(int(head.logits(out[:, -1:]).argmax()))
    assert first is not None
    return ids[len(prompt) :], first


def test_a_peer_on_the_triton_path_gives_the_reference_greedy_tokens(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    """One peer runs every kernel of its span through Triton (in the interpreter: RMSNorm,
    RoPE, SwiGLU, prefill and paged decode attention), the other the torch twins; the tokens
    are the whole model's in this process, on the torch kernels."""
    config = ModelConfig.from_file(tiny_llama_dir)
    whole = load_span(tiny_llama_dir, Span(0, config.num_layers))
    cache = whole.new_cache(64)
    session = cache.allocate(64)
    prompt = [5, 17, 42, 99, 3, 250, 7]
    want, want_first = greedy(
        lambda h, s: whole(h, [s], cache, [session]), tiny_llama_dir, prompt, 6
    )

    kernels = [["--kernels", "triton"], ["--kernels", "torch"]]
    spans = [Span(0, 2), Span(2, 4)]
    with start_peers(tiny_llama_dir, spans, tmp_path, peer_args=kernels) as swarm:
        client = SwarmClient(tiny_llama_dir, swarm.addresses)
        try:
            remote = RemoteSession(client, 64)
            client.net.run(remote.open())
            got, got_first = greedy(remote.forward, tiny_llama_dir, prompt, 6)
            infos = [link.info.extra for link in client.links]  # type: ignore[union-attr]
        finally:
            client.close()
    assert {i["kernels"] for i in infos} == {"triton_ops", "reference"}
    assert all(i["device"] == "cpu" and i["cuda_graphs"] is False for i in infos)
    torch.testing.assert_close(got_first, want_first, atol=1e-4, rtol=1e-4)
    assert got == want
