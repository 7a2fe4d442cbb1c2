"""What a peer measures about itself on the device it serves from: speed, TFLOPS, memory."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from layerswarm.shards.blocks import SpanModel


@dataclass(frozen=True)
class SpeedSample:
    """How fast this peer runs its span, measured at start."""

    decode_s_per_layer: float  # unit: s one layer takes for one decode step (one session)
    prefill_tokens_per_s_per_layer: float  # unit: prompt tokens one layer takes per second
    decode_threads: int = 0  # unit: threads a one-session decode step runs on; 0: torch's default


# A one-session decode step runs on fewer threads when that costs at most this much time: the
# cores it leaves are the home PC's, or another peer's on the same machine. On this project's
# 2-core machine a SmolLM2 fp32 step of 15 layers took 16.7 ms on one thread and on two, and 2
# peers on the machine decoded ~5% faster with one thread each (three runs each way).
FEWER_THREADS_SLACK = 1.05


def measure_speed(model: SpanModel, prompt: int = 64, steps: int = 8) -> SpeedSample:
    """Time a short prefill, then decode steps on all threads and on one.

    On a CPU with several threads, decode is timed both ways, twice, in turns (4 x `steps`
    steps: half a second for 15 SmolLM2 layers, a few seconds for a large span); one thread is
    chosen when its best time is within `FEWER_THREADS_SLACK` of all threads' best. Results do
    not depend on it: a step's output is bit-identical on one thread or two. Leaves torch's
    thread count as it found it.
    """
    c = model.config
    param = next(model.parameters())
    all_threads = torch.get_num_threads()
    candidates = [all_threads, 1] if param.device.type == "cpu" and all_threads > 1 else [0]
    rounds = 2
    cache = model.new_cache(prompt + steps * len(candidates) * rounds + 1)
    session = cache.allocate(prompt + steps * len(candidates) * rounds + 1)
    hidden = torch.randn(1, prompt, c.hidden_size, generator=torch.Generator().manual_seed(0))
    hidden = hidden.to(param.device, param.dtype)
    sync = _synchronizer(param.device)
    model(hidden[:, :4], [0], cache, [session])  # warm-up
    model(hidden[:, 4:5], [4], cache, [session])  # and a decode step (a CUDA graph's capture)
    sync()
    t0 = time.perf_counter()
    model(hidden, [0], cache, [session])
    sync()
    prefill_s = time.perf_counter() - t0
    best: dict[int, float] = {}
    position = prompt
    try:
        for _ in range(rounds):
            for threads in candidates:
                if threads:
                    torch.set_num_threads(threads)
                t0 = time.perf_counter()
                for i in range(steps):
                    model(hidden[:, i : i + 1], [position + i], cache, [session])
                sync()
                per_step = (time.perf_counter() - t0) / steps
                best[threads] = min(best.get(threads, per_step), per_step)
                position += steps
    finally:
        torch.set_num_threads(all_threads)
    chosen = candidates[0]
    if len(candidates) > 1 and best[1] <= FEWER_THREADS_SLACK * best[all_threads]:
        chosen = 1
    layers = len(model.span)
    return SpeedSample(best[chosen] / layers, prompt / prefill_s / layers, chosen)


def _synchronizer(device: torch.device) -> Callable[[], None]:
    """What waits for the device's queued work (CUDA runs asynchronously; a CPU does not)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


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


def device_name(device: torch.device | str = "cpu") -> str:
    """What a record calls the device: "cpu", or the GPU's name (at most 64 characters)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))[:64] or "cuda"
    return "cpu"


def free_memory_bytes(device: torch.device | str = "cpu") -> int:
    """Free memory of the device: VRAM on CUDA, available RAM (MemAvailable) elsewhere."""
    if torch.device(device).type == "cuda":
        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    return _meminfo_bytes("MemAvailable:")


def memory_total_bytes(device: torch.device | str = "cpu") -> int:
    """All memory of the device: VRAM on CUDA, RAM (MemTotal) elsewhere; 0 if unknown."""
    if torch.device(device).type == "cuda":
        _free, total = torch.cuda.mem_get_info(torch.device(device))
        return int(total)
    return _meminfo_bytes("MemTotal:")


def _meminfo_bytes(field: str) -> int:
    """A field of /proc/meminfo in bytes; 0 where there is none."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
