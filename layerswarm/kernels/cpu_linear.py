"""Weight layouts that make CPU linears read memory at full speed, for decode and prefill.

Measured on this project's 2-core CPU (SmolLM2 shapes, one token): `F.linear` reads fp32 weights
of the usual `(out, in)` layout at ~11 GB/s and bf16 at ~15 GB/s; the machine streams ~26 GB/s
with one thread and ~46 with two (a sum over 400 MB), so a GEMV's layout decides its speed.
- Storing the weight transposed, `(in, out)` in memory behind the same `(out, in)` view, makes
  the one-token GEMV faster: fp32, streaming 40 different weights of each SmolLM2 shape (more
  than the L3 holds), 20.5 against 11.0 GB/s for gate_up (3072 x 576), 14.6 against 10.3 for
  qkv, 12.4 against 10.8 for o_proj (576 x 576) through `F.linear` (MKL's GEMM of one row).
- Read as an `F.embedding_bag` (`ArenaLinear`: the sum of the `(in, out)` rows scaled by the
  token's values, fbgemm's JIT-compiled kernel) the same transposed weights stream faster
  still, for every shape: on an AMD EPYC (Zen 5, 2026-12-02; one thread streams 40 GB/s in a
  sum) fp32 head (49152 x 576) 34.7 against 26.2 GB/s (`F.linear`, transposed) and 14.1
  (rows), an expert's gate_up (1536 x 576) 31.8 against 21.7 and 14.6, its down (576 x 768)
  30.1 against 17.0 and 15.3; bf16 24-27 against 7-9 transposed and 10-16 rows. Whole decode
  steps of the synthetic MoE, the two layouts' steps interleaved in one process (10 turns of
  32 tokens, same tokens): fp32 17.0 -> 12.3 ms (one thread), 18.1 -> 13.2 (two); bf16 on a
  CPU without bf16 instructions 23.0 -> 10.1. So every weight but fp16 is stored transposed
  (the usual layout had been kept where a layer has more inputs than outputs: `F.linear`
  read it faster on an earlier CPU, 14.5 against 11.6 GB/s for a 576 x 1536 down_proj).
  A few tokens (a batch of a few sessions' decode steps) are a bag each (see `BAG_ROWS`): the
  synthetic MoE's fp32 step of 2 sessions 37.7 -> 24.5 ms, of 3 41.3 -> 29.4; SmolLM2's of 4
  sessions 78.8 -> 65.0 ms with bags to 5 rows against to 3 (46.5 against 71.7 with two
  threads), of 5 74.4 -> 61.6 (interleaved, same tokens). More tokens (prefill, larger
  batches) take `F.linear`, which reads both layouts alike there (128 tokens, each shape
  within 3%; bf16's head 21 against 26 ms, one thread).
- bf16 depends on the CPU. Without bf16 dot-product instructions (AVX512-BF16 or AMX; the
  CPU these figures come from) bf16 takes the fp32 layouts: oneDNN's prepacked weights
  (`_reorder_linear_weight`) were slower there, most of all for the 49152 x 576 head (one
  thread: 6.4 against 4.2 ms transposed): whole decode steps 1.09-1.12x (SmolLM2, a synthetic
  Qwen3-MoE) with one thread, 1.03-1.05x with two. With them (a Xeon with AMX, on another day
  of the same project machine) oneDNN's packed bf16 GEMVs use those instructions and the
  transposed layout is the slowest: the synthetic MoE's bf16 decode step, the three layouts'
  steps interleaved in one process (12 turns of 24 tokens, one thread), median 35.3 ms packed,
  40.9 rows, 52.2 transposed (p25 24.0, 30.7, 40.1), the same tokens; so such CPUs get
  `PackedLinear` (same products as `F.linear` in bf16, tested); on the Zen 5 packed steps
  stayed a little faster than the bags too (9.65 against 10.02 ms). fp16 keeps the usual layout
  (see `_into_arena`); oneDNN cannot pack fp16 on a CPU without AVX512-FP16.
- Those figures came from three CPUs, and each moved the rule. So `pack_linears` takes a
  `Chooser`: `kernels.cpu_tuning.Tuner` times the candidate plans on the machine at load and
  keeps its choice per CPU model, torch version and shape (so peers on one machine pick the same
  bits); `default_plan`, the fixed rule above, serves where nothing was measured. One bag runs
  on one thread (the issue's Xeon: fp32 decode 0.58x transformers by the clock for that), so the
  bags are cut into column blocks, a block a thread, that `embedding_bag` shares out among the
  threads; a column's sum runs in the same order either way, so the bits stay.
- Weights read from 4 KiB pages pay a TLB miss every page: one fp32 decode step of SmolLM2
  streams 536 MB, 130k pages. The weights live in one arena per dtype that the kernel backs
  with 2 MiB pages (`madvise(MADV_HUGEPAGE)`, Linux): SmolLM2 fp32 decode went from 41.7 to
  38.7 ms a token in one run (span 36.3 -> 34.4 ms, head 5.4 -> 4.3 ms).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import torch
import torch.nn.functional as F
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


def native_bf16() -> bool:
    """Whether this CPU has bf16 dot-product instructions (AVX512-BF16 or AMX) that oneDNN's
    packed bf16 GEMMs use."""
    cpu = torch.cpu
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    has = any(bool(getattr(cpu, name, lambda: False)()) for name in checks)
    mkldnn = bool(torch.backends.mkldnn.is_available())  # type: ignore[no-untyped-call]
    return has and mkldnn and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class PackedLinear(nn.Module):
    """`nn.Linear`'s math with the weight in oneDNN's blocked layout (CPU, bf16 or fp32)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        w = linear.weight.detach()
        self.weight = torch.ops.mkldnn._reorder_linear_weight(w, 1)  # opaque (out, in)
        self.bias = None if linear.bias is None else linear.bias.detach().clone()
        # The packed tensor is opaque (no storage to count), and neither it nor the bias is a
        # parameter: `shards.quantize.memory_bytes` reads this instead.
        bias_nbytes = 0 if self.bias is None else self.bias.numel() * self.bias.element_size()
        self.packed_nbytes = w.numel() * w.element_size() + bias_nbytes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`x (..., in)` -> `(..., out)`."""
        out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(
            x, self.weight, self.bias, "none", [], ""
        )
        return out


# The fixed rule `default_plan` follows where nothing was measured (`kernels.cpu_tuning` times
# the candidates instead). Inputs of up to this many rows (tokens) take the bags: MKL's GEMM of
# 2-3 rows over the transposed layout is slower still than of one (fp32 head, one thread: 11.6 ms
# for 2 rows, 17.2 for 3, against 9.1 and 13.6 as bags; an expert's gate_up 0.23 and 0.33 ms
# against 0.15 and 0.20). From 4 rows a GEMM's reuse of each weight it reads wins for a weight no
# cache holds (head, one thread: 4 rows 10.5 ms in rows against 13.0 as bags), but a weight the
# L3 holds is read from there by the bags after the first, so those go on to 5 rows (one thread,
# 4 rows: 3072 x 576 0.64 ms against 0.79, 576 x 1536 0.24 against 0.30; at 8 rows the GEMM wins).
BAG_ROWS = 3
BAG_ROWS_CACHED = 5
CACHED_TABLE = 8 << 20  # bytes: a weight up to this size stays in a desktop CPU's L3
LAYOUTS = ("trans", "rows", "onednn")


@dataclass(frozen=True)
class LinearPlan:
    """How one CPU linear runs: its weight's layout and its GEMVs of a few tokens.

    `layout`: "trans" (`(in, out)` memory behind the `(out, in)` view), "rows" (the usual
    `(out, in)`) or "onednn" (bf16 or fp32 packed by oneDNN: `PackedLinear`). `bags[r - 1]`: for
    an input of `r` rows (tokens), the column blocks of its `embedding_bag` GEMV ("trans" only);
    more rows than listed take `F.linear`. One bag runs on one thread, so a block a thread lets
    every core stream its share of the weight; the blocks sum each column in the same order, so
    their bits do not depend on the count of blocks.
    """

    layout: str = "trans"
    bags: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown CPU linear layout {self.layout!r}; choose one of {LAYOUTS}")
        if self.bags and (self.layout != "trans" or min(self.bags) < 1):
            raise ValueError(f"bags need the transposed layout and blocks >= 1: {self}")

    def describe(self) -> str:
        """A short line for logs: `trans, bags 2/2/4` or `onednn`."""
        bags = f", bags {'/'.join(map(str, self.bags))}" if self.bags else ""
        return self.layout + bags


class Chooser(Protocol):
    """Picks the plan of the linears of one shape and dtype (`kernels.cpu_tuning.Tuner` times
    them; `default_plan` is the fixed rule)."""

    def __call__(self, weights: Sequence[torch.Tensor], has_bias: bool) -> LinearPlan: ...


def bag_blocks(out_features: int, threads: int) -> int:
    """Column blocks for one token's bag GEMV: one a thread where they divide the outputs."""
    return threads if threads > 1 and out_features % threads == 0 else 1


def default_plan(weights: Sequence[torch.Tensor], has_bias: bool) -> LinearPlan:
    """The fixed rule, for where nothing was measured: bf16 packed by oneDNN on a CPU with bf16
    instructions (`native_bf16`), fp16 in rows, everything else transposed with the bag GEMVs
    of up to `BAG_ROWS` (`BAG_ROWS_CACHED` for a weight an L3 holds) tokens, one block.

    One block (one thread a bag), as in the last rounds: a block a thread was 1.9x slower on a
    shared 2-core host with 7-9 runnable processes (a two-thread GEMV waits out every time
    slice the other core is taken; docs/design.md, CPU speed), and the test suite runs several
    peers on one machine. Where more blocks win, the `cpu_tuning.Tuner` measures it and picks
    them."""
    w = weights[0]
    if w.dtype == torch.bfloat16 and native_bf16():
        return LinearPlan("onednn")
    if w.dtype == torch.float16:
        # fp16 GEMVs of the transposed layout have no fast path in torch's GEMM on a CPU without
        # fp16 instructions (576 -> 1536 took 1.7 ms against 0.30 in rows, the 49152-row head
        # 115 ms against 8.5), and prefill would pay that.
        return LinearPlan("rows")
    cached = w.numel() * w.element_size() <= CACHED_TABLE
    return LinearPlan("trans", (1,) * (BAG_ROWS_CACHED if cached else BAG_ROWS))


class ArenaLinear(nn.Linear):
    """`nn.Linear` with its weight in the arena, and faster GEMVs of a few tokens.

    Where the weight is stored transposed (`(in, out)` in memory behind the usual `(out, in)`
    view), an input of up to `bag_rows` rows is computed as `F.embedding_bag` over those rows,
    a bag a token and column block (`LinearPlan.bags`): the sum of the weight's rows scaled by
    the token's values, which is the GEMV. PyTorch runs it with fbgemm's JIT-compiled kernels,
    which read the weight at nearly the memory's speed, the bags shared out among the threads;
    MKL's GEMM of a few rows may not (see the module's docstring). Each bag is summed alone, so
    a token gets the same bits whether it runs alone or beside a few others. More rows
    (prefill, a larger batch) take `F.linear`, where a GEMM reuses what it reads.
    """

    def __init__(self, linear: nn.Linear) -> None:
        # Not `nn.Linear.__init__`: it would allocate and initialise a weight of its own.
        nn.Module.__init__(self)
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.table: torch.Tensor | None = None  # the weight's (in, out) memory, once laid out
        self.bag_blocks: tuple[int, ...] = ()  # column blocks of the bag GEMV of 1, 2, ... rows
        self.bag_rows = 0  # the most rows (tokens) run as bags: set with the table

    def set_weight(self, weight: torch.Tensor, bags: Sequence[int] = ()) -> None:
        """Take `weight (out, in)` (a view of the arena) as the weight, and the bag GEMVs of
        `len(bags)` rows, `bags[r - 1]` column blocks for `r` rows (transposed weights only)."""
        self.weight = nn.Parameter(weight, requires_grad=False)
        t = weight.t()
        self.table = t if t.is_contiguous() else None
        blocks = tuple(bags) if self.table is not None else ()
        if any(self.out_features % b for b in blocks):
            raise ValueError(f"{self.out_features} outputs do not split into blocks {blocks}")
        self.bag_blocks = blocks
        self.bag_rows = len(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`x (..., in)` -> `(..., out)`."""
        table = self.table
        rows = x.numel() // self.in_features
        if table is None or not 0 < rows <= self.bag_rows or x.dtype != table.dtype:
            return F.linear(x, self.weight, self.bias)
        if not x.is_cpu or x.shape[-1] != self.in_features:
            return F.linear(x, self.weight, self.bias)  # moved since laid out, or a bad shape
        blocks = self.bag_blocks[rows - 1]
        index, offsets = _bags(self.in_features, blocks, rows)
        if blocks == 1:
            weights = x.reshape(-1)  # (rows * in,)
        else:  # row k * blocks + b of the view: inputs k's outputs of block b
            table = table.view(self.in_features * blocks, self.out_features // blocks)
            weights = x.reshape(rows, 1, self.in_features).expand(-1, blocks, -1).reshape(-1)
        y = F.embedding_bag(index, table, offsets, mode="sum", per_sample_weights=weights)
        if self.bias is not None:
            y = y.view(rows, self.out_features).add_(self.bias)
        return y.view(*x.shape[:-1], self.out_features)


@functools.cache
def _bags(in_features: int, blocks: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`embedding_bag`'s indices and offsets for `rows` tokens' GEMVs in `blocks` column blocks,
    bag `(r, b)` of every input's row of block `b` (row `k * blocks + b` of the table's
    `(in * blocks, out / blocks)` view); shared by the linears of that width (a model of
    thousands of experts would otherwise hold a copy each)."""
    one = torch.arange(in_features) * blocks  # (in,)
    index = (one[None, :] + torch.arange(blocks)[:, None]).flatten().repeat(rows)
    return index, torch.arange(0, rows * blocks * in_features, in_features)


def pack_linears(module: M, choose: Chooser | None = None) -> M:
    """Give every CPU `nn.Linear` of `module` its fast layout, in place.

    Args:
        module: a loaded model; weights not on the CPU are left alone, and linears already
            laid out. Apply it last: after quantization, which replaces the linears it
            quantizes.
        choose: picks the plan of each shape and dtype (`kernels.cpu_tuning.Tuner` measures);
            None: `default_plan`, the fixed rule.
    Returns:
        `module` itself: "onednn" linears became `PackedLinear`s, the others `ArenaLinear`s,
        their weights of each dtype in one huge-page arena.
    """
    choose = choose or default_plan
    found: dict[int, nn.Linear] = {}  # a linear shared by two parents is laid out once
    places: list[tuple[nn.Module, str, int]] = []
    for parent in list(module.modules()):
        for name, lin in list(parent.named_children()):
            if not isinstance(lin, nn.Linear) or isinstance(lin, ArenaLinear):
                continue
            if lin.weight.device.type != "cpu":
                continue
            found.setdefault(id(lin), lin)
            places.append((parent, name, id(lin)))
    groups: dict[tuple[torch.dtype, int, int, bool], list[nn.Linear]] = {}
    for lin in found.values():
        key = (lin.weight.dtype, lin.out_features, lin.in_features, lin.bias is not None)
        groups.setdefault(key, []).append(lin)
    done: dict[int, nn.Module] = {}
    by_dtype: dict[torch.dtype, list[tuple[ArenaLinear, LinearPlan]]] = {}
    for (dtype, *_, has_bias), linears in groups.items():
        plan = choose([lin.weight.detach() for lin in linears], has_bias)
        for lin in linears:
            if plan.layout == "onednn":
                done[id(lin)] = PackedLinear(lin)
            else:
                done[id(lin)] = arena = ArenaLinear(lin)
                by_dtype.setdefault(dtype, []).append((arena, plan))
    for parent, name, ident in places:
        setattr(parent, name, done[ident])
    for laid_out in by_dtype.values():
        _into_arena(laid_out)
    return module


def _into_arena(linears: list[tuple[ArenaLinear, LinearPlan]]) -> None:
    """Each weight moves into one shared arena, `(in, out)` memory behind an `(out, in)` view
    where its plan says "trans", else the usual `(out, in)`. The linears share one dtype."""
    dtype = linears[0][0].weight.dtype
    size = dtype.itemsize
    sizes = [-(-lin.weight.numel() * size // _ALIGN) * _ALIGN for lin, _ in linears]
    arena = huge_page_arena(sum(sizes))
    offset = 0
    for (lin, plan), nbytes_aligned in zip(linears, sizes, strict=True):
        out_features, in_features = lin.weight.shape
        nbytes = lin.weight.numel() * size
        flat = arena[offset : offset + nbytes].view(dtype)
        if plan.layout == "trans":
            dst = flat.view(in_features, out_features)
            dst.copy_(lin.weight.detach().t())
            lin.set_weight(dst.t(), plan.bags)
        else:
            dst = flat.view(out_features, in_features)
            dst.copy_(lin.weight.detach())
            lin.set_weight(dst)
        offset += nbytes_aligned
