"""The inputs a session keeps per layer boundary for failover: cut on rollback, merged on replay.

Each kept input is `(start, hidden (1, tokens, hidden))`, in the order it was sent.
"""

from __future__ import annotations

import torch

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
