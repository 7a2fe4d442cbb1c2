"""Every family against transformers on tiny random models: logits, spans, the KV cache, the
continuous-batching path, int8 quantization, and what a MoE step computes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import cast

import pytest
import torch

from layerswarm.kernels.cpu_linear import pack_linears
from layerswarm.shards.blocks import ClientHead, DecoderLayer, SpanModel, StepBatch
from layerswarm.shards.config import ModelConfig, Span
from layerswarm.shards.moe import Expert, MoEBlock
from layerswarm.shards.quantize import QuantLinear, quantize
from layerswarm.shards.weights import load_client_head, load_span

TOL = 1e-4
TinyFamily = Callable[[str], Path]


def hf_logits(model_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


def run_spans(
    model_dir: Path, ids: torch.Tensor, spans: list[Span] | None = None, quant: str | None = None
) -> torch.Tensor:
    config = ModelConfig.from_file(model_dir)
    head = load_client_head(model_dir)
    hidden = head.embed_tokens(ids)
    for span in spans or [Span(0, config.num_layers)]:
        model = load_span(model_dir, span)
        if quant:
            quantize(model, quant)  # type: ignore[arg-type]
        cache = model.new_cache(ids.shape[1])
        hidden = model(hidden, [0], cache, [cache.allocate(ids.shape[1])])
    return head.logits(hidden)


def ids_of(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(seed))


def test_logits_match_transformers(tiny_family: TinyFamily, family: str) -> None:
    model_dir = tiny_family(family)
    ids = ids_of(40, 1)
    assert (run_spans(model_dir, ids) - hf_logits(model_dir, ids)).abs().max() < TOL


def test_span_pieces_chained_equal_the_whole(tiny_family: TinyFamily, family: str) -> None:
    model_dir = tiny_family(family)
    ids = ids_of(17, 3)
    whole = run_spans(model_dir, ids)
    assert torch.equal(whole, run_spans(model_dir, ids, [Span(0, 1), Span(1, 3), Span(3, 4)]))


def load(model_dir: Path) -> tuple[SpanModel, ClientHead]:
    config = ModelConfig.from_file(model_dir)
    return load_span(model_dir, Span(0, config.num_layers)), load_client_head(model_dir)


def test_decode_with_cache_equals_recompute(tiny_family: TinyFamily, family: str) -> None:
    model_dir = tiny_family(family)
    model, head = load(model_dir)
    ids = ids_of(24, 4)
    cache = model.new_cache(64, page_size=4)  # small pages: the session spans several
    session = cache.allocate(24)
    steps = [model(head.embed_tokens(ids[:, :11]), [0], cache, [session])]
    for t in range(11, 24):  # past gpt-oss's window of 8
        steps.append(model(head.embed_tokens(ids[:, t : t + 1]), [t], cache, [session]))
    incremental = head.logits(torch.cat(steps, dim=1))
    assert (incremental - run_spans(model_dir, ids)).abs().max() < TOL


def test_a_mixed_step_of_decodes_and_a_prefill_chunk_equals_each_alone(
    tiny_family: TinyFamily, family: str
) -> None:
    """The continuous-batching path peers use: `forward_flat` over segments of many sessions."""
    model_dir = tiny_family(family)
    model, head = load(model_dir)
    cache = model.new_cache(128, page_size=4)
    prompts = [ids_of(n, 10 + n) for n in (13, 9, 7)]
    blocker = cache.allocate(4)  # so that later sessions' pages are not one run
    sessions = [cache.allocate(20) for _ in prompts]
    cache.free(blocker)
    for p, s in zip(prompts[:2], sessions, strict=False):  # two sessions are decoding
        model(head.embed_tokens(p), [0], cache, [s])
    nxt = ids_of(2, 5)
    # one step: a decode token of each of the two, and the third's whole prompt as a chunk
    x = head.embed_tokens(torch.cat([nxt[0], prompts[2][0]])[None])[0]
    batch = StepBatch([13, 9, 0], [1, 1, 7], sessions)
    out = head.logits(model.forward_flat(x, batch, cache)[None])[0]
    for row, p in enumerate(prompts[:2]):
        alone = run_spans(model_dir, torch.cat([p, nxt[:, row : row + 1]], dim=1))[0, -1]
        assert (out[row] - alone).abs().max() < TOL
    assert (out[2:] - run_spans(model_dir, prompts[2])[0]).abs().max() < TOL


def test_int8_keeps_top1_agreement(tiny_family: TinyFamily, family: str) -> None:
    model_dir = tiny_family(family)
    ids = ids_of(128, 6)
    full = run_spans(model_dir, ids).argmax(-1)
    int8 = run_spans(model_dir, ids, quant="int8").argmax(-1)
    agreement = (full == int8).float().mean().item()
    assert agreement >= 0.95, f"int8 top-1 agreement {agreement:.3f}"


def sparse_layers(model: SpanModel) -> list[MoEBlock]:
    return [m for layer in model.layers if (m := cast(DecoderLayer, layer).moe) is not None]


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantization_covers_every_expert_and_keeps_the_router(
    tiny_family: TinyFamily, mode: str
) -> None:
    model, head = load(tiny_family("qwen3_moe"))
    quantize(model, mode)  # type: ignore[arg-type]
    pack_linears(model)
    for moe in sparse_layers(model):
        for expert in moe.experts:
            e = cast(Expert, expert)
            assert isinstance(e.gate_up, QuantLinear) and isinstance(e.down, QuantLinear)
        assert moe.router_weight.dtype == torch.float32  # the router is not quantized
    cache = model.new_cache(16)
    out = model(head.embed_tokens(ids_of(16, 7)), [0], cache, [cache.allocate(16)])
    assert torch.isfinite(out).all()


def record_expert_calls(model: SpanModel) -> list[tuple[int, int, int]]:
    """Hooks every expert: each call appends (layer, expert, tokens it ran on)."""
    calls: list[tuple[int, int, int]] = []
    for i, moe in enumerate(sparse_layers(model)):
        for e, expert in enumerate(moe.experts):

            def hook(_m: object, args: tuple[torch.Tensor], i: int = i, e: int = e) -> None:
                calls.append((i, e, args[0].shape[0]))

            cast(Expert, expert).gate_up.register_forward_pre_hook(hook)
    return calls


def test_a_decode_step_runs_only_the_chosen_experts_grouped_by_expert(
    tiny_family: TinyFamily,
) -> None:
    model, head = load(tiny_family("qwen3_moe"))
    k, n_sparse = 2, 3  # top-2 of 8 experts; layers 0, 1 and 3 are sparse
    calls = record_expert_calls(model)
    cache = model.new_cache(64)
    sessions = [cache.allocate(16) for _ in range(3)]
    for j, s in enumerate(sessions):
        model(head.embed_tokens(ids_of(5, 20 + j)), [0], cache, [s])
    calls.clear()
    model(head.embed_tokens(ids_of(1, 30)), [5], cache, sessions[:1])  # one session's token
    assert len(calls) == k * n_sparse and all(tokens == 1 for _, _, tokens in calls)
    calls.clear()
    model(head.embed_tokens(ids_of(3, 31).T), [5, 5, 5], cache, sessions)  # three sessions
    for layer in range(n_sparse):
        mine = [(e, tokens) for i, e, tokens in calls if i == layer]
        experts = [e for e, _ in mine]
        assert len(experts) == len(set(experts))  # each chosen expert ran once, on its group
        assert sum(tokens for _, tokens in mine) == 3 * k


@pytest.mark.parametrize(
    ("step", "mlp_only", "dense"),
    [(1, [], ()), (2, [], (0, 2)), (1, [0, 3], (0, 3)), (2, [1], (0, 1, 2))],
)
def test_qwen3_moe_layers_are_sparse_where_the_config_says(
    step: int, mlp_only: list[int], dense: tuple[int, ...]
) -> None:
    d = {
        "architectures": ["Qwen3MoeForCausalLM"],
        "vocab_size": 256,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "decoder_sparse_step": step,
        "mlp_only_layers": mlp_only,
    }
    config = ModelConfig.from_dict(d)
    assert config.moe is not None and config.moe.dense_layers == dense
    assert [i for i in range(4) if not config.sparse(i)] == list(dense)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral", "gpt_oss"])
def test_the_one_token_path_equals_the_grouped_path(
    tiny_family: TinyFamily, name: str, dtype: torch.dtype
) -> None:
    model_dir = tiny_family(name)
    config = ModelConfig.from_file(model_dir)
    model = pack_linears(load_span(model_dir, Span(0, config.num_layers), dtype))
    x = torch.randn(6, config.hidden_size, generator=torch.Generator().manual_seed(3)).to(dtype)
    swiglu = model.ops.swiglu
    for moe in sparse_layers(model):
        act = swiglu if moe.config.activation == "silu" else moe._gpt_oss_glu
        for row in x.split(1):
            weights, index = moe.route(row)
            fast = moe(row, swiglu)  # a one-token input takes the one-token path
            assert torch.equal(fast, moe._grouped(row, weights, index, act))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 5])
def test_queries_and_keys_normed_and_rotated_as_one_tensor_give_the_bits_of_each_apart(
    dtype: torch.dtype, tokens: int
) -> None:
    from layerswarm.kernels import reference
    from layerswarm.shards.rope import Rotary

    g = torch.Generator().manual_seed(5)
    q_heads, kv_heads, hd = 6, 2, 16
    qk = (torch.randn(tokens, q_heads + kv_heads, hd, generator=g) * 3).to(dtype)
    q_w, k_w = (torch.randn(hd, generator=g).to(dtype) for _ in range(2))
    cos, sin = Rotary(ModelConfig(head_dim=hd)).cos_sin(torch.arange(7, 7 + tokens))
    q = reference.rms_norm(qk[:, :q_heads], q_w, 1e-6).contiguous()
    k = reference.rms_norm(qk[:, q_heads:], k_w, 1e-6).contiguous()
    reference.apply_rope(q, k, cos, sin)  # the path the Triton kernels are checked against
    both = reference.qk_norm(qk, q_heads, q_w, k_w, 1e-6)
    reference.rotate(both, reference.rope_factors(cos, sin, dtype))
    assert torch.equal(both[:, :q_heads], q) and torch.equal(both[:, q_heads:], k)


@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral", "gpt_oss"])
def test_routing_gives_the_weights_of_the_familys_own_formula(
    tiny_family: TinyFamily, name: str
) -> None:
    model_dir = tiny_family(name)
    config = ModelConfig.from_file(model_dir)
    model = load_span(model_dir, Span(0, config.num_layers), torch.float32)
    x = torch.randn(32, config.hidden_size, generator=torch.Generator().manual_seed(4))
    for moe in sparse_layers(model):
        c = moe.config
        weights, index = moe.route(x)
        logits = torch.nn.functional.linear(x, moe.router_weight, moe.router_bias)
        if c.router == "topk_softmax":  # gpt-oss: top k logits, softmax over them
            top, want_index = torch.topk(logits, c.experts_per_token, dim=-1)
            want = torch.softmax(top, dim=-1)
        else:  # softmax over all, top k, renormalised (transformers' Qwen3-MoE and Mixtral)
            want, want_index = torch.topk(torch.softmax(logits, -1), c.experts_per_token, dim=-1)
            if c.norm_topk_prob:
                want = want / want.sum(-1, keepdim=True)
        assert torch.equal(index, want_index)
        torch.testing.assert_close(weights, want, rtol=1e-6, atol=1e-7)
