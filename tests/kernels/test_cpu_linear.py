"""The CPU weight layouts: same products as `nn.Linear`, weights transposed in one arena (the
GEMVs of a few tokens as `embedding_bag`s), or bf16 packed by oneDNN on a CPU with bf16
instructions."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from layerswarm.kernels import cpu_linear
from layerswarm.kernels.cpu_linear import (
    HUGE_PAGE,
    ArenaLinear,
    PackedLinear,
    huge_page_arena,
    pack_linears,
)
from layerswarm.shards.quantize import memory_bytes

ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
needs_onednn = pytest.mark.skipif(not ONEDNN, reason="this torch build has no oneDNN linear")


def tiny_mlp(dtype: torch.dtype) -> nn.Sequential:
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Linear(33, 70, bias=True), nn.SiLU(), nn.Linear(70, 17, bias=False))
    return nn.Sequential(inner, nn.Linear(17, 5)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_weights_share_one_arena_transposed_but_fp16_with_the_same_products(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cpu_linear, "native_bf16", lambda: False)  # a CPU without bf16 dots
    model = tiny_mlp(dtype)
    token, tokens = torch.randn(1, 33, dtype=dtype), torch.randn(3, 33, dtype=dtype)
    before = model(token), model(tokens), model(token.view(1, 1, 33))
    pack_linears(model)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 3
    for lin in linears:
        assert isinstance(lin, ArenaLinear)
        out_features, in_features = lin.weight.shape
        if dtype != torch.float16:
            assert lin.weight.stride() == (1, out_features)  # (in, out) in memory
            assert lin.table is not None and lin.table.data_ptr() == lin.weight.data_ptr()
        else:
            assert lin.weight.stride() == (in_features, 1)  # the usual layout
            assert lin.table is None  # fp16: no one-token path of its own
        assert lin.weight.data_ptr() % 64 == 0
        assert lin.weight.dtype == dtype
    storages = {lin.weight.untyped_storage().data_ptr() for lin in linears}
    assert len(storages) == 1  # one arena
    tol = {torch.float32: 1e-6, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    # one token (the embedding_bag GEMV, bias added after), several (F.linear), one in 3-D
    for x, expected in zip((token, tokens, token.view(1, 1, 33)), before, strict=True):
        got = model(x)
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=tol, atol=tol)


@pytest.mark.parametrize(
    ("dtype", "cached"), [(torch.float32, True), (torch.bfloat16, True), (torch.float32, False)]
)
def test_a_few_tokens_run_as_bags_each_with_the_bits_it_has_alone(
    dtype: torch.dtype, cached: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cpu_linear, "native_bf16", lambda: False)
    if not cached:  # as if the weight were larger than an L3 holds
        monkeypatch.setattr(cpu_linear, "CACHED_TABLE", 0)
    most = cpu_linear.BAG_ROWS_CACHED if cached else cpu_linear.BAG_ROWS
    torch.manual_seed(1)
    lin = nn.Linear(40, 24, bias=True).to(dtype)
    x = torch.randn(most + 1, 40, dtype=dtype)
    expected = lin(x)
    packed = pack_linears(nn.Sequential(lin))[0]
    assert packed.bag_rows == most
    bags: list[int] = []
    real_bag = F.embedding_bag

    def counting_bag(
        index: torch.Tensor, table: torch.Tensor, offsets: torch.Tensor, **kw: Any
    ) -> torch.Tensor:
        bags.append(len(offsets))  # one offset a bag
        return real_bag(index, table, offsets, **kw)

    monkeypatch.setattr(F, "embedding_bag", counting_bag)  # as cpu_linear calls it
    alone = [packed(x[i : i + 1]) for i in range(most + 1)]
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    for n in range(2, most + 1):  # a batch of sessions' decode steps: the same bits as alone
        assert torch.equal(packed(x[:n]), torch.cat(alone[:n]))
    torch.testing.assert_close(torch.cat(alone), expected, rtol=tol, atol=tol)
    blocks = 1  # the fixed rule's one block (one thread) a bag: more only if the Tuner says
    assert packed.bag_blocks == (blocks,) * most
    want = [blocks * n for n in [1] * (most + 1) + list(range(2, most + 1))]
    assert bags == want
    torch.testing.assert_close(packed(x), expected, rtol=tol, atol=tol)  # one more: F.linear
    assert bags == want


def test_an_arena_linear_takes_the_plain_gemv_for_other_dtypes_and_once_moved(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = pack_linears(nn.Sequential(nn.Linear(6, 4)))
    lin = model[0]
    assert isinstance(lin, ArenaLinear) and lin.table is not None
    calls: list[torch.Tensor] = []

    def fake_bag(index: torch.Tensor, table: torch.Tensor, *args: Any, **kw: Any) -> torch.Tensor:
        calls.append(table)
        return torch.zeros(1, 4)

    monkeypatch.setattr(F, "embedding_bag", fake_bag)
    x = torch.randn(1, 6)
    lin(x)
    assert len(calls) == 1 and calls[0].data_ptr() == lin.table.data_ptr()  # on the table
    with pytest.raises(RuntimeError, match="dtype"):
        lin(x.double())  # F.linear's own error, not the bag's
    with pytest.raises(RuntimeError, match="shapes"):
        lin(torch.randn(2, 3))  # as many values as a token has, in the wrong shape
    lin.to("meta")  # moved off the CPU after it was laid out (the table stays behind)
    assert lin(x.to("meta")).device.type == "meta" and len(calls) == 1


@needs_onednn
def test_bf16_linears_are_packed_on_a_cpu_with_bf16_instructions_with_the_same_products(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(cpu_linear, "native_bf16", lambda: True)
    model = nn.Sequential(tiny_mlp(torch.bfloat16), nn.Linear(5, 9))  # the last one fp32
    token, tokens = torch.randn(1, 33, dtype=torch.bfloat16), torch.randn(3, 33).bfloat16()
    before = model[0](token), model[0](tokens)
    nbytes = memory_bytes(model)
    pack_linears(model)
    packed = [m for m in model.modules() if isinstance(m, PackedLinear)]
    assert len(packed) == 3
    fp32 = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(fp32) == 1 and fp32[0].weight.dtype == torch.float32  # fp32 keeps the arena
    assert fp32[0].weight.stride() == (1, 9)
    assert isinstance(fp32[0], ArenaLinear)
    for x, expected in zip((token, tokens), before, strict=True):
        assert torch.equal(model[0](x), expected)  # the same bits as nn.Linear in bf16
    assert memory_bytes(model) == nbytes  # packed weights still counted


def test_bf16_packing_follows_the_cpus_instruction_sets() -> None:
    native = cpu_linear.native_bf16()
    if sys.platform == "linux":  # the CPU's own word for it, read apart from torch's checks
        flags = set(Path("/proc/cpuinfo").read_text().split())
        assert native == (ONEDNN and bool(flags & {"avx512_bf16", "amx_tile"}))
    model = pack_linears(tiny_mlp(torch.bfloat16))
    packed = [m for m in model.modules() if isinstance(m, PackedLinear)]
    assert len(packed) == (3 if native else 0)


@pytest.mark.skipif(sys.platform != "linux", reason="huge pages are asked for on Linux only")
def test_the_arena_starts_on_a_huge_page_boundary() -> None:
    arena = huge_page_arena(3 * HUGE_PAGE + 5)
    assert arena.numel() == 3 * HUGE_PAGE + 5
    assert arena.data_ptr() % HUGE_PAGE == 0
    arena.fill_(7)  # the whole range is writable
    assert int(arena[-1]) == 7


@pytest.mark.parametrize("native", [False, True])
def test_a_linear_shared_by_two_parents_is_laid_out_once(
    native: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if native and not ONEDNN:
        pytest.skip("this torch build has no oneDNN linear")
    monkeypatch.setattr(cpu_linear, "native_bf16", lambda: native)
    shared = nn.Linear(8, 16).bfloat16()
    model = nn.ModuleDict({"a": nn.Sequential(shared), "b": nn.Sequential(shared)})
    pack_linears(model)
    a, b = model["a"][0], model["b"][0]
    assert a is b
    assert isinstance(a, PackedLinear) == native
    if not native:  # one copy in the arena, not two
        assert a.weight.untyped_storage().nbytes() == 16 * 8 * 2 + HUGE_PAGE
