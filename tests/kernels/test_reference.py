"""The plain-torch twins give the bits of the longer forms they replaced."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from layerswarm.kernels import reference


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hidden", [64, 576, 2048])
def test_rms_norm_of_half_inputs_is_the_fp32_norm_rounded_once(
    dtype: torch.dtype, hidden: int
) -> None:
    gen = torch.Generator().manual_seed(hidden)
    scale = torch.rand(4000, 1, generator=gen) * 50  # rows of very different sizes
    x = (torch.randn(4000, hidden, generator=gen) * scale).to(dtype)
    w = torch.randn(hidden, generator=gen).to(dtype)
    longer = w * F.rms_norm(x.float(), (hidden,), eps=1e-5).to(dtype)  # the form it replaced
    assert torch.equal(reference.rms_norm(x, w, 1e-5), longer)
    qk = x.view(4000, 1, hidden)[:, :, :64].reshape(1000, 4, 64)  # 1000 tokens, 3 q + 1 k head
    q_w, k_w = w[:64], w[:64].flip(0)
    normed = F.rms_norm(qk.float(), (64,), eps=1e-5).to(dtype)
    normed[:, :3].mul_(q_w)
    normed[:, 3:].mul_(k_w)
    assert torch.equal(reference.qk_norm(qk, 3, q_w, k_w, 1e-5), normed)
