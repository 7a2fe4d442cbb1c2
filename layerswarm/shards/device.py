"""Which device a span or a client head runs on: `auto`, `cpu`, `cuda` or `cuda:N`, checked.

`auto` takes the CUDA device with the most free memory when torch sees one, else the CPU. Asking
for CUDA where there is none is a `DeviceUnavailable` whose one line says what torch found (a
CPU-only build, no device, fewer devices than asked), so the user knows what to install.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from layerswarm.errors import LayerswarmError

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
KERNEL_CHOICES = ("auto", "torch", "triton")
_CUDA = re.compile(r"cuda(?::(\d{1,3}))?")


class DeviceUnavailable(LayerswarmError):
    """The device asked for does not exist here (or the spelling names no device)."""


def most_free(free_bytes: Sequence[int]) -> int:
    """The index of the device with the most free memory (the first of equals)."""
    if not free_bytes:
        raise ValueError("no devices to choose from")
    return max(range(len(free_bytes)), key=lambda i: (free_bytes[i], -i))


def cuda_found() -> str:
    """What torch sees of CUDA here, in words: for error messages."""
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is a CPU-only build"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device"
    n = torch.cuda.device_count()
    return f"torch sees {n} CUDA device{'s' if n != 1 else ''} (cuda:0..cuda:{n - 1})"


def resolve_device(spec: str = "auto") -> torch.device:
    """The device `spec` names, checked to exist.

    Args:
        spec: `auto` (the CUDA device with the most free memory, else the CPU), `cpu`, `cuda`
            (device 0) or `cuda:N`.
    Returns:
        a `torch.device` with an explicit index on CUDA.
    Raises:
        DeviceUnavailable: an unknown spelling, or CUDA asked for where torch has none or fewer
            devices; the message says what was found.
    """
    spec = spec.strip().lower()
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "auto":
        if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
            return torch.device("cpu")
        free = [torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())]
        return torch.device("cuda", most_free(free))
    match = _CUDA.fullmatch(spec)
    if match is None:
        raise DeviceUnavailable(f"unknown device {spec!r}: use {DEVICE_CHOICES}")
    index = int(match[1] or 0)
    if not torch.cuda.is_available() or index >= torch.cuda.device_count():
        hint = "; install a CUDA build of torch" if torch.version.cuda is None else ""
        raise DeviceUnavailable(f"device {spec} asked for, but {cuda_found()}{hint}")
    return torch.device("cuda", index)


def default_dtype(device: torch.device) -> str:
    """The compute dtype a device gets when none is asked: bf16 on a GPU that has it (fp16 on
    older ones), fp32 on a CPU (where bf16 matmuls are slower than fp32 without AMX)."""
    if device.type != "cuda":
        return "float32"
    return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"


def check_kernels(kernels: str, device: torch.device, interpreted: bool) -> str | None:
    """The kernel backend for `SpanModel` (None: by device), checked against the device.

    Args:
        kernels: `auto`, `torch` or `triton`.
        interpreted: whether TRITON_INTERPRET=1 is set (Triton on CPU tensors needs it).
    Raises:
        DeviceUnavailable: `triton` on a CPU without the interpreter, or an unknown name.
    """
    if kernels not in KERNEL_CHOICES:
        raise DeviceUnavailable(f"unknown kernels {kernels!r}: use {', '.join(KERNEL_CHOICES)}")
    if kernels == "triton" and device.type == "cpu" and not interpreted:
        raise DeviceUnavailable(
            "Triton kernels on a CPU run only in Triton's interpreter: set TRITON_INTERPRET=1"
        )
    return None if kernels == "auto" else kernels
