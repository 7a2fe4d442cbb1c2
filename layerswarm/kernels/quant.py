"""Weight-only int8/int4 matmul: packing formats, the plain-torch twins, and the pick per device.

Formats (activations stay in the model's dtype; only weights shrink):

- int8: `weight (out, in) int8`, symmetric per output channel, `scales (out,)`;
  `w = q * scale`.
- int4: `weight (out, in / 2) uint8`, two values per byte (even `k` in the low nibble, odd `k`
  in the high one), asymmetric per group of `group_size` inputs, `scales_zeros
  (in / group_size, out, 2)` holding `(scale, zero)`; `w = (q - 8) * scale + zero`. This is the
  scale/zero convention of torch's int4 kernels, so one tensor serves every path.

On CUDA the Triton kernels of `triton_quant` run. On a CPU, torch's own weight-only kernels
serve decode: `torch._weight_int8pack_mm` up to `CPU_PACKED_MAX_ROWS` rows, and
`_weight_int4pack_mm_for_cpu` (on weights repacked into its own CPU-specific layout, `"cpu"`;
`"rows"` is the portable one above) for int4. Both have a fast path for bf16 inputs only (fp32
inputs: 3.7x slower for int8, 21x for int4, one thread, SmolLM2's 960 x 576 on a Xeon with
AMX), so an fp32 model's activations are rounded to bf16 for them and the product comes back in
fp32 (a relative error of ~2^-9 an input, below int8's own rounding of the weights: 5.8e-3 of a
product for 960 x 576). From more rows up, and for fp16 models, the weight is dequantized and
`F.linear` runs (docs/kernels.md has the measurements).
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch
import torch.nn.functional as F

INT4_ZERO = 8  # the stored value that means `zero` (values 0..15 are offset by 8)
CPU_PACKED_MAX_ROWS = 16  # unit: rows; above this the CPU int8 path dequantizes and uses BLAS
CPU_KERNEL_DTYPE = torch.bfloat16  # the input dtype torch's CPU int8/int4 kernels are fast in
_CPU_KERNEL_INPUTS = (torch.bfloat16, torch.float32)  # model dtypes that take those kernels
_QUANT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8.

    Args:
        w: `(out, in)` float weight.
    Returns:
        `(q, scales)`: `q (out, in)` int8 in [-127, 127], `scales (out,)` in `w.dtype`.
    """
    wf = w.float()
    scales = (wf.abs().amax(dim=1) / 127).clamp(min=1e-12)  # (out,)
    q = torch.round(wf / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales.to(w.dtype)


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """`(out, in)` weight in `scales.dtype`."""
    return q.to(scales.dtype) * scales[:, None]


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric group-wise int4, packed two values per byte.

    Args:
        w: `(out, in)` float weight; `in` must be a multiple of `group_size`.
        group_size: inputs that share one scale and zero.
    Returns:
        `(packed, scales_zeros)`: `packed (out, in / 2)` uint8 in the `"rows"` layout,
        `scales_zeros (in / group_size, out, 2)` in `w.dtype`.
    Raises:
        ValueError: `in` is not a multiple of `group_size`, or `group_size` is odd.
    """
    n, k = w.shape
    if k % group_size or group_size % 2:
        raise ValueError(
            f"int4 needs in_features ({k}) a multiple of an even group size ({group_size})"
        )
    g = w.float().reshape(n, k // group_size, group_size)  # (out, groups, group_size)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)  # (out, groups)
    scale = ((hi - lo) / 15).clamp(min=1e-12)
    q = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8)
    zero = lo + INT4_ZERO * scale  # so that (q - 8) * scale + zero == q * scale + lo
    scales_zeros = torch.stack((scale, zero), dim=-1).transpose(0, 1).contiguous()
    return pack_int4(q.reshape(n, k)), scales_zeros.to(w.dtype)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """`q (out, in)` values 0..15 -> `(out, in / 2)` uint8, even `k` in the low nibble."""
    q = q.to(torch.uint8)
    return q[:, ::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """`(out, in / 2)` uint8 in the `"rows"` layout -> `(out, in)` uint8 values 0..15."""
    return torch.stack((packed & 15, packed >> 4), dim=-1).flatten(1)


def dequantize_int4(
    packed: torch.Tensor, scales_zeros: torch.Tensor, group_size: int
) -> torch.Tensor:
    """`(out, in)` weight in `scales_zeros.dtype`, from the `"rows"` layout."""
    n, k = packed.shape[0], packed.shape[1] * 2
    w = torch.empty((n, k), dtype=scales_zeros.dtype, device=packed.device)
    w[:, 0::2] = packed & 15
    w[:, 1::2] = packed >> 4
    sz = scales_zeros.transpose(0, 1)  # (out, groups, 2)
    # In place: 13x faster than the out-of-place broadcast for fp32 on the measured CPU.
    g = w.view(n, k // group_size, group_size)
    g.sub_(INT4_ZERO).mul_(sz[..., :1]).add_(sz[..., 1:])
    return w


def cpu_int4_supported(out_features: int, group_size: int, dtype: torch.dtype) -> bool:
    """Whether torch's CPU int4 kernel takes this weight and is worth it for `dtype`.

    It needs `out` a multiple of 16. bf16 and fp32 models use it (fp32 through bf16 inputs, see
    the module's docstring); fp16 models do not (the kernel's fp16 path ran 20-25x slower than
    `F.linear` on an AVX2 CPU, docs/kernels.md).
    """
    op = getattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", None)
    shape_ok = out_features % 16 == 0 and group_size in (32, 64, 128, 256)
    return op is not None and shape_ok and dtype in _CPU_KERNEL_INPUTS


def to_cpu_int4_layout(packed: torch.Tensor) -> torch.Tensor:
    """`"rows"` -> the layout of `_weight_int4pack_mm_for_cpu` (it depends on the CPU's ISA)."""
    q = unpack_int4(packed.cpu()).to(torch.int32)  # (out, in)
    converted: torch.Tensor = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    return converted


def from_cpu_int4_layout(cpu_packed: torch.Tensor) -> torch.Tensor:
    """Invert `to_cpu_int4_layout` exactly, whatever the CPU's layout is.

    The conversion only moves nibbles, so it is probed: convert matrices whose values are the
    base-16 digits of each element's index, then read off where every element went.
    """
    n, k = cpu_packed.shape[0], cpu_packed.shape[1] * 2
    index = torch.arange(n * k, dtype=torch.int64)
    source = torch.zeros(n * k, dtype=torch.int64)  # source[j]: element stored at nibble j
    shift = 0
    while (1 << shift) < n * k:
        digit = ((index >> shift) & 15).to(torch.int32).reshape(n, k)
        moved = torch.ops.aten._convert_weight_to_int4pack_for_cpu(digit, 1)
        source |= _nibbles(moved).to(torch.int64) << shift
        shift += 4
    values = torch.empty(n * k, dtype=torch.uint8)
    values[source] = _nibbles(cpu_packed.cpu())
    return pack_int4(values.reshape(n, k)).to(cpu_packed.device)


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Every nibble of a uint8 tensor in storage order, low before high: `(2 * numel,)`."""
    return torch.stack((packed & 15, packed >> 4), dim=-1).flatten()


def _triton() -> ModuleType:
    return importlib.import_module("layerswarm.kernels.triton_quant")


def _use_triton(x: torch.Tensor, backend: str | None) -> bool:
    if backend not in (None, "torch", "triton"):
        raise ValueError(f"unknown kernel backend {backend!r}")
    return backend == "triton" or (backend is None and x.is_cuda)


def int8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None = None,
    backend: str | None = None,
    kernel_scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """`x @ (weight * scales).T + bias` without materializing the float weight where it pays.

    Args:
        x: `(..., in)` in the model dtype.
        weight: `(out, in)` int8; scales: `(out,)` in the model dtype.
        backend: "torch" or "triton" to force one (tests); None: Triton on CUDA, else torch.
        kernel_scales: `scales` already in `CPU_KERNEL_DTYPE`, for the CPU kernel (a
            `QuantLinear` keeps one, so an fp32 model does not convert them every step).
    Returns:
        `(..., out)` in `x.dtype`.
    """
    x2 = x.reshape(-1, x.shape[-1])  # (rows, in)
    out: torch.Tensor
    if _use_triton(x, backend):
        out = _triton().int8_matmul(x2, weight, scales, bias)
    else:
        out = _int8_torch(x2, weight, scales, kernel_scales)
        if bias is not None:
            out = out + bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


def _int8_torch(
    x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, kernel_scales: torch.Tensor | None
) -> torch.Tensor:
    # `_weight_int8pack_mm` crashed (SIGSEGV) on torch 2.13 CPU for bf16 inputs whose in_features
    # is not a multiple of 16 (72, 50, 40, 8 tried): use it only when that holds.
    packed_ok = (
        x.device.type == "cpu"
        and x.dtype in _CPU_KERNEL_INPUTS
        and x.shape[0] <= CPU_PACKED_MAX_ROWS
        and weight.shape[1] % 16 == 0
    )
    if packed_ok:
        k = CPU_KERNEL_DTYPE
        ks = scales.to(k) if kernel_scales is None else kernel_scales
        out = torch._weight_int8pack_mm(x.to(k).contiguous(), weight, ks)
        return out.to(x.dtype)
    return F.linear(x, dequantize_int8(weight, scales.to(x.dtype)))


def int4_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scales_zeros: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
    layout: str = "rows",
    backend: str | None = None,
    kernel_scales_zeros: torch.Tensor | None = None,
) -> torch.Tensor:
    """`x @ W.T + bias` for an int4 weight `W` (see the module docstring for the format).

    Args:
        x: `(..., in)` in the model dtype.
        weight: `(out, in / 2)` uint8 in `layout` ("rows", or "cpu" for torch's CPU kernel).
        scales_zeros: `(in / group_size, out, 2)` in the model dtype.
        backend: "torch" or "triton" to force one (tests); None: Triton on CUDA, else torch.
        kernel_scales_zeros: `scales_zeros` already in `CPU_KERNEL_DTYPE`, for the "cpu"
            layout's kernel (as `int8_linear`'s `kernel_scales`).
    Returns:
        `(..., out)` in `x.dtype`.
    """
    x2 = x.reshape(-1, x.shape[-1])  # (rows, in)
    n = weight.shape[0]
    out: torch.Tensor
    if layout == "cpu":
        if x2.dtype not in _QUANT_DTYPES:
            raise ValueError(f"int4 on CPU takes fp32/fp16/bf16 inputs, not {x2.dtype}")
        k = CPU_KERNEL_DTYPE if x2.dtype in _CPU_KERNEL_INPUTS else x2.dtype
        sz = scales_zeros.to(k) if kernel_scales_zeros is None else kernel_scales_zeros
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x2.to(k).contiguous(), weight, group_size, sz
        )
        out = out.to(x2.dtype)
        if bias is not None:
            out = out + bias
    elif _use_triton(x, backend):
        out = _triton().int4_matmul(x2, weight, scales_zeros, group_size, bias)
    else:
        w = dequantize_int4(weight, scales_zeros.to(x.dtype), group_size)
        out = F.linear(x2, w, bias)
    return out.reshape(*x.shape[:-1], n)
