"""RoPE angles for any positions: plain, Llama 3 scaled, or YaRN (gpt-oss), from tables."""

from __future__ import annotations

import math

import torch

from layerswarm.shards.config import ModelConfig, RopeScaling


class Rotary:
    """RoPE angles with the model's frequency scaling, precomputed as cos/sin tables for
    positions `0 ..` (as gpt-fast precomputes `freqs_cis`), so a step only indexes them; the
    tables grow (doubling) when a position needs it.

    The tables hold exactly what computing the angles of each position alone gives (the same
    fp32 product and `cos`/`sin` per element), so outputs do not depend on the table.
    """

    def __init__(
        self, config: ModelConfig, device: torch.device | str = "cpu", positions: int = 256
    ) -> None:
        dim = config.head_dim
        exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
        inv_freq = 1.0 / (config.rope_theta**exponents)
        self.scale = 1.0  # multiplies cos and sin (YaRN's attention factor)
        s = config.rope_scaling
        if s is not None and s.kind == "yarn":
            inv_freq, self.scale = _yarn(config.rope_theta, dim, s, device)
        elif s is not None:
            inv_freq = _llama3_scale(inv_freq, s)
        self.inv_freq = inv_freq  # (head_dim / 2,)
        self.limit = config.max_position_embeddings  # unit: positions the tables need at most
        self.cos = self.sin = torch.empty(0, dim, device=device)  # (positions, head_dim) fp32
        self.reserve(positions)

    def reserve(self, positions: int) -> None:
        """Make the tables cover positions `0 .. positions - 1` (a no-op when they do)."""
        have = self.cos.shape[0]
        if positions <= have:
            return
        n = max(positions, min(2 * have, self.limit))
        self.cos, self.sin = self.angles(torch.arange(n, device=self.inv_freq.device))

    def angles(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin `(tokens, head_dim)` fp32 of `positions (tokens,)`, computed (no table)."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        if self.scale != 1.0:
            return emb.cos() * self.scale, emb.sin() * self.scale
        return emb.cos(), emb.sin()

    def cos_sin(
        self, positions: torch.Tensor, end: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`positions (tokens,)` -> cos, sin `(tokens, head_dim)` in fp32, from the tables.

        `end`: one past the largest position, when the caller knows it (on a GPU this saves
        reading the positions back to the host).
        """
        self.reserve(int(positions.max()) + 1 if end is None else end)
        return self.cos[positions], self.sin[positions]


def _llama3_scale(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn(
    base: float, dim: int, s: RopeScaling, device: torch.device | str
) -> tuple[torch.Tensor, float]:
    """YaRN's frequencies and cos/sin scale, as transformers' `_compute_yarn_parameters`."""
    factor = s.factor
    scale = s.attention_factor
    if scale is None:
        scale = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(s.original_max_position_embeddings / (rotations * 2 * math.pi))) / (
            2 * math.log(base)
        )

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: no division by zero
    ramp = (
        (torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / (high - low)
    ).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, device=device).float() / dim)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (
        1.0 / pos_freqs
    ) * extrapolation
    return inv_freq, float(scale)
