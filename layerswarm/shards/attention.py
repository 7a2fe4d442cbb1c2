"""Attention with a sliding window and attention sinks (gpt-oss), over a session's KV runs.

The plain causal case stays in `kernels` (and its Triton twin); this path is taken only by
layers that have a window or sinks, on any device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def sink_window_attention(
    q: torch.Tensor,
    runs: Sequence[tuple[torch.Tensor, torch.Tensor]],
    start: int,
    scale: float,
    window: int | None,
    sinks: torch.Tensor | None,
) -> torch.Tensor:
    """Causal attention of one session's new tokens, each seeing at most `window` keys (itself
    included), with a learned sink logit per head in each softmax's denominator.

    Args:
        q: `(tokens, q_heads, head_dim)`, the queries at positions `start .. start+tokens`.
        runs: `(k, v)` pairs, each `(run_tokens, kv_heads, head_dim)`, positions `0 ..` in
            order, `start + tokens` in all.
        start: position of the first query.
        window: keys a query sees, or None for the whole context.
        sinks: `(q_heads,)` logits, or None.
    Returns:
        `(tokens, q_heads, head_dim)` in `q.dtype`.
    """
    t, q_heads, hd = q.shape
    total = start + t
    first = 0 if window is None else max(0, start - window + 1)  # the first key any query sees
    k, v = _keys(runs, first, total)
    kv_heads = k.shape[1]
    group = q_heads // kv_heads
    # (kv_heads, tokens * group, hd): row r is query r // group of head group r % group
    qg = q.float().reshape(t, kv_heads, group, hd).permute(1, 0, 2, 3).reshape(kv_heads, -1, hd)
    scores = torch.bmm(qg, k.float().permute(1, 2, 0)).mul_(scale)  # (kv_heads, t * group, n)
    keys = torch.arange(first, total, device=q.device)
    queries = torch.arange(start, total, device=q.device).repeat_interleave(group)
    hidden = keys[None, :] > queries[:, None]
    if window is not None:
        hidden |= keys[None, :] <= queries[:, None] - window
    scores.masked_fill_(hidden, float("-inf"))
    if sinks is not None:
        sink = sinks.float().reshape(kv_heads, 1, group).expand(kv_heads, t, group)
        scores = torch.cat((scores, sink.reshape(kv_heads, t * group, 1)), dim=-1)
        probs = torch.softmax(scores, dim=-1)[..., :-1]  # the sink takes its share, no value
    else:
        probs = torch.softmax(scores, dim=-1)
    out = torch.bmm(probs, v.float().transpose(0, 1))  # (kv_heads, t * group, hd)
    return out.reshape(kv_heads, t, group, hd).permute(1, 0, 2, 3).reshape(q.shape).to(q.dtype)


def _keys(
    runs: Sequence[tuple[torch.Tensor, torch.Tensor]], first: int, end: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of positions `first .. end`: a view when one run holds them."""
    at = 0
    for k, v in runs:
        n = k.shape[0]
        if at <= first and end <= at + n:
            return k[first - at : end - at], v[first - at : end - at]
        at += n
    k = torch.cat([k for k, _ in runs])[first:end]
    v = torch.cat([v for _, v in runs])[first:end]
    return k, v
