"""Every Triton kernel against its plain-torch twin, in Triton's CPU interpreter (or on a GPU
with LAYERSWARM_TEST_DEVICE=cuda, see conftest.py).

Sizes are small and odd on purpose (hidden 72, head_dim 24, 7 tokens, sessions of 1, 17 and 33
tokens over pages of 16) so that every mask is exercised; fp32 and fp16 in the interpreter, whose
bf16 arithmetic is not faithful, and bf16 too on a GPU.
"""

from __future__ import annotations

import inspect
import os

import pytest
import torch

pytest.importorskip("triton")

from layerswarm.kernels import dispatch, reference
from layerswarm.kernels import triton_ops as tops
from layerswarm.shards.config import ModelConfig, Span

DEVICE = torch.device(os.environ.get("LAYERSWARM_TEST_DEVICE", "cpu"))
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])
# atol and rtol, per input dtype (bf16 keeps 8 bits of mantissa: 2^-8 relative)
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
ATTN_TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=gen(seed)).to(DEVICE, dtype)


def close(actual: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    torch.testing.assert_close(actual.float().cpu(), expected.float().cpu(), atol=tol, rtol=tol)


def test_triton_backend_has_every_op_with_the_twins_signature() -> None:
    ops = dispatch.ops_for("cpu", "triton")
    assert ops is tops
    for name in (
        "rms_norm",
        "add_rms_norm",
        "apply_rope",
        "swiglu",
        "prefill_attention",
        "decode_attention",
    ):
        ours = list(inspect.signature(getattr(ops, name)).parameters.values())
        twin = list(inspect.signature(getattr(reference, name)).parameters.values())
        assert [p.name for p in ours[: len(twin)]] == [p.name for p in twin]
        assert all(p.kind is p.KEYWORD_ONLY for p in ours[len(twin) :])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7, 72), (2, 3, 72), (1, 64)])
def test_rms_norm_matches_twin(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    x, w = randn(*shape, dtype=dtype), randn(shape[-1], dtype=dtype, seed=1)
    out = tops.rms_norm(x, w, 1e-5)
    assert out.shape == x.shape and out.dtype == dtype
    close(out, reference.rms_norm(x, w, 1e-5), TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm_returns_the_norm_and_the_new_residual(dtype: torch.dtype) -> None:
    x, r, w = (
        randn(7, 72, dtype=dtype),
        randn(7, 72, dtype=dtype, seed=1),
        randn(72, dtype=dtype, seed=2),
    )
    normed, total = tops.add_rms_norm(x, r, w, 1e-6)
    want_normed, want_total = reference.add_rms_norm(x, r, w, 1e-6)
    close(total, want_total, 0.0)
    close(normed, want_normed, TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", [(6, 2, 24), (4, 4, 64), (3, 1, 16)])
def test_rope_rotates_q_and_k_in_place_like_twin(
    dtype: torch.dtype, heads: tuple[int, int, int]
) -> None:
    q_heads, kv_heads, head_dim = heads
    q, k = (
        randn(7, q_heads, head_dim, dtype=dtype),
        randn(7, kv_heads, head_dim, dtype=dtype, seed=1),
    )
    freqs = torch.arange(7.0)[:, None] * torch.rand(head_dim // 2, generator=gen(2))[None, :]
    emb = torch.cat((freqs, freqs), dim=-1).to(DEVICE)  # (tokens, head_dim), as Rotary builds it
    cos, sin = emb.cos(), emb.sin()
    q_ours, k_ours, q_twin, k_twin = q.clone(), k.clone(), q.clone(), k.clone()
    q_ptr = q_ours.data_ptr()
    tops.apply_rope(q_ours, k_ours, cos, sin)
    reference.apply_rope(q_twin, k_twin, cos, sin)
    assert q_ours.data_ptr() == q_ptr
    close(q_ours, q_twin, TOL[dtype])
    close(k_ours, k_twin, TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_reads_the_halves_of_a_fused_projection(dtype: torch.dtype) -> None:
    gate_up = randn(7, 2 * 1100, dtype=dtype)  # 1100 > one block of 1024: two column blocks
    gate, up = gate_up.chunk(2, dim=-1)  # views with a row stride of 2200
    assert not gate.is_contiguous()
    close(tops.swiglu(gate, up), reference.swiglu(gate, up), TOL[dtype])


def attention_inputs(
    start: int, tokens: int, heads: tuple[int, int, int], dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q_heads, kv_heads, head_dim = heads
    q = randn(tokens, q_heads, head_dim, dtype=dtype)
    k = randn(start + tokens, kv_heads, head_dim, dtype=dtype, seed=1)
    v = randn(start + tokens, kv_heads, head_dim, dtype=dtype, seed=2)
    return q, k, v


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("start", "tokens", "heads"),
    [
        (0, 7, (6, 2, 24)),  # GQA, padded head_dim
        (5, 7, (4, 4, 32)),  # MHA, continuing a cached context
        (40, 1, (4, 1, 16)),  # one query over a long context
        (3, 70, (2, 1, 16)),  # two query blocks and several key blocks
    ],
)
def test_prefill_attention_matches_twin(
    dtype: torch.dtype, start: int, tokens: int, heads: tuple[int, int, int]
) -> None:
    q, k, v = attention_inputs(start, tokens, heads, dtype)
    scale = heads[2] ** -0.5
    out = tops.prefill_attention(q, k, v, start, scale)
    want = reference.prefill_attention(q.float(), k.float(), v.float(), start, scale)
    assert out.shape == q.shape and out.dtype == dtype
    close(out, want, ATTN_TOL[dtype])


def paged_cache(
    lengths: list[int], page_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A page pool with each session's pages scattered in it, and the padded block table."""
    need = [-(-n // page_size) + 1 for n in lengths]  # one spare page each: tables differ in width
    num_pages = sum(need) + 3
    pages = torch.randperm(num_pages, generator=gen(3)).to(torch.int32)
    table = torch.zeros(len(lengths), max(need), dtype=torch.int32)
    used = 0
    for i, n in enumerate(need):
        table[i, :n] = pages[used : used + n]
        used += n
    table = table.to(DEVICE)
    k = randn(num_pages, page_size, kv_heads, head_dim, dtype=dtype, seed=4)
    v = randn(num_pages, page_size, kv_heads, head_dim, dtype=dtype, seed=5)
    return k, v, table


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", [(6, 2, 24), (4, 4, 64), (8, 1, 16)])
def test_decode_attention_batches_sessions_of_different_lengths(
    dtype: torch.dtype, heads: tuple[int, int, int]
) -> None:
    q_heads, kv_heads, head_dim = heads
    lengths = [1, 17, 33, 16]
    k, v, table = paged_cache(lengths, 16, kv_heads, head_dim, dtype)
    q = randn(len(lengths), q_heads, head_dim, dtype=dtype, seed=6)
    lens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    out = tops.decode_attention(q, k, v, table, lens, 0.3)
    want = reference.decode_attention(q.float(), k.float(), v.float(), table, lens, 0.3)
    close(out, want, ATTN_TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_attention_splits_a_long_session_and_merges_the_splits(dtype: torch.dtype) -> None:
    lengths = [300, 5, 129]
    k, v, table = paged_cache(lengths, 16, 2, 24, dtype)
    q = randn(len(lengths), 6, 24, dtype=dtype, seed=6)
    lens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    want = reference.decode_attention(q.float(), k.float(), v.float(), table, lens, 0.2)
    for split_tokens in (32, 96, None):  # 10 splits, 4, and the heuristic's (1 on a CPU)
        out = tops.decode_attention(q, k, v, table, lens, 0.2, split_tokens=split_tokens)
        close(out, want, ATTN_TOL[dtype])


def test_span_model_on_triton_kernels_matches_torch_kernels() -> None:
    """A tiny span, prefill then batched decode of two sessions, on both kernel sets."""
    from layerswarm.shards.blocks import SpanModel

    config = ModelConfig(
        hidden_size=72, intermediate_size=80, num_heads=6, num_kv_heads=2, head_dim=12
    )
    torch.manual_seed(0)
    twin = SpanModel(config, Span(0, 2), kernel_backend="torch")
    ours = SpanModel(config, Span(0, 2), kernel_backend="triton")
    ours.load_state_dict(twin.state_dict())
    ours.to_device(DEVICE)
    outputs = []
    for model in (twin, ours):
        device = next(model.parameters()).device
        cache = model.new_cache(64)
        a, b = cache.allocate(32), cache.allocate(32)
        prompt = torch.randn(1, 7, 72, generator=gen(7)).to(device)
        first = model(prompt, [0], cache, [a])
        model(prompt[:, :3], [0], cache, [b])
        step = model(torch.randn(2, 1, 72, generator=gen(8)).to(device), [7, 3], cache, [a, b])
        outputs.append((first, step))
    for got, want in zip(outputs[1], outputs[0], strict=True):
        close(got, want, 1e-4)
