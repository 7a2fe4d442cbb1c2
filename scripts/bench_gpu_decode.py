"""Decode on a GPU, end to end: the local engine against transformers, CUDA graphs against eager
steps, and a 2-peer swarm on the GPU against the local engine's greedy tokens.

Every number comes from the code the user's commands run: the local engine is `LocalEngine` on
the model's layers loaded with `--device cuda` (Triton kernels, CUDA graphs of decode steps),
the swarm is two `swarm-peer start --device cuda` processes. Token ids go in directly (a model
with random weights needs no tokenizer). Prints one JSON object a line, for scripts/gpu_check.py:

    python scripts/bench_gpu_decode.py --model smollm2 --checks decode,graphs,swarm
    python scripts/bench_gpu_decode.py --dry-run     # a tiny model on the CPU (the interpreter)

Decode tok/s: sessions prefill a 64-token prompt, then decode `--tokens` greedy tokens each,
all sessions at once; tok/s is every session's decode tokens over the decode wall time.
transformers: `generate` with greedy search and its default (dynamic) KV cache, eager
attention, the same weights and dtype; its decode time is generate(N) minus generate(1).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

SHAPES = {  # transformers LlamaConfig fields of random models with these shapes
    "smollm2": dict(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
        rope_theta=100000.0,
    ),
    "llama-1b": dict(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True,
        rope_theta=500000.0,
    ),
    "tiny": dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
    ),
}  # fmt: skip
PROMPT = 64  # unit: tokens of each session's prompt


def emit(**row: object) -> None:
    print(json.dumps(row), flush=True)


def model_folder(name: str, workdir: Path, device: torch.device) -> Path:
    """The real SmolLM2 when the cache holds it, else random weights of the shape, saved by
    transformers (made on `device`: seconds for a 1B model on a GPU)."""
    cached = Path(os.environ.get("LAYERSWARM_CACHE", Path.home() / ".cache" / "layerswarm"))
    if name == "smollm2" and (cached / "models" / "smollm2-135m" / "config.json").exists():
        return cached / "models" / "smollm2-135m"
    from transformers import LlamaConfig, LlamaForCausalLM

    out = workdir / name
    if (out / "config.json").exists():
        return out
    config = LlamaConfig(max_position_embeddings=4096, **SHAPES[name])  # type: ignore[arg-type]
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    return out


def prompts(batch: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, vocab, (PROMPT,), generator=g).tolist() for _ in range(batch)]


def ours(
    model_dir: Path, device: torch.device, dtype: torch.dtype, quant: str, graphs: bool,
    batch: int, tokens: int,
) -> tuple[float, list[list[int]], int]:  # fmt: skip
    """(decode tok/s, each session's greedy tokens, weight bytes) of the local engine."""
    from layerswarm.routing.local import LocalEngine, LocalPipeline
    from layerswarm.routing.loop import BackgroundLoop
    from layerswarm.shards.config import ModelConfig, Span
    from layerswarm.shards.cuda_graphs import enable_cuda_graphs
    from layerswarm.shards.quantize import memory_bytes, quantize
    from layerswarm.shards.weights import load_client_head, load_span

    config = ModelConfig.from_file(model_dir)
    head = load_client_head(model_dir, dtype, config).to(device)
    model = load_span(model_dir, Span(0, config.num_layers), dtype, config)
    model.to_device(device)
    if quant != "none":
        quantize(model, quant, 128)  # type: ignore[arg-type]
    if graphs:
        enable_cuda_graphs(model)
    compute, net = ThreadPoolExecutor(1), BackgroundLoop()
    engine = LocalEngine(model, 512 * 2**20, compute, net)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    async def session(ids: list[int], go: asyncio.Event, ready: list[int]) -> list[int]:
        pipe = LocalPipeline(engine, PROMPT + tokens + 1)
        out, start, ctx = [], 0, list(ids)
        for step in range(tokens + 1):
            if step == 1:
                ready.append(1)
                await go.wait()
            h = await pipe.aforward(head.embed_tokens(torch.tensor([ctx[start:]])), start)
            start = len(ctx)
            ctx.append(int(head.logits(h[:, -1:]).argmax()))
            out.append(ctx[-1])
        await pipe.aclose()
        return out

    async def run_all() -> tuple[float, list[list[int]]]:
        go, ready = asyncio.Event(), []
        tasks = [
            asyncio.ensure_future(session(p, go, ready)) for p in prompts(batch, config.vocab_size)
        ]
        while len(ready) < batch:
            await asyncio.sleep(0.001)
        sync()
        t0 = time.perf_counter()
        go.set()
        outs = await asyncio.gather(*tasks)
        sync()
        return batch * tokens / (time.perf_counter() - t0), outs

    try:
        net.run(run_all())  # warm-up: compiles kernels, captures graphs
        rate, outs = net.run(run_all())
    finally:
        engine.close()
        net.stop()
        compute.shutdown()
    return rate, outs, memory_bytes(model) + memory_bytes(head)


def transformers_rate(
    model_dir: Path, device: torch.device, dtype: torch.dtype, batch: int, tokens: int
) -> float:
    """Decode tok/s of transformers' eager `generate` on the same weights."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        model_dir, torch_dtype=dtype, attn_implementation="eager"
    ).to(device)
    ids = torch.tensor(prompts(batch, model.config.vocab_size), device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timed(n: int) -> float:
        sync()
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        sync()
        return time.perf_counter() - t0

    timed(4)  # warm-up
    decode_s = min(timed(tokens + 1) for _ in range(2)) - min(timed(1) for _ in range(3))
    return batch * tokens / decode_s


def swarm_tokens(
    model_dir: Path,
    device: torch.device,
    dtype: str,
    tokens: int,
    workdir: Path,
    peer_devices: tuple[str, str] | None = None,
) -> list[int]:
    """Greedy tokens through two `swarm-peer start --device ...` processes, on `device` or on
    `peer_devices` (a mixed swarm: a CPU peer in fp32 and a GPU peer), the head on `device`."""
    from layerswarm.peer.launch import even_spans, start_peers
    from layerswarm.routing.session import RemoteSession
    from layerswarm.routing.swarm_client import SwarmClient
    from layerswarm.shards.config import ModelConfig, parse_dtype
    from layerswarm.shards.weights import load_client_head

    config = ModelConfig.from_file(model_dir)
    args = ["--device", str(device), "--dtype", dtype]
    if device.type == "cpu":
        args += ["--kernels", "triton"]  # the dry run: the Triton path in the interpreter
    head = load_client_head(model_dir, parse_dtype(dtype), config).to(device)
    spans = even_spans(config.num_layers, 2)
    own: list[list[str]] = []
    if peer_devices is not None:
        args = []
        own = [["--device", d] for d in peer_devices]  # each its device's default dtype
    with start_peers(model_dir, spans, workdir, args, peer_args=own) as swarm:
        client = SwarmClient(model_dir, swarm.addresses)
        try:
            remote = RemoteSession(client, PROMPT + tokens + 1)
            client.net.run(remote.open())
            ctx, start, out = prompts(1, config.vocab_size)[0], 0, []
            for _ in range(tokens):
                h = remote.forward(head.embed_tokens(torch.tensor([ctx[start:]])), start)
                start = len(ctx)
                ctx.append(int(head.logits(h[:, -1:]).argmax()))
                out.append(ctx[-1])
            return out
        finally:
            client.close()


def first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), -1)


def run_checks(args: argparse.Namespace, device: torch.device, workdir: Path) -> None:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    name = "tiny" if args.dry_run else args.model
    model_dir = model_folder(name, workdir, device)
    checks = args.checks.split(",")
    bench: Callable[..., tuple[float, list[list[int]], int]] = ours
    if "decode" in checks:
        for batch in (1, 8):
            theirs = transformers_rate(model_dir, device, dtype, batch, args.tokens)
            emit(check="decode", model=name, engine="transformers", quant="none", batch=batch,
                 tok_s=theirs)  # fmt: skip
            for quant in ("none", "int8", "int4"):
                rate, _, nbytes = bench(model_dir, device, dtype, quant, True, batch, args.tokens)
                emit(check="decode", model=name, engine="layerswarm", quant=quant, batch=batch,
                     tok_s=rate, vs_transformers=rate / theirs, weight_bytes=nbytes)  # fmt: skip
    if "graphs" in checks:
        eager, eager_ids, _ = bench(model_dir, device, dtype, "none", False, 1, args.tokens)
        graphs, graph_ids, _ = bench(model_dir, device, dtype, "none", True, 1, args.tokens)
        emit(check="graphs", model=name, eager_tok_s=eager, graphs_tok_s=graphs,
             same_tokens=eager_ids == graph_ids,
             first_difference=first_difference(eager_ids[0], graph_ids[0]))  # fmt: skip
    if "swarm" in checks:
        _, local_ids, _ = bench(model_dir, device, dtype, "none", True, 1, args.swarm_tokens)
        dtype_name = str(dtype).removeprefix("torch.")
        got = swarm_tokens(model_dir, device, dtype_name, args.swarm_tokens, workdir / "peers")
        emit(check="swarm", model=name, dtype=dtype_name, tokens=len(got),
             same_tokens=got == local_ids[0][: len(got)],
             first_difference=first_difference(got, local_ids[0]))  # fmt: skip
    if "mixed" in checks:  # the dry run: two CPU peers, the code path all the same
        _, local_ids, _ = bench(model_dir, device, dtype, "none", True, 1, args.swarm_tokens)
        devices = ("cpu", "cuda") if device.type == "cuda" else ("cpu", "cpu")
        wire = str(dtype).removeprefix("torch.")
        got = swarm_tokens(model_dir, device, wire, args.swarm_tokens, workdir / "mixed", devices)
        agree = sum(a == b for a, b in zip(got, local_ids[0], strict=False))
        emit(check="mixed", model=name, tokens=len(got), agree=agree,
             first_difference=first_difference(got, local_ids[0]))  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2", choices=sorted(SHAPES))
    ap.add_argument("--checks", default="decode,graphs,swarm")
    ap.add_argument("--tokens", type=int, default=128, help="decode tokens a session")
    ap.add_argument("--swarm-tokens", type=int, default=32)
    ap.add_argument("--dry-run", action="store_true", help="a tiny model on the CPU")
    ap.add_argument("--workdir", type=Path, default=None, help="where random models are kept")
    args = ap.parse_args()
    if args.dry_run:
        device = torch.device("cpu")
        args.tokens, args.swarm_tokens = min(args.tokens, 4), min(args.swarm_tokens, 4)
    elif not torch.cuda.is_available():
        print("bench_gpu_decode.py needs a CUDA GPU (or --dry-run)", file=sys.stderr)
        return 2
    else:
        device = torch.device("cuda", 0)
    with tempfile.TemporaryDirectory() as tmp:
        run_checks(args, device, args.workdir or Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
