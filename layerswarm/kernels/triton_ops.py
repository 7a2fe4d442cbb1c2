# mypy: disable-error-code="no-untyped-def, untyped-decorator"
# (@triton.jit is untyped; kernel parameters are pointers and tl.constexpr, with no annotation.)
"""Triton kernels for the span math on CUDA, with the signatures of `kernels.reference`.

This module holds RMSNorm (with the fused residual add), RoPE and SwiGLU; the attention
kernels live in `triton_attention` and are re-exported here, so `ops_for` sees one module with
the same six functions as `reference`. Only the `triton_*` modules import triton: a CPU-only
install never touches it.

Every kernel loads its inputs, computes in fp32, and rounds once when it stores. On CPU tensors
the kernels run in Triton's interpreter (`TRITON_INTERPRET=1`, the tests): there bf16 arithmetic
is wrong unless each loaded value is cast to fp32 first, which these kernels always do.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from layerswarm.kernels.triton_attention import decode_attention, prefill_attention

__all__ = [
    "add_rms_norm",
    "apply_rope",
    "decode_attention",
    "prefill_attention",
    "rms_norm",
    "swiglu",
]


def _warps(block: int) -> int:
    """Warps for a one-row program: enough threads to cover `block` elements in a few passes."""
    return 4 if block <= 1024 else 8 if block <= 4096 else 16


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    sum_ptr,
    stride_x,
    stride_res,
    stride_out,
    stride_sum,
    hidden,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # One program normalizes one row of `hidden` values.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0).to(tl.float32)
        # The sum is the next residual: round it to the model dtype as `x + residual` would.
        s = (x + r).to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * stride_sum + cols, s, mask=mask)
        x = s.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / hidden + eps)
    # The twin rounds the normalized row to x's dtype before the weight multiplies it.
    y = (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (w * y).to(out_ptr.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """`(..., hidden)` -> `(rows, hidden)` with unit stride along hidden (a view when it can be)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    hidden = x.shape[-1]
    x2 = _rows(x)  # (rows, hidden)
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    out = torch.empty(x2.shape, dtype=out_dtype, device=x.device)
    if residual is None:
        r2, s2 = x2, out  # unused: HAS_RESIDUAL is off
    else:
        r2 = _rows(residual)
        s2 = torch.empty_like(x2)
    block = triton.next_power_of_2(hidden)
    _rms_norm_kernel[(x2.shape[0],)](
        x2, r2, weight.contiguous(), out, s2,
        x2.stride(0), r2.stride(0), out.stride(0), s2.stride(0),
        hidden, eps,
        HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=_warps(block),
    )  # fmt: skip
    total = None if residual is None else s2.reshape(x.shape)
    return out.reshape(x.shape), total


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last axis, as `reference.rms_norm`.

    Args:
        x: `(..., hidden)`.
        weight: `(hidden,)`.
    Returns:
        `(..., hidden)` in `x.dtype`.
    """
    return _norm(x, None, weight, eps)[0]


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """`s = x + residual`, then RMSNorm of `s`, in one pass. Returns `(normed, s)`."""
    normed, total = _norm(x, residual, weight, eps)
    assert total is not None  # a residual was given
    return normed, total


@triton.jit
def _rope_kernel(
    x_ptr,
    cos_ptr,
    sin_ptr,
    stride_xt,
    stride_xh,
    stride_ct,
    heads,
    half,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    # One program rotates every head of one token: x1' = x1 c1 - x2 s1, x2' = x2 c2 + x1 s2.
    t = tl.program_id(0).to(tl.int64)
    h = tl.arange(0, BLOCK_H)[:, None]  # (BLOCK_H, 1)
    d = tl.arange(0, BLOCK_HALF)[None, :]  # (1, BLOCK_HALF)
    mask = (h < heads) & (d < half)
    c1 = tl.load(cos_ptr + t * stride_ct + d, mask=d < half, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + t * stride_ct + half + d, mask=d < half, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + t * stride_ct + d, mask=d < half, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + t * stride_ct + half + d, mask=d < half, other=0.0).to(tl.float32)
    p1 = x_ptr + t * stride_xt + h * stride_xh + d  # (BLOCK_H, BLOCK_HALF)
    p2 = p1 + half
    x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(p2, mask=mask, other=0.0).to(tl.float32)
    tl.store(p1, (x1 * c1 - x2 * s1).to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(p2, (x2 * c2 + x1 * s2).to(x_ptr.dtype.element_ty), mask=mask)


def _rope_one(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate `x (tokens, heads, head_dim)` in place; its last axis must have unit stride."""
    tokens, heads, head_dim = x.shape
    if x.stride(2) != 1:
        raise ValueError("apply_rope needs q and k with a unit stride along head_dim")
    half = head_dim // 2
    _rope_kernel[(tokens,)](
        x, cos, sin, x.stride(0), x.stride(1), cos.stride(0), heads, half,
        BLOCK_H=triton.next_power_of_2(heads), BLOCK_HALF=triton.next_power_of_2(half),
    )  # fmt: skip


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate q and k in place (half-split layout), as `reference.apply_rope`.

    Args:
        q: `(tokens, q_heads, head_dim)`.
        k: `(tokens, kv_heads, head_dim)`.
        cos, sin: `(tokens, head_dim)`, fp32 (any Llama 3 scaling already folded in).
    """
    cos, sin = cos.contiguous(), sin.contiguous()
    _rope_one(q, cos, sin)
    _rope_one(k, cos, sin)


@triton.jit
def _swiglu_kernel(
    gate_ptr, up_ptr, out_ptr, stride_g, stride_u, stride_o, cols, BLOCK: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = c < cols
    g = tl.load(gate_ptr + row * stride_g + c, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + row * stride_u + c, mask=mask, other=0.0).to(tl.float32)
    # Round silu(g) to the model dtype as F.silu does, so the product matches the twin.
    act = (g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * stride_o + c, (act * u).to(out_ptr.dtype.element_ty), mask=mask)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up` in one pass; `gate` and `up` may be the two halves of one tensor.

    Args:
        gate, up: `(..., intermediate)`, with a unit stride along the last axis (the halves of
            a fused gate/up projection qualify: no copy is made).
    Returns:
        `(..., intermediate)`, contiguous.
    """
    cols = gate.shape[-1]
    g2, u2 = _rows(gate), _rows(up)  # (rows, intermediate)
    out = torch.empty(g2.shape, dtype=gate.dtype, device=gate.device)
    block = min(1024, triton.next_power_of_2(cols))
    grid = (g2.shape[0], triton.cdiv(cols, block))
    _swiglu_kernel[grid](g2, u2, out, g2.stride(0), u2.stride(0), out.stride(0), cols, BLOCK=block)
    return out.reshape(gate.shape)
