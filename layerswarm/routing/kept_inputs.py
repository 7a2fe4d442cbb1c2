"""The inputs a session keeps per layer boundary for failover: cut on rollback, merged on replay,
sliced for a verifier's shadow session.

Each kept input is `(start, hidden (1, tokens, hidden))`, in the order it was sent.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from layerswarm.errors import LayerswarmError

KeptInputs = list[tuple[int, torch.Tensor]]


def truncate_inputs(inputs: KeptInputs, length: int) -> KeptInputs:
    """The kept inputs cut to the positions before `length` (a rollback: the rest was rejected)."""
    return [(start, hidden[:, : length - start]) for start, hidden in inputs if start < length]


def merge_inputs(inputs: KeptInputs, max_tokens: int) -> KeptInputs:
    """Join consecutive inputs into steps of up to `max_tokens` tokens (a replay's steps).

    Inputs join only where one starts where the previous one ends; order is kept.
    """
    out: list[tuple[int, list[torch.Tensor], int]] = []  # (start, parts, tokens)
    for start, hidden in inputs:
        t = hidden.shape[1]
        if out and out[-1][0] + out[-1][2] == start and out[-1][2] + t <= max_tokens:
            first, parts, tokens = out[-1]
            out[-1] = (first, [*parts, hidden], tokens + t)
        else:
            out.append((start, [hidden], t))
    return [(start, torch.cat(parts, dim=1)) for start, parts, _ in out]


def context_slice(
    entries: Sequence[tuple[int, torch.Tensor]], lo: int, hi: int
) -> list[tuple[int, torch.Tensor]]:
    """The inputs at positions `[lo, hi)` from kept `(start, (1, tokens, hidden))` entries.

    A later entry that starts before an earlier one ends replaces it from there on (a session
    that went back, as a rollback does).

    Raises:
        LayerswarmError: the entries do not cover `[lo, hi)`.
    """
    kept: list[tuple[int, torch.Tensor]] = []
    for start, hidden in entries:
        while kept and kept[-1][0] >= start:
            kept.pop()
        if kept and kept[-1][0] + kept[-1][1].shape[1] > start:
            first, h = kept[-1]
            kept[-1] = (first, h[:, : start - first])
        kept.append((start, hidden))
    out: list[tuple[int, torch.Tensor]] = []
    at = lo
    for start, hidden in kept:
        a, b = max(start, at), min(start + hidden.shape[1], hi)
        if a < b:
            if a != at:
                break
            out.append((a, hidden[:, a - start : b - start]))
            at = b
    if at != hi:
        raise LayerswarmError(f"the kept inputs do not cover positions {lo}..{hi}")
    return out
