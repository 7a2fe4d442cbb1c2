"""The quantize transform: it swaps a span's linears in place, shrinks it, and keeps its outputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from layerswarm.shards.blocks import SpanModel
from layerswarm.shards.config import ModelConfig, Span
from layerswarm.shards.quantize import QuantLinear, memory_bytes, quantize

CONFIG = ModelConfig(
    hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2, head_dim=16
)


def tiny_span(dtype: torch.dtype = torch.float32, config: ModelConfig = CONFIG) -> SpanModel:
    torch.manual_seed(0)
    model = SpanModel(config, Span(0, 2))
    with torch.no_grad():  # norms away from 1, so a norm applied wrongly would show
        for layer in model.layers:
            layer.input_norm.uniform_(0.5, 1.5)
            layer.post_norm.uniform_(0.5, 1.5)
    return model.to(dtype)


def run(model: SpanModel, hidden: torch.Tensor) -> torch.Tensor:
    """Prefill 9 tokens, then decode one: the outputs of both, concatenated."""
    cache = model.new_cache(16)
    session = cache.allocate(16)
    first = model(hidden[:, :9], [0], cache, [session])
    step = model(hidden[:, 9:], [9], cache, [session])
    return torch.cat((first, step), dim=1).float()


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


HIDDEN = torch.randn(1, 10, 64, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(("mode", "bound"), [("int8", 0.01), ("int4", 0.15)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_span_stays_close_to_the_original(
    mode: str, bound: float, dtype: torch.dtype
) -> None:
    model = tiny_span(dtype)
    hidden = HIDDEN.to(dtype)
    want = run(model, hidden)
    # The output is the residual stream: compare what the layers added, not the input they kept.
    delta = want - hidden.float()
    got = run(quantize(model, mode, group_size=32), hidden)  # type: ignore[arg-type]
    assert relative_error(got - hidden.float(), delta) < bound + (
        0.02 if dtype == torch.bfloat16 else 0
    )


@pytest.mark.parametrize(("mode", "ratio"), [("int8", 0.27), ("int4", 0.2)])
def test_quantize_shrinks_memory(mode: str, ratio: float) -> None:
    model = tiny_span()
    before = memory_bytes(model)
    quantize(model, mode, group_size=32)  # type: ignore[arg-type]
    # Linears are all but the norms: int8 keeps ~1/4 of fp32 bytes; int4 keeps 4 bits a value
    # plus an fp32 scale and zero per group of 32 (2 bits a value), 6/32 of fp32.
    assert memory_bytes(model) < ratio * before


def test_quantize_replaces_every_linear_in_place() -> None:
    model = tiny_span()
    assert quantize(model, "int8") is model
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    kinds = {
        name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, QuantLinear)
    }
    assert kinds == {"qkv", "o_proj", "gate_up", "down_proj"}


def test_int4_falls_back_to_a_group_size_that_divides_the_inputs() -> None:
    config = ModelConfig(
        hidden_size=96, intermediate_size=128, num_heads=4, num_kv_heads=2, head_dim=24
    )
    model = quantize(tiny_span(config=config), "int4", group_size=128)
    layer = model.layers[0]
    assert layer.qkv.group_size == 32  # 96 inputs: neither 128 nor 64 divides them
    assert layer.down_proj.group_size == 128


def test_quantized_linear_keeps_the_bias() -> None:
    linear = nn.Linear(64, 48)
    x = torch.randn(3, 64)
    q = QuantLinear.from_linear(linear, "int8")
    assert q.bias is not None
    torch.testing.assert_close(q(x), linear(x), atol=0.02, rtol=0.02)


def test_int4_cpu_layout_survives_dtype_and_device_moves() -> None:
    linear = nn.Linear(128, 48, bias=False).to(torch.bfloat16)
    q = QuantLinear.from_linear(linear, "int4", group_size=64)
    assert q.layout == "cpu"  # bf16 on a CPU: torch's int4 kernel and its own layout
    x = torch.randn(2, 128).to(torch.bfloat16)
    before = q(x).float()
    q.to(torch.float32)  # fp32 takes the kernel too (on bf16 inputs)
    assert q.layout == "cpu" and q.scales_zeros.dtype == torch.float32
    torch.testing.assert_close(q(x.float()), before, atol=0.05, rtol=0.02)
    q.to(torch.float16)  # fp16 has no fast CPU int4 kernel: back to the portable layout
    assert q.layout == "rows" and q.scales_zeros.dtype == torch.float16
    torch.testing.assert_close(q(x.half()).float(), before, atol=0.05, rtol=0.02)
    q.to(torch.bfloat16)
    assert q.layout == "cpu"
    torch.testing.assert_close(q(x).float(), before, atol=0.05, rtol=0.02)


def test_memory_bytes_counts_a_shared_tensor_once() -> None:
    a = nn.Linear(8, 8, bias=False)
    b = nn.Linear(8, 8, bias=False)
    b.weight = a.weight
    assert memory_bytes(nn.Sequential(a, b)) == 8 * 8 * 4


def test_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="mode"):
        quantize(tiny_span(), "int3")  # type: ignore[arg-type]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_decode_takes_torchs_int8_kernel_in_fp32_too(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fp32 models once dequantized every weight every step; now their decode GEMVs run the
    packed kernel on bf16-rounded inputs, and the product comes back in the model's dtype."""
    q = QuantLinear.from_linear(nn.Linear(64, 32).to(dtype), "int8")
    calls: list[torch.dtype] = []
    real = torch._weight_int8pack_mm

    def counting(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        calls.append(x.dtype)
        return real(x, w, s)

    monkeypatch.setattr(torch, "_weight_int8pack_mm", counting)
    x = torch.randn(1, 64).to(dtype)
    want = nn.functional.linear(x.float(), q.weight.float() * q.scales.float()[:, None])
    got = q(x)
    assert calls == [torch.bfloat16] and got.dtype == dtype
    torch.testing.assert_close(got.float(), want + q.bias.float(), atol=0.05, rtol=0.02)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_the_kernels_copy_of_the_scales_follows_them(mode: str) -> None:
    q = QuantLinear.from_linear(nn.Linear(64, 32, bias=False), mode, group_size=32)  # type: ignore[arg-type]
    x = torch.randn(1, 64)
    before = q(x)
    scales = q.scales if mode == "int8" else q.scales_zeros
    scales.mul_(2)  # in place: the kept bf16 copy must not be used stale
    torch.testing.assert_close(q(x), 2 * before, atol=0.05, rtol=0.02)
    if mode == "int8":
        q.scales = q.scales / 2  # replaced
        torch.testing.assert_close(q(x), before, atol=0.05, rtol=0.02)
