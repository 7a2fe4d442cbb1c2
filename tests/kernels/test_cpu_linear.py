"""The CPU weight layouts: same products as `nn.Linear`, weights transposed in one arena."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from layerswarm.kernels.cpu_linear import (
    HUGE_PAGE,
    huge_page_arena,
    pack_linears,
)


def tiny_mlp(dtype: torch.dtype) -> nn.Sequential:
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Linear(33, 70, bias=True), nn.SiLU(), nn.Linear(70, 17, bias=False))
    return nn.Sequential(inner, nn.Linear(17, 5)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_weights_share_one_arena_transposed_where_wider_but_fp16_with_the_same_products(
    dtype: torch.dtype,
) -> None:
    model = tiny_mlp(dtype)
    token, tokens = torch.randn(1, 33, dtype=dtype), torch.randn(3, 33, dtype=dtype)
    before = model(token), model(tokens)
    pack_linears(model)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 3
    for lin in linears:
        out_features, in_features = lin.weight.shape
        if in_features <= out_features and dtype != torch.float16:
            assert lin.weight.stride() == (1, out_features)  # (in, out) in memory
        else:
            assert lin.weight.stride() == (in_features, 1)  # the usual layout
        assert lin.weight.data_ptr() % 64 == 0
        assert lin.weight.dtype == dtype
    want = [33, 70, 17] if dtype == torch.float16 else [1, 70, 17]  # fp16: rows everywhere
    assert [lin.weight.stride()[0] for lin in linears] == want
    storages = {lin.weight.untyped_storage().data_ptr() for lin in linears}
    assert len(storages) == 1  # one arena
    tol = {torch.float32: 1e-6, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    for x, expected in zip((token, tokens), before, strict=True):
        torch.testing.assert_close(model(x), expected, rtol=tol, atol=tol)


@pytest.mark.skipif(sys.platform != "linux", reason="huge pages are asked for on Linux only")
def test_the_arena_starts_on_a_huge_page_boundary() -> None:
    arena = huge_page_arena(3 * HUGE_PAGE + 5)
    assert arena.numel() == 3 * HUGE_PAGE + 5
    assert arena.data_ptr() % HUGE_PAGE == 0
    arena.fill_(7)  # the whole range is writable
    assert int(arena[-1]) == 7
