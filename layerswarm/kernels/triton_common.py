"""What the Triton kernel modules share: how to multiply a dtype, and how big the GPU is."""

from __future__ import annotations

import functools

import torch


def dot_flags(t: torch.Tensor) -> tuple[bool, str]:
    """`(upcast, precision)` for kernels whose loads look like `t`.

    fp16/bf16 on a GPU multiply in their own type on tensor cores, accumulating in fp32. fp32
    models, and every dtype in the CPU interpreter (whose bf16 arithmetic is wrong), cast each
    load to fp32 and use exact fp32 dots (`"ieee"`) rather than tf32.
    """
    upcast = t.device.type == "cpu" or t.dtype == torch.float32
    return upcast, "ieee" if upcast else "tf32"


@functools.cache
def _sm_count(index: int) -> int:
    return int(torch.cuda.get_device_properties(index).multi_processor_count)


def programs_wanted(device: torch.device) -> int:
    """Programs that keep every SM busy for two waves; a small fixed number off the GPU."""
    if device.type != "cuda":
        return 4
    index = device.index if device.index is not None else torch.cuda.current_device()
    return 2 * _sm_count(index)
