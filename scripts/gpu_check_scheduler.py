"""GPU check of the step scheduler: sessions in mixed batches on CUDA, through the Triton kernels
(decode-only batches through CUDA graphs), give what the plain-torch twins give on the CPU, each
session alone, in fp32.

Eight sessions at once, prompts of 1 to 300 tokens (chunked prefill beside decode steps), then
16 decode steps each; every output is compared with the same session run alone on the CPU.
Prints one table. Needs a CUDA GPU and Triton:

    python scripts/gpu_check_scheduler.py [--device cpu]   # cpu: a dry run of the script itself
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

import torch

from layerswarm.shards.blocks import SpanModel
from layerswarm.shards.config import ModelConfig, Span
from layerswarm.shards.cuda_graphs import enable_cuda_graphs
from layerswarm.shards.scheduler import SchedulerConfig, StepScheduler

CONFIG = ModelConfig(
    hidden_size=512,
    intermediate_size=1024,
    num_layers=4,
    num_heads=8,
    num_kv_heads=2,
    head_dim=64,
    max_position_embeddings=4096,
)
PROMPTS = [1, 7, 33, 100, 300, 17, 64, 5]  # unit: tokens of each session's first step
DECODE = 16  # unit: one-token steps of each session after its prompt
# Half-precision compute against an fp32 reference: the residual stream is O(1) here.
TOLERANCE = {torch.float16: 0.03, torch.bfloat16: 0.25, torch.float32: 1e-3}


def steps_of(session: int) -> list[tuple[torch.Tensor, int]]:
    g = torch.Generator().manual_seed(session)
    out, start = [], 0
    for n in [PROMPTS[session]] + [1] * DECODE:
        out.append((torch.randn(1, n, CONFIG.hidden_size, generator=g), start))
        start += n
    return out


def alone_on_cpu(model: SpanModel, steps: list[tuple[torch.Tensor, int]]) -> list[torch.Tensor]:
    cache = model.new_cache(1024)
    seq = cache.open_session(1024)
    return [model(h, [s], cache, [seq]) for h, s in steps]


async def together(
    model: SpanModel, sessions: list[list[tuple[torch.Tensor, int]]], device: str
) -> list[list[torch.Tensor]]:
    cache = model.new_cache(8192)
    scheduler = StepScheduler(model, cache, SchedulerConfig(token_budget=64, max_batch=16))
    serving = asyncio.create_task(scheduler.serve())

    async def run(steps: list[tuple[torch.Tensor, int]]) -> list[torch.Tensor]:
        seq = cache.open_session(1024)
        return [(await scheduler.run(seq, h.to(device), s)).float().cpu() for h, s in steps]

    try:
        return list(await asyncio.gather(*(run(s) for s in sessions)))
    finally:
        serving.cancel()
        scheduler.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    device = ap.parse_args().device
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: nothing to check", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    reference = SpanModel(CONFIG, Span(0, CONFIG.num_layers), kernel_backend="torch")
    sessions = [steps_of(i) for i in range(len(PROMPTS))]
    expected = [alone_on_cpu(reference, s) for s in sessions]
    gpu = torch.cuda.get_device_name() if device.startswith("cuda") else "none"
    print(f"device: {device} ({gpu}), torch {torch.__version__}")
    print("| dtype | kernels | sessions | steps | max abs error | tolerance | wall s | result |")
    print("|---|---|---|---|---|---|---|---|")
    failed = False
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        model = SpanModel(CONFIG, reference.span)  # the dispatcher's kernels: Triton on CUDA
        model.load_state_dict(reference.state_dict())
        model.to(dtype).to_device(device)
        enable_cuda_graphs(model)  # decode-only batches replay graphs, as on a peer
        t0 = time.perf_counter()
        got = asyncio.run(together(model, sessions, device))
        wall = time.perf_counter() - t0
        err = max(
            (g - e).abs().max().item()
            for gs, es in zip(got, expected, strict=True)
            for g, e in zip(gs, es, strict=True)
        )
        ok = err <= TOLERANCE[dtype]
        failed |= not ok
        steps = sum(len(s) for s in sessions)
        name = str(dtype).removeprefix("torch.")
        kernels = model.ops.__name__.rsplit(".", 1)[-1]
        print(
            f"| {name} | {kernels} | {len(sessions)} | {steps} | {err:.2e} | "
            f"{TOLERANCE[dtype]:g} | {wall:.1f} | {'pass' if ok else 'FAIL'} |"
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
