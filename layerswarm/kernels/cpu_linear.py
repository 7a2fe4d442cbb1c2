"""Weight layouts that make CPU linears read memory at full speed, for decode and prefill.

Measured on this project's 2-core CPU (SmolLM2 shapes, one token): `F.linear` reads fp32 weights
of the usual `(out, in)` layout at ~11 GB/s and bf16 at ~15 GB/s; the machine streams ~26 GB/s
with one thread and ~46 with two (a sum over 400 MB), so a GEMV's layout decides its speed.
- Storing the weight transposed, `(in, out)` in memory behind the same `(out, in)` view, makes
  the one-token GEMV of a layer with more outputs than inputs faster: fp32, streaming 40
  different weights of each SmolLM2 shape (more than the L3 holds), 20.5 against 11.0 GB/s for
  gate_up (3072 x 576), 14.6 against 10.3 for qkv, 12.4 against 10.8 for o_proj (576 x 576).
  With more inputs than outputs the usual layout is the faster one (down_proj, 576 x 1536: 14.5
  against 11.6), so those keep it: a 30-layer fp32 decode step 31.1 ms against 33.0.
- bf16 takes the same layouts. oneDNN's prepacked weights (`_reorder_linear_weight`, used here
  before) were the fastest on a quiet day (~26 GB/s), but this CPU has no bf16 dot-product
  instructions and later runs found the transposed layout faster, most of all for the 49152 x
  576 head (one thread: 4.2 against 6.4 ms): whole decode steps, the two layouts' steps
  interleaved in one process, 1.09-1.12x (SmolLM2, a synthetic Qwen3-MoE) with one thread,
  1.03-1.05x with two; a 128-token prefill the same (within 2%). fp16 keeps the usual layout
  (see `_into_arena`); oneDNN cannot pack fp16 on this CPU at all.
- The layout is a fixed rule, not timed on each machine: timing picked differently from run to
  run where two layouts are close, and the layouts sum in different orders (fp32 outputs
  differ by ~1e-6), so peers serving the same layers would no longer give the same bits.
- Weights read from 4 KiB pages pay a TLB miss every page: one fp32 decode step of SmolLM2
  streams 536 MB, 130k pages. The weights live in one arena per dtype that the kernel backs
  with 2 MiB pages (`madvise(MADV_HUGEPAGE)`, Linux): SmolLM2 fp32 decode went from 41.7 to
  38.7 ms a token in one run (span 36.3 -> 34.4 ms, head 5.4 -> 4.3 ms).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys
from typing import TypeVar

import torch
from torch import nn

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

    The weights of each dtype go into one huge-page arena (still `nn.Linear`s), transposed where
    a layer has no more inputs than outputs. Weights not on the CPU are left alone. Apply it
    last: after quantization, which replaces the linears it quantizes.
    """
    by_dtype: dict[torch.dtype, list[nn.Linear]] = {}
    for lin in module.modules():
        if isinstance(lin, nn.Linear) and lin.weight.device.type == "cpu":
            by_dtype.setdefault(lin.weight.dtype, []).append(lin)
    for linears in by_dtype.values():
        _into_arena(linears)
    return module


def _into_arena(linears: list[nn.Linear]) -> None:
    """Each weight moves into one shared arena: `(in, out)` memory behind an `(out, in)` view
    where `in <= out` (but for fp16), the usual `(out, in)` layout elsewhere (see the module's
    docstring). The linears' weights share one dtype."""
    dtype = linears[0].weight.dtype
    size = dtype.itemsize
    # fp16 GEMVs of the transposed layout have no fast path in torch on this CPU (no fp16
    # instructions): 576 -> 1536 took 1.7 ms against 0.30 in rows, the 49152-row head 115 ms
    # against 8.5. So fp16 keeps the usual rows everywhere.
    may_transpose = dtype != torch.float16
    sizes = [-(-lin.weight.numel() * size // _ALIGN) * _ALIGN for lin in linears]
    arena = huge_page_arena(sum(sizes))
    offset = 0
    for lin, nbytes_aligned in zip(linears, sizes, strict=True):
        out_features, in_features = lin.weight.shape
        nbytes = lin.weight.numel() * size
        flat = arena[offset : offset + nbytes].view(dtype)
        if in_features > out_features or not may_transpose:
            dst = flat.view(out_features, in_features)
            dst.copy_(lin.weight.detach())
            lin.weight = nn.Parameter(dst, requires_grad=False)
        else:
            dst = flat.view(in_features, out_features)
            dst.copy_(lin.weight.detach().t())
            lin.weight = nn.Parameter(dst.t(), requires_grad=False)
        offset += nbytes_aligned
