"""Weight-only int8/int4 matmuls against dequantize-then-matmul: torch's CPU paths and Triton's.

The Triton kernels run in the CPU interpreter (see conftest.py); fp32 and fp16 only there, bf16
too on a GPU (LAYERSWARM_TEST_DEVICE=cuda).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from layerswarm.kernels import quant

ROWS = [1, 3, 7, 33]  # GEMV rows, then GEMM-shaped ones (past the decode thresholds)
DEVICE = torch.device(os.environ.get("LAYERSWARM_TEST_DEVICE", "cpu"))
TRITON_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])


def on_device(*ts: torch.Tensor | None) -> list[torch.Tensor | None]:
    return [None if t is None else t.to(DEVICE) for t in ts]


def randn(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def reference(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The exact product in fp32 with an already dequantized weight."""
    b = None if bias is None else bias.float()
    return F.linear(x.float(), w.float(), b)


def close(
    actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, via_bf16: bool = False
) -> None:
    """Within the rounding of `dtype` (of bf16 where torch's CPU kernels ran an fp32 model's
    product on bf16 inputs, `via_bf16`)."""
    # Outputs here are sums of ~100 unit-scale products (magnitude ~10): fp16 rounds at ~1e-2.
    tol = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype]
    if via_bf16:
        tol = max(tol, 1e-1)
    assert actual.dtype == dtype
    torch.testing.assert_close(actual.float().cpu(), expected.cpu(), atol=tol, rtol=tol)


def test_int8_round_trip_is_within_half_a_step() -> None:
    w = randn(40, 72)
    q, scales = quant.quantize_int8(w)
    assert q.dtype == torch.int8 and scales.shape == (40,)
    err = (quant.dequantize_int8(q, scales) - w).abs()
    assert (err <= scales[:, None] / 2 + 1e-6).all()


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_round_trip_is_within_half_a_step_of_its_group(group_size: int) -> None:
    w = randn(24, 256) + torch.linspace(-2, 2, 256)  # groups with different offsets
    packed, sz = quant.quantize_int4(w, group_size)
    assert packed.shape == (24, 128) and packed.dtype == torch.uint8
    assert sz.shape == (256 // group_size, 24, 2)
    step = sz[..., 0].transpose(0, 1).repeat_interleave(group_size, dim=1)  # (out, in)
    err = (quant.dequantize_int4(packed, sz, group_size) - w).abs()
    assert (err <= step / 2 + 1e-5).all()


def test_int4_packs_two_values_a_byte_even_index_low() -> None:
    q = torch.tensor([[1, 2, 15, 0], [7, 8, 9, 10]], dtype=torch.uint8)
    packed = quant.pack_int4(q)
    assert packed.tolist() == [[0x21, 0x0F], [0x87, 0xA9]]
    assert torch.equal(quant.unpack_int4(packed), q)


def test_int4_rejects_groups_that_do_not_divide_the_inputs() -> None:
    with pytest.raises(ValueError, match="multiple"):
        quant.quantize_int4(randn(16, 96), 64)


@pytest.mark.parametrize(("n", "k"), [(16, 64), (48, 256), (80, 128)])
def test_cpu_int4_layout_converts_back_exactly(n: int, k: int) -> None:
    packed, _ = quant.quantize_int4(randn(n, k), 32)
    cpu = quant.to_cpu_int4_layout(packed)
    assert cpu.shape == packed.shape
    assert torch.equal(quant.from_cpu_int4_layout(cpu), packed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 17, 40])
@pytest.mark.parametrize("k", [64, 72])  # 72: the packed CPU kernel crashes; the fallback runs
def test_int8_linear_torch_path_matches_dequantized_weight(
    dtype: torch.dtype, rows: int, k: int
) -> None:
    q, scales = quant.quantize_int8(randn(48, k))
    scales = scales.to(dtype)
    x, bias = randn(rows, k, dtype=dtype, seed=1), randn(48, dtype=dtype, seed=2)
    out = quant.int8_linear(x, q, scales, bias, backend="torch")
    kernel = rows <= quant.CPU_PACKED_MAX_ROWS and k % 16 == 0  # torch's, on bf16 inputs
    close(out, reference(x, quant.dequantize_int8(q, scales), bias), dtype, via_bf16=kernel)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5, 40])
def test_int4_linear_torch_paths_match_dequantized_weight(dtype: torch.dtype, rows: int) -> None:
    packed, sz = quant.quantize_int4(randn(48, 128), 64)
    sz = sz.to(dtype)
    x, bias = randn(2, rows, 128, dtype=dtype, seed=1), randn(48, dtype=dtype, seed=2)
    want = reference(x, quant.dequantize_int4(packed, sz, 64), bias)
    close(quant.int4_linear(x, packed, sz, 64, bias, backend="torch"), want, dtype)
    cpu = quant.to_cpu_int4_layout(packed)
    close(quant.int4_linear(x, cpu, sz, 64, bias, layout="cpu"), want, dtype, via_bf16=True)


@pytest.mark.parametrize("dtype", TRITON_DTYPES)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize(("n", "k"), [(40, 96), (72, 200)])
def test_int8_triton_matches_dequantized_weight(
    dtype: torch.dtype, rows: int, n: int, k: int
) -> None:
    pytest.importorskip("triton")
    q, scales = quant.quantize_int8(randn(n, k))
    scales = scales.to(dtype)
    x = randn(rows, k, dtype=dtype, seed=1)
    bias = randn(n, dtype=dtype, seed=2) if rows % 2 else None
    want = reference(x, quant.dequantize_int8(q, scales), bias)
    q, scales, x, bias = on_device(q, scales, x, bias)
    out = quant.int8_linear(x, q, scales, bias, backend="triton")  # type: ignore[arg-type]
    close(out, want, dtype)


@pytest.mark.parametrize("dtype", TRITON_DTYPES)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize(("n", "k", "group_size"), [(40, 96, 32), (24, 256, 128), (72, 192, 64)])
def test_int4_triton_matches_dequantized_weight(
    dtype: torch.dtype, rows: int, n: int, k: int, group_size: int
) -> None:
    pytest.importorskip("triton")
    packed, sz = quant.quantize_int4(randn(n, k) + torch.linspace(-1, 1, k), group_size)
    sz = sz.to(dtype)
    x = randn(rows, k, dtype=dtype, seed=1)
    bias = randn(n, dtype=dtype, seed=2) if rows % 2 else None
    want = reference(x, quant.dequantize_int4(packed, sz, group_size), bias)
    packed, sz, x, bias = on_device(packed, sz, x, bias)
    out = quant.int4_linear(x, packed, sz, group_size, bias, backend="triton")  # type: ignore[arg-type]
    close(out, want, dtype)


def test_int4_triton_rejects_groups_it_cannot_step_through() -> None:
    pytest.importorskip("triton")
    packed, sz = quant.quantize_int4(randn(16, 96), 48)
    with pytest.raises(ValueError, match="power-of-two"):
        quant.int4_linear(randn(1, 96), packed, sz, 48, backend="triton")


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quant_linear_runs_triton_kernels_when_asked(mode: str) -> None:
    pytest.importorskip("triton")
    from torch import nn

    from layerswarm.shards.quantize import QuantLinear

    linear = nn.Linear(128, 48)
    layer = QuantLinear.from_linear(linear, mode, group_size=64)  # type: ignore[arg-type]
    x = randn(3, 128, seed=1)
    assert layer.use_backend("triton").layout == "rows"
    if mode == "int8":  # the product in fp32 (the CPU's torch path runs it on bf16 inputs)
        w = quant.dequantize_int8(layer.weight, layer.scales)
    else:
        w = quant.dequantize_int4(layer.weight, layer.scales_zeros, 64)
    want = reference(x, w, layer.bias)
    got = layer.to(DEVICE)(x.to(DEVICE)).cpu()
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
