"""Weight layouts that make CPU linears read memory at full speed, for decode and prefill.

Measured on this project's 2-core CPU (SmolLM2 shapes, one token): `F.linear` reads fp32 weights
of the usual `(out, in)` layout at ~11 GB/s and bf16 at ~15 GB/s; the machine streams ~26 GB/s
with one thread and ~46 with two (a sum over 400 MB), so a GEMV's layout decides its speed.
- bf16/fp16: oneDNN's prepacked weights run at ~26 GB/s (2.5x for one token, 1.1x for a
  128-token prefill), with bit-identical results.
- fp32: prepacking is as fast, but sums in another order (logits moved by 2e-4 on SmolLM2).
  Storing the weight transposed, `(in, out)` in memory behind the same `(out, in)` view, makes
  the one-token GEMV of a layer with more outputs than inputs faster: streaming 40 different
  weights of each SmolLM2 shape (more than the L3 holds), 20.5 against 11.0 GB/s for gate_up
  (3072 x 576), 14.6 against 10.3 for qkv, 12.4 against 10.8 for o_proj (576 x 576). With more
  inputs than outputs the usual layout is the faster one (down_proj, 576 x 1536: 14.5 against
  11.6), so those keep it: a 30-layer fp32 decode step 31.1 ms against 33.0 (three runs each).
- fp32 weights read from 4 KiB pages pay a TLB miss every page: one decode step of SmolLM2
  streams 536 MB, 130k pages. The fp32 weights live in one arena that the kernel backs with
  2 MiB pages (`madvise(MADV_HUGEPAGE)`, Linux): SmolLM2 fp32 decode went from 41.7 to 38.7 ms
  a token in one run (span 36.3 -> 34.4 ms, head 5.4 -> 4.3 ms).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys
from typing import TypeVar

import torch
from torch import nn


def available() -> bool:
    """Whether this torch build has oneDNN's prepacked linear."""
    mkldnn = bool(torch.backends.mkldnn.is_available())  # type: ignore[no-untyped-call]
    return mkldnn and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class PackedLinear(nn.Module):
    """`nn.Linear`'s math with the weight in oneDNN's blocked layout (CPU only)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        w = linear.weight.detach()
        self.weight = torch.ops.mkldnn._reorder_linear_weight(w, 1)  # opaque (out, in)
        self.bias = None if linear.bias is None else linear.bias.detach().clone()
        self.nbytes = w.numel() * w.element_size()  # the packed tensor reports none itself

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`x (..., in)` -> `(..., out)`."""
        out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(
            x, self.weight, self.bias, "none", [], ""
        )
        return out


M = TypeVar("M", bound=nn.Module)
log = logging.getLogger(__name__)

HUGE_PAGE = 2 << 20  # bytes: x86-64's and arm64's transparent huge page
_MADV_HUGEPAGE = 14  # from <sys/mman.h>
_ALIGN = 64  # bytes: each weight starts on a cache line


def huge_page_arena(nbytes: int) -> torch.Tensor:
    """`nbytes` of uninitialised CPU memory (uint8), backed by 2 MiB pages where Linux allows.

    The advice is given before anything touches the memory, so the pages are huge from the
    first fault on, not after khugepaged gets round to them. Elsewhere, plain memory.
    """
    buf = torch.empty(nbytes + HUGE_PAGE, dtype=torch.uint8)  # large: mmap'd, not yet touched
    start = -buf.data_ptr() % HUGE_PAGE
    arena = buf[start : start + nbytes]
    length = nbytes - nbytes % HUGE_PAGE
    if sys.platform == "linux" and length:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        if libc.madvise(arena.data_ptr(), length, _MADV_HUGEPAGE) != 0:
            log.debug("madvise(MADV_HUGEPAGE) refused: errno %d", ctypes.get_errno())
    return arena


def pack_linears(module: M) -> M:
    """Give every CPU `nn.Linear` of `module` its fast layout, in place.

    fp32 weights go into one huge-page arena (still `nn.Linear`s), transposed where a layer has
    no more inputs than outputs; other dtypes become a `PackedLinear` where oneDNN is available.
    Weights not on the CPU are left alone. Apply it last: after quantization, which replaces the
    linears it quantizes.
    """
    fp32: list[nn.Linear] = []
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear) or child.weight.device.type != "cpu":
                continue
            if child.weight.dtype == torch.float32:
                fp32.append(child)
            elif available():
                setattr(parent, name, PackedLinear(child))
    _into_arena(fp32)
    return module


def _into_arena(linears: list[nn.Linear]) -> None:
    """Each weight moves into one shared arena: `(in, out)` memory behind an `(out, in)` view
    where `in <= out`, the usual `(out, in)` layout elsewhere (see the module's docstring)."""
    sizes = [-(-lin.weight.numel() * 4 // _ALIGN) * _ALIGN for lin in linears]
    if not sizes:
        return
    arena = huge_page_arena(sum(sizes))
    offset = 0
    for lin, size in zip(linears, sizes, strict=True):
        out_features, in_features = lin.weight.shape
        nbytes = lin.weight.numel() * 4
        flat = arena[offset : offset + nbytes].view(torch.float32)
        if in_features > out_features:
            dst = flat.view(out_features, in_features)
            dst.copy_(lin.weight.detach())
            lin.weight = nn.Parameter(dst, requires_grad=False)
        else:
            dst = flat.view(in_features, out_features)
            dst.copy_(lin.weight.detach().t())
            lin.weight = nn.Parameter(dst.t(), requires_grad=False)
        offset += size
