"""Plain-torch twins of every kernel: the CPU path, and the reference the Triton kernels match.

Shapes use a flat token axis: a batch of sessions is laid out token after token, so
`(tokens, heads, head_dim)` tensors serve prefill (many tokens of one session) and batched
decode (one token of many sessions) alike.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last axis, computed in fp32 and cast back (as transformers does).

    Args:
        x: `(..., hidden)`.
        weight: `(hidden,)`.
    Returns:
        `(..., hidden)` in `x.dtype`.
    """
    # F.rms_norm gives the same bits as `xf * rsqrt(mean(xf**2) + eps)` written out, in one
    # call instead of five: for one SmolLM2 token 10 us against 15 in fp32, 60 times a step.
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.rms_norm(x, x.shape[-1:], weight, eps)
    # On bf16/fp16 input F.rms_norm computes in fp32 and rounds once: the bits of
    # `rms_norm(x.float()).to(x.dtype)` (tested; 0 of 73M elements differed), without the two
    # conversions (4 a layer, 120 of a SmolLM2 bf16 step's 397; 15.6 against 21.4 us a norm).
    return weight * F.rms_norm(x, x.shape[-1:], eps=eps)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """`s = x + residual`, then RMSNorm of `s`. Returns `(normed, s)`; `s` is the new residual."""
    s = x + residual
    return rms_norm(s, weight, eps), s


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate q and k in place (the half-split layout of Hugging Face Llama checkpoints).

    `x * cos + rotate_half(x) * sin` with `rotate_half(x) = cat(-x2, x1)`, written as
    `x * cos + roll(x, half) * cat(-sin1, sin2)`: the same products and sums, so the same bits,
    in 4 ops a tensor instead of 8 (34 -> 26 us for one SmolLM2 token's q and k).

    Args:
        q: `(tokens, q_heads, head_dim)`.
        k: `(tokens, kv_heads, head_dim)`.
        cos, sin: `(tokens, head_dim)`, fp32.
    """
    factors = rope_factors(cos, sin, q.dtype)
    rotate(q, factors)
    rotate(k, factors)


RopeFactors = tuple[torch.Tensor, torch.Tensor]


def rope_factors(cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype) -> RopeFactors:
    """`cos` and the signed `sin` of `apply_rope`, `(tokens, 1, head_dim)` in `dtype`: the same
    for every layer of a step, so a span makes them once a step, not once a layer."""
    half = cos.shape[-1] // 2
    c = cos[:, None, :].to(dtype)
    s = torch.cat((-sin[:, None, :half], sin[:, None, half:]), dim=-1).to(dtype)
    return c, s


def rotate(x: torch.Tensor, factors: RopeFactors) -> None:
    """Rotate `x (tokens, heads, head_dim)` in place by `rope_factors`' tables (any heads: the
    queries and keys of a layer can be rotated as one tensor)."""
    c, s = factors
    rotated = x.roll(c.shape[-1] // 2, dims=-1).mul_(s)
    x.mul_(c).add_(rotated)


def qk_norm(
    qk: torch.Tensor, q_heads: int, q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float
) -> torch.Tensor:
    """Qwen3's RMSNorm of each query and key head, of `qk (tokens, q_heads + kv_heads,
    head_dim)` (a layer's queries, then its keys): one norm over all the heads, then each
    part's weight. The same bits as `rms_norm` of the queries and of the keys apart (in both,
    the weight multiplies the normed head in the input's dtype), in 3 ops instead of 2 norms:
    a norm costs the time of 4-5 small ops on a CPU (a 12-layer Qwen3-MoE decode step ran 48).

    Returns:
        A new contiguous `(tokens, q_heads + kv_heads, head_dim)` tensor.
    """
    normed = F.rms_norm(qk, qk.shape[-1:], eps=eps)  # fp32 inside: see `rms_norm`
    normed[:, :q_heads].mul_(q_weight)
    normed[:, q_heads:].mul_(k_weight)
    return normed


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up`, elementwise."""
    return F.silu(gate) * up


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
    t = q.shape[0]
    if t == 1:  # one query sees every key: no mask needed
        return _one_query(q, k, v, scale)
    if start > 0:
        # A chunk after earlier tokens: SDPA's CPU path with a mask copies K and V per head
        # group and runs the unfused math; written out over views it took 9.7 ms instead of
        # 52 for 28 SmolLM2 queries over 1,000 keys (85 against 127 for 124 over 1,900).
        return _attention_over_runs(q, [(k, v)], start, scale)
    qh, kh, vh = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # (heads, seq, hd)
    gqa = q.shape[1] != k.shape[1]
    out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale, enable_gqa=gqa)
    return out.transpose(0, 1)


def runs_attention(
    q: torch.Tensor,
    runs: Sequence[tuple[torch.Tensor, torch.Tensor]],
    start: int,
    scale: float,
) -> torch.Tensor:
    """Causal attention of one session's new tokens over a context held in several runs.

    The same math as `prefill_attention` over the runs put end to end, without copying them:
    scores run by run, one softmax over all of them, then the sum of each run's `probs @ V`.
    A CPU peer's sessions whose pages are not one run take this path (no gather of the whole
    context each layer, which the paged decode path pays).

    Args:
        q: `(tokens, q_heads, head_dim)`, the queries at positions `start .. start+tokens`.
        runs: `(k, v)` pairs, each `(run_tokens, kv_heads, head_dim)`, positions `0 ..` in order,
            `start + tokens` in all.
        start: position of the first query.
    Returns:
        `(tokens, q_heads, head_dim)`.
    """
    if len(runs) == 1:
        return prefill_attention(q, runs[0][0], runs[0][1], start, scale)
    return _attention_over_runs(q, runs, start, scale)


def _attention_over_runs(
    q: torch.Tensor,
    runs: Sequence[tuple[torch.Tensor, torch.Tensor]],
    start: int,
    scale: float,
) -> torch.Tensor:
    t, q_heads, hd = q.shape
    kv_heads = runs[0][0].shape[1]
    group = q_heads // kv_heads
    # (kv_heads, tokens * group, hd): row r is query r // group of head group r % group
    qg = q.float().reshape(t, kv_heads, group, hd).permute(1, 0, 2, 3).reshape(kv_heads, -1, hd)
    scores = torch.cat([torch.bmm(qg, k.float().permute(1, 2, 0)) for k, _ in runs], dim=-1)
    scores.mul_(scale)  # (kv_heads, tokens * group, context)
    if t > 1:
        keys = torch.arange(scores.shape[-1], device=q.device)
        queries = torch.arange(start, start + t, device=q.device).repeat_interleave(group)
        scores.masked_fill_(keys[None, :] > queries[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.zeros(kv_heads, t * group, hd, dtype=torch.float32, device=q.device)
    at = 0
    for _, v in runs:
        n = v.shape[0]
        out.baddbmm_(probs[..., at : at + n], v.float().transpose(0, 1))
        at += n
    out = out.reshape(kv_heads, t, group, hd).permute(1, 0, 2, 3)  # (tokens, kv, group, hd)
    return out.reshape(q.shape).to(q.dtype)


def decode_attention(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    block_table: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One new token per session, attending over that session's paged KV cache.

    Args:
        q: `(sessions, q_heads, head_dim)`.
        k_pages, v_pages: `(num_pages, page_size, kv_heads, head_dim)`, one layer's page pool.
        block_table: `(sessions, max_pages)` int32, the pages of each session in order.
        lengths: `(sessions,)` int32, tokens in each session's context (the new one included).
    Returns:
        `(sessions, q_heads, head_dim)`.
    """
    page_size = k_pages.shape[1]
    out = torch.empty_like(q)
    for i, n in enumerate(lengths.tolist()):
        pages = block_table[i, : (n + page_size - 1) // page_size]
        k = k_pages[pages].flatten(0, 1)[:n]  # (n, kv_heads, head_dim)
        v = v_pages[pages].flatten(0, 1)[:n]
        out[i] = _one_query(q[i], k, v, scale)
    return out


def _one_query(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """One query's heads, `q (q_heads, hd)` or `(1, q_heads, hd)`, over `k, v (n, kv_heads,
    hd)` -> the shape of `q`.

    Written out rather than through SDPA: SDPA's CPU path copies K and V once per query-head
    group for GQA, which cost 13% of a SmolLM2 decode step; these are views.
    """
    kv_heads, hd = k.shape[1], k.shape[2]
    # In fp32 whatever the cache's dtype: CPU bf16 matmuls of these tiny shapes took 66 us each
    # (17% of a bf16 decode step); converting the keys and values costs less.
    # bmm rather than matmul, and the scale applied in place: 31 us against 49 for one SmolLM2
    # layer at 200 tokens, the same bits (matmul's 3-d dispatch costs more than these products).
    qg = _fp32(q).reshape(kv_heads, -1, hd)  # (kv_heads, group, hd)
    scores = torch.bmm(qg, _fp32(k).permute(1, 2, 0)).mul_(scale)  # (kv_heads, group, n)
    probs = torch.softmax(scores, dim=-1)
    out = torch.bmm(probs, _fp32(v).transpose(0, 1))  # (kv_heads, group, hd)
    return _cast(out.reshape(q.shape), q.dtype)


def _fp32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float32 else x.float()


def _cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`x.to(dtype)`, without the call where it would return `x`: even then it costs an op's
    dispatch, and a one-token step of the 12-layer synthetic MoE made 67 such calls."""
    return x if x.dtype == dtype else x.to(dtype)
