"""int8 activations with a scale per token and group of channels: ~3.8x fewer bytes than fp32.

A token's hidden state travels as int8 `q = round(x / s)`, one fp32 scale `s = max|x| / 127`
per token and group of `GROUP` channels (sent beside the tensor as `Step.scales`); receivers
compute on `q * s`. A scale per group rather than per token keeps the residual stream's few
huge channels from flattening all the others: on SmolLM2, int8 at every span boundary kept
the next token's top-1 of 91% of positions with a scale per token, 96-97% with groups of 64
(`scripts/bench_network.py --quality`), as int8 weights do (95.8%, docs/kernels.md).
"""

from __future__ import annotations

import torch

from layerswarm.errors import ProtocolError

GROUP = 64  # channels per scale (all of a token's, where the hidden size is not a multiple)


def groups(hidden_size: int) -> int:
    """How many scales a token of this hidden size has."""
    return hidden_size // GROUP if hidden_size % GROUP == 0 else 1


def compress_int8(hidden: torch.Tensor) -> tuple[torch.Tensor, bytes]:
    """`(1, T, H)` floats -> `(1, T, H)` int8, and `T * groups(H)` fp32 scales as bytes."""
    b, t, h = hidden.shape
    x = hidden.float().reshape(b, t, groups(h), -1)  # (1, T, groups, channels)
    scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / 127.0
    q = torch.round(x / scale).clamp(-127, 127).to(torch.int8).reshape(b, t, h)
    return q, scale.reshape(-1).contiguous().numpy().astype("<f4").tobytes()


def decompress_int8(q: torch.Tensor, scales: bytes, dtype: torch.dtype) -> torch.Tensor:
    """The floats `q` stands for, in `dtype`.

    Raises:
        ProtocolError: `q` is not int8 `(1, T, H)`, or the scales are not `T * groups(H)`.
    """
    if q.dtype != torch.int8 or q.ndim != 3 or len(scales) != 4 * q.shape[1] * groups(q.shape[2]):
        raise ProtocolError(
            f"int8 activations need an int8 (1, T, H) tensor and 4 bytes of scale per token "
            f"and group of {GROUP} channels, got {q.dtype} {tuple(q.shape)} and {len(scales)} bytes"
        )
    b, t, h = q.shape
    scale = torch.frombuffer(bytearray(scales), dtype=torch.float32).reshape(b, t, -1, 1)
    return (q.reshape(b, t, groups(h), -1).float() * scale).reshape(b, t, h).to(dtype)
