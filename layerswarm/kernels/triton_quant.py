# mypy: disable-error-code="no-untyped-def, untyped-decorator"
# (@triton.jit is untyped; kernel parameters are pointers and tl.constexpr, with no annotation.)
"""Triton weight-only int8/int4 matmuls: a GEMV kernel for decode rows, a GEMM kernel for prefill.

Formats are those of `layerswarm.kernels.quant`. Both kernels dequantize a weight tile in
registers right after loading it, so the weight crosses memory once, at 1 or 0.5 bytes a value:
decode is bound by that traffic. A few rows (decode) run the GEMV kernel, one program per
(output block, row), accumulating elementwise in fp32; more rows run the GEMM kernel on tensor
cores (`tl.dot`), padding the row block to 16 as `tl.dot` needs.

Block sizes are fixed heuristics, not autotuned: autotuning needs a GPU to run on, and none was
at hand when these were written (`scripts/bench_kernels.py` measures them against cuBLAS).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from layerswarm.kernels.quant import INT4_ZERO
from layerswarm.kernels.triton_common import dot_flags

GEMV_MAX_ROWS = 4  # unit: rows; up to this many the GEMV kernel runs, one program per row
_ZERO = tl.constexpr(INT4_ZERO)  # a jitted kernel may read a global only if it is a constexpr


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, s_ptr, bias_ptr, out_ptr,
    N, K, stride_xm, stride_wn, stride_sg, stride_om, group_size,
    INT4: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # One program: BLOCK_N outputs of one row. For int4, BLOCK_K divides the group size, so a
    # step sees one (scale, zero) per output.
    m = tl.program_id(1).to(tl.int64)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    if INT4:
        half = tl.arange(0, BLOCK_K // 2)
        acc = tl.zeros([BLOCK_N, BLOCK_K // 2], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            j = k0 // 2 + half  # byte index along the packed row
            ok = n_ok[:, None] & (j < K // 2)[None, :]
            b = tl.load(w_ptr + rn[:, None] * stride_wn + j[None, :], mask=ok, other=0).to(tl.int32)
            g = k0 // group_size
            s = tl.load(s_ptr + g * stride_sg + rn * 2, mask=n_ok, other=0.0).to(tl.float32)
            z = tl.load(s_ptr + g * stride_sg + rn * 2 + 1, mask=n_ok, other=0.0).to(tl.float32)
            x_even = tl.load(x_ptr + m * stride_xm + 2 * j, mask=j < K // 2, other=0.0).to(
                tl.float32
            )
            x_odd = tl.load(x_ptr + m * stride_xm + 2 * j + 1, mask=j < K // 2, other=0.0).to(
                tl.float32
            )
            w_lo = ((b & 15) - _ZERO).to(tl.float32) * s[:, None] + z[
                :, None
            ]  # (BLOCK_N, BLOCK_K/2)
            w_hi = ((b >> 4) - _ZERO).to(tl.float32) * s[:, None] + z[:, None]
            acc += w_lo * x_even[None, :] + w_hi * x_odd[None, :]
        out = tl.sum(acc, axis=1)
    else:
        rk = tl.arange(0, BLOCK_K)
        acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + rk
            ok = n_ok[:, None] & (k < K)[None, :]
            w = tl.load(w_ptr + rn[:, None] * stride_wn + k[None, :], mask=ok, other=0).to(
                tl.float32
            )
            x = tl.load(x_ptr + m * stride_xm + k, mask=k < K, other=0.0).to(tl.float32)
            acc += w * x[None, :]
        s = tl.load(s_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
        out = tl.sum(acc, axis=1) * s
    if HAS_BIAS:
        out += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + m * stride_om + rn, out.to(out_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _gemm_kernel(
    x_ptr, w_ptr, s_ptr, bias_ptr, out_ptr,
    M, N, K, stride_xm, stride_wn, stride_sg, stride_om, group_size,
    INT4: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    x_rows = x_ptr + rm[:, None].to(tl.int64) * stride_xm
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    if INT4:
        half = tl.arange(0, BLOCK_K // 2)
        for k0 in range(0, K, BLOCK_K):
            j = k0 // 2 + half  # bytes along the packed rows
            j_ok = j < K // 2
            b = tl.load(
                w_ptr + rn[None, :] * stride_wn + j[:, None],
                mask=j_ok[:, None] & n_ok[None, :],
                other=0,
            ).to(tl.int32)  # (BLOCK_K/2, BLOCK_N)
            g = k0 // group_size
            s = tl.load(s_ptr + g * stride_sg + rn * 2, mask=n_ok, other=0.0).to(tl.float32)
            z = tl.load(s_ptr + g * stride_sg + rn * 2 + 1, mask=n_ok, other=0.0).to(tl.float32)
            x_mask = m_ok[:, None] & j_ok[None, :]
            x_even = tl.load(
                x_rows + 2 * j[None, :], mask=x_mask, other=0.0
            )  # (BLOCK_M, BLOCK_K/2)
            x_odd = tl.load(x_rows + 2 * j[None, :] + 1, mask=x_mask, other=0.0)
            w_lo = ((b & 15) - _ZERO).to(tl.float32) * s[None, :] + z[None, :]
            w_hi = ((b >> 4) - _ZERO).to(tl.float32) * s[None, :] + z[None, :]
            if UPCAST:
                x_even = x_even.to(tl.float32)
                x_odd = x_odd.to(tl.float32)
            acc = tl.dot(x_even, w_lo.to(x_even.dtype), acc, input_precision=PREC)
            acc = tl.dot(x_odd, w_hi.to(x_odd.dtype), acc, input_precision=PREC)
    else:
        rk = tl.arange(0, BLOCK_K)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + rk
            k_ok = k < K
            x = tl.load(x_rows + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(
                w_ptr + rn[None, :] * stride_wn + k[:, None],
                mask=k_ok[:, None] & n_ok[None, :],
                other=0,
            )  # (BLOCK_K, BLOCK_N) int8
            if UPCAST:
                x = x.to(tl.float32)
            acc = tl.dot(x, w.to(x.dtype), acc, input_precision=PREC)
        acc = acc * tl.load(s_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    o_ptrs = out_ptr + rm[:, None].to(tl.int64) * stride_om + rn[None, :]
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def _launch(
    x: torch.Tensor,
    weight: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    n: int,
    group_size: int,
) -> torch.Tensor:
    """Shared launcher: `x (rows, in)` -> `(rows, n)`; int4 when `group_size` > 0."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    rows, k = x.shape
    int4 = group_size > 0
    out = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    scales = scales.contiguous()
    stride_sg = scales.stride(0) if int4 else 0
    bias_arg = bias if bias is not None else scales  # unused when HAS_BIAS is off
    common = dict(INT4=int4, HAS_BIAS=bias is not None)
    if rows <= GEMV_MAX_ROWS:
        block_k = min(group_size, 128) if int4 else 256
        grid = (triton.cdiv(n, 8), rows)
        _gemv_kernel[grid](
            x, weight, scales, bias_arg, out,
            n, k, x.stride(0), weight.stride(0), stride_sg, out.stride(0), max(group_size, 1),
            BLOCK_N=8, BLOCK_K=block_k, num_warps=4, **common,
        )  # fmt: skip
        return out
    upcast, prec = dot_flags(x)
    block_m = 16 if rows <= 16 else 32 if rows <= 32 else 64
    block_k = min(group_size, 64) if int4 else 64
    grid = (triton.cdiv(rows, block_m), triton.cdiv(n, 64))
    _gemm_kernel[grid](
        x, weight, scales, bias_arg, out,
        rows, n, k, x.stride(0), weight.stride(0), stride_sg, out.stride(0), max(group_size, 1),
        UPCAST=upcast, PREC=prec, BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=block_k, num_warps=4,
        **common,
    )  # fmt: skip
    return out


def int8_matmul(
    x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """`x (rows, in)` @ int8 `weight (out, in)` scaled by `scales (out,)`, + bias: `(rows, out)`."""
    return _launch(x, weight, scales, bias, weight.shape[0], 0)


def int4_matmul(
    x: torch.Tensor,
    weight: torch.Tensor,
    scales_zeros: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """`x (rows, in)` @ int4 `weight (out, in / 2)` with `scales_zeros (in / group, out, 2)`.

    Raises:
        ValueError: `group_size` is not a power of two of at least 32 (the kernels step along
            the inputs in blocks that must divide a group and fill a `tl.dot`).
    """
    if group_size < 32 or group_size & (group_size - 1):
        raise ValueError(
            f"the Triton int4 kernels take power-of-two groups >= 32, not {group_size}"
        )
    return _launch(x, weight, scales_zeros, bias, weight.shape[0], group_size)
