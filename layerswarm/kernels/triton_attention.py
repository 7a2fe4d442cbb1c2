# mypy: disable-error-code="no-untyped-def, untyped-decorator"
# (@triton.jit is untyped; kernel parameters are pointers and tl.constexpr, with no annotation.)
"""Triton attention: batched decode over the paged KV cache, and causal prefill of one session.

Decode is flash-decoding: a session's context is cut into splits along the sequence, one
program per (session, kv head, split) computes a softmax-normalized partial output and its
log-sum-exp, and a small reduce kernel merges the splits. With many sessions or short contexts
there is one split and the first kernel writes the final output directly. The programs of one
kv head handle its whole GQA group of query heads, so each key and value is read once per step.

Prefill is flash-attention forward (online softmax over key blocks, causal with an offset for a
session that already holds `start` tokens). It is written here rather than delegated to SDPA so
that GQA needs no expanded copy of k and v and a prefill that continues a cached context needs no
dense mask; `scripts/bench_kernels.py` compares it with SDPA on a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from layerswarm.kernels.triton_common import dot_flags, programs_wanted

LOG2E = 1.4426950408889634  # exp(x) == exp2(x * LOG2E); exp2 is the faster instruction
DECODE_BLOCK_N = 32  # unit: keys per inner step of a decode program
MIN_SPLIT_TOKENS = 128  # unit: fewest keys worth a program of their own (the reduce costs too)


@triton.jit
def _decode_split_kernel(
    q_ptr, k_ptr, v_ptr, table_ptr, len_ptr, out_ptr, lse_ptr,
    stride_qb, stride_qh,
    stride_kp, stride_ks, stride_kh,
    stride_vp, stride_vs, stride_vh,
    stride_tb,
    stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh,
    scale_log2, group, head_dim, page_size, split_tokens,
    FINAL: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    length = tl.load(len_ptr + b)
    lo = split * split_tokens
    hi = tl.minimum(lo + split_tokens, length)
    g = tl.arange(0, BLOCK_G)  # query heads of this kv head's group
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    heads = kvh * group + g
    q_mask = (g < group)[:, None] & d_ok[None, :]
    q = tl.load(
        q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=q_mask, other=0.0
    )
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)  # (BLOCK_N,) token positions in the session
        ok = pos < hi
        page = tl.load(table_ptr + b * stride_tb + pos // page_size, mask=ok, other=0).to(tl.int64)
        slot = pos % page_size
        kv_mask = ok[:, None] & d_ok[None, :]
        k = tl.load(
            k_ptr
            + page[:, None] * stride_kp
            + slot[:, None] * stride_ks
            + kvh * stride_kh
            + d[None, :],
            mask=kv_mask,
            other=0.0,
        )  # (BLOCK_N, BLOCK_D)
        v = tl.load(
            v_ptr
            + page[:, None] * stride_vp
            + slot[:, None] * stride_vs
            + kvh * stride_vh
            + d[None, :],
            mask=kv_mask,
            other=0.0,
        )
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale_log2  # (BLOCK_G, BLOCK_N)
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    # An empty split (past the session's length) has l == 0 and acc == 0: store zeros, lse -inf.
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    o_ptrs = out_ptr + b * stride_ob + heads[:, None] * stride_oh + split * stride_os + d[None, :]
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=q_mask)
    if not FINAL:
        # log2 of the split's softmax denominator, in scaled units; -inf when it is empty
        lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf"))
        tl.store(lse_ptr + b * stride_lb + heads * stride_lh + split, lse, mask=g < group)


@triton.jit
def _decode_reduce_kernel(
    part_ptr, lse_ptr, out_ptr,
    stride_pb, stride_ph, stride_ps,
    stride_lb, stride_lh,
    stride_ob, stride_oh,
    splits, head_dim,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    # Merge the splits of one (session, query head): weights are each split's share of the sum.
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    lse = tl.load(lse_ptr + b * stride_lb + h * stride_lh + s, mask=s < splits, other=float("-inf"))
    w = tl.exp2(lse - tl.max(lse, axis=0))  # (BLOCK_S,), 0 for empty splits
    mask = (s < splits)[:, None] & (d < head_dim)[None, :]
    part = tl.load(
        part_ptr + b * stride_pb + h * stride_ph + s[:, None] * stride_ps + d[None, :],
        mask=mask,
        other=0.0,
    )  # (BLOCK_S, BLOCK_D)
    out = tl.sum(w[:, None] * part, axis=0) / tl.sum(w, axis=0)
    tl.store(
        out_ptr + b * stride_ob + h * stride_oh + d,
        out.to(out_ptr.dtype.element_ty),
        mask=d < head_dim,
    )


def _split_tokens(sessions: int, kv_heads: int, max_context: int, device: torch.device) -> int:
    """Keys per split: enough splits to fill the GPU, none shorter than MIN_SPLIT_TOKENS."""
    want = triton.cdiv(programs_wanted(device), sessions * kv_heads)
    splits = max(1, min(want, triton.cdiv(max_context, MIN_SPLIT_TOKENS)))
    return int(triton.cdiv(triton.cdiv(max_context, splits), DECODE_BLOCK_N) * DECODE_BLOCK_N)


def decode_attention(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    block_table: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
    *,
    split_tokens: int | None = None,
) -> torch.Tensor:
    """One new token per session over its paged KV cache, as `reference.decode_attention`.

    Args:
        q: `(sessions, q_heads, head_dim)`.
        k_pages, v_pages: `(num_pages, page_size, kv_heads, head_dim)`, one layer's page pool.
        block_table: `(sessions, max_pages)` int32, the pages of each session in order.
        lengths: `(sessions,)` int32, tokens in each session's context (the new one included).
        split_tokens: keys per split (flash-decoding); None picks from the GPU's size and the
            table's width, never syncing on `lengths`.
    Returns:
        `(sessions, q_heads, head_dim)`.
    """
    sessions, q_heads, head_dim = q.shape
    _, page_size, kv_heads, _ = k_pages.shape
    if k_pages.stride(3) != 1 or v_pages.stride(3) != 1 or q.stride(2) != 1:
        raise ValueError("decode_attention needs a unit stride along head_dim")
    group = q_heads // kv_heads
    max_context = block_table.shape[1] * page_size
    if split_tokens is None:
        split_tokens = _split_tokens(sessions, kv_heads, max_context, q.device)
    splits = triton.cdiv(max_context, split_tokens)
    out = torch.empty_like(q)
    final = splits == 1
    if final:
        part, lse = out[:, :, None, :], out  # (sessions, q_heads, 1, head_dim); lse unused
    else:
        part = torch.empty(
            (sessions, q_heads, splits, head_dim), dtype=torch.float32, device=q.device
        )
        lse = torch.empty((sessions, q_heads, splits), dtype=torch.float32, device=q.device)
    upcast, prec = dot_flags(q)
    block_d = max(16, triton.next_power_of_2(head_dim))
    _decode_split_kernel[(sessions, kv_heads, splits)](
        q, k_pages, v_pages, block_table, lengths, part, lse,
        q.stride(0), q.stride(1),
        k_pages.stride(0), k_pages.stride(1), k_pages.stride(2),
        v_pages.stride(0), v_pages.stride(1), v_pages.stride(2),
        block_table.stride(0),
        part.stride(0), part.stride(1), part.stride(2),
        lse.stride(0), lse.stride(1),
        scale * LOG2E, group, head_dim, page_size, split_tokens,
        FINAL=final, UPCAST=upcast, PREC=prec,
        BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_N=DECODE_BLOCK_N, BLOCK_D=block_d,
        num_warps=4,
    )  # fmt: skip
    if not final:
        _decode_reduce_kernel[(sessions, q_heads)](
            part, lse, out,
            part.stride(0), part.stride(1), part.stride(2),
            lse.stride(0), lse.stride(1),
            out.stride(0), out.stride(1),
            splits, head_dim,
            BLOCK_S=triton.next_power_of_2(splits), BLOCK_D=block_d,
        )  # fmt: skip
    return out


@triton.jit
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr,
    stride_qt, stride_qh,
    stride_kt, stride_kh,
    stride_vt, stride_vh,
    stride_ot, stride_oh,
    tokens, start, group, head_dim, scale_log2,
    UPCAST: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    # One program: BLOCK_M queries of one head against every key they may see.
    m0 = tl.program_id(0) * BLOCK_M
    h = tl.program_id(1)
    kvh = h // group
    i = m0 + tl.arange(0, BLOCK_M)  # query rows
    q_pos = start + i  # their positions in the session
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    q_mask = (i < tokens)[:, None] & d_ok[None, :]
    q = tl.load(
        q_ptr + i[:, None].to(tl.int64) * stride_qt + h * stride_qh + d[None, :],
        mask=q_mask,
        other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    context = start + tokens
    hi = tl.minimum(start + m0 + BLOCK_M, context)  # keys past the block's last query are masked
    for n0 in range(0, hi, BLOCK_N):
        k_pos = n0 + tl.arange(0, BLOCK_N)
        kv_mask = (k_pos < context)[:, None] & d_ok[None, :]
        rows = k_pos[:, None].to(tl.int64)
        k = tl.load(
            k_ptr + rows * stride_kt + kvh * stride_kh + d[None, :], mask=kv_mask, other=0.0
        )
        v = tl.load(
            v_ptr + rows * stride_vt + kvh * stride_vh + d[None, :], mask=kv_mask, other=0.0
        )
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale_log2  # (BLOCK_M, BLOCK_N)
        s = tl.where(k_pos[None, :] <= q_pos[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    out = acc / l_i[:, None]
    o_ptrs = out_ptr + i[:, None].to(tl.int64) * stride_ot + h * stride_oh + d[None, :]
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=q_mask)


def prefill_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, scale: float
) -> torch.Tensor:
    """Causal attention of one session's new tokens over its whole context.

    Args:
        q: `(tokens, q_heads, head_dim)`, the queries at positions `start .. start+tokens`.
        k, v: `(start + tokens, kv_heads, head_dim)`, keys and values of positions `0 ..`.
        start: position of the first query.
    Returns:
        `(tokens, q_heads, head_dim)`.
    """
    tokens, q_heads, head_dim = q.shape
    kv_heads = k.shape[1]
    if q.stride(2) != 1 or k.stride(2) != 1 or v.stride(2) != 1:
        raise ValueError("prefill_attention needs a unit stride along head_dim")
    out = torch.empty_like(q)
    upcast, prec = dot_flags(q)
    block_d = max(16, triton.next_power_of_2(head_dim))
    # Smaller query blocks for large heads keep the fp32 accumulator in registers.
    block_m = 64 if block_d <= 64 else 32
    block_m = min(block_m, max(16, triton.next_power_of_2(tokens)))
    grid = (triton.cdiv(tokens, block_m), q_heads)
    _prefill_kernel[grid](
        q, k, v, out,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1),
        tokens, start, q_heads // kv_heads, head_dim, scale * LOG2E,
        UPCAST=upcast, PREC=prec, BLOCK_M=block_m, BLOCK_N=32, BLOCK_D=block_d,
        num_warps=4 if block_d <= 64 else 8,
    )  # fmt: skip
    return out
