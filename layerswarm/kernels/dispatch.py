"""Pick the kernel set for a device: Triton on CUDA, the plain-torch twins everywhere else."""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

from layerswarm.kernels import reference

BACKENDS = ("torch", "triton")


def ops_for(device: torch.device | str, backend: str | None = None) -> ModuleType:
    """The module of kernels to use on `device`.

    Args:
        device: where the tensors live.
        backend: "torch" or "triton" to override the choice (tests do; "triton" on CPU tensors
            needs `TRITON_INTERPRET=1`). None picks Triton on CUDA when it imports, else torch.
    Returns:
        A module with `rms_norm`, `add_rms_norm`, `apply_rope`, `swiglu`, `prefill_attention`
        and `decode_attention`, all with the signatures of `layerswarm.kernels.reference`.
    """
    if backend is None:
        backend = "triton" if torch.device(device).type == "cuda" and _triton_ok() else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; choose one of {BACKENDS}")
    if backend == "torch":
        return reference
    return importlib.import_module("layerswarm.kernels.triton_ops")


def _triton_ok() -> bool:
    try:
        importlib.import_module("layerswarm.kernels.triton_ops")
    except ImportError:
        return False
    return True
