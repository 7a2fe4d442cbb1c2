"""What a peer measures about itself at start: its speed, its TFLOPS, its free memory."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from layerswarm.shards.blocks import SpanModel


@dataclass(frozen=True)
class SpeedSample:
    """How fast this peer runs its span, measured at start."""

    decode_s_per_layer: float  # unit: s one layer takes for one decode step (one session)
    prefill_tokens_per_s_per_layer: float  # unit: prompt tokens one layer takes per second


def measure_speed(model: SpanModel, prompt: int = 64, steps: int = 8) -> SpeedSample:
    """Time a short prefill and a few decode steps through the whole span (a fraction of a s)."""
    c = model.config
    param = next(model.parameters())
    cache = model.new_cache(prompt + steps + 1)
    session = cache.allocate(prompt + steps + 1)
    hidden = torch.randn(1, prompt, c.hidden_size, generator=torch.Generator().manual_seed(0))
    hidden = hidden.to(param.device, param.dtype)
    model(hidden[:, :4], [0], cache, [session])  # warm-up
    t0 = time.perf_counter()
    model(hidden, [0], cache, [session])
    t1 = time.perf_counter()
    for i in range(steps):
        model(hidden[:, i : i + 1], [prompt + i], cache, [session])
    t2 = time.perf_counter()
    layers = len(model.span)
    return SpeedSample((t2 - t1) / steps / layers, prompt * layers / (t1 - t0) / layers**2)


def measure_tflops(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> float:
    """Matmul throughput of the device, from a short benchmark (about 0.2 s)."""
    n = 1024 if torch.device(device).type == "cpu" else 4096
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up
    runs, t0 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < 0.2 or runs < 2:
        a @ b
        runs += 1
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
    return 2 * n**3 * runs / elapsed / 1e12


def free_memory_bytes(device: torch.device | str = "cpu") -> int:
    """Free memory of the device: VRAM on CUDA, available RAM (MemAvailable) elsewhere."""
    if torch.device(device).type == "cuda":
        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
