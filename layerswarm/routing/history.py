"""The inputs a session keeps at each layer boundary: replayed into a new hop after a failure,
and fed to a verifier's shadow session before a check."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from layerswarm.errors import LayerswarmError


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


def merge_inputs(
    inputs: list[tuple[int, torch.Tensor]], max_tokens: int
) -> list[tuple[int, torch.Tensor]]:
    """Join consecutive inputs `(start, (1, tokens, hidden))` into steps of up to `max_tokens`.

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
