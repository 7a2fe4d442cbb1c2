"""GGUF files of the new families (as llama.cpp lays them out) convert into folders that give the
logits of the folder they were written from (itself checked against transformers in
test_families.py): Qwen3, Qwen3-MoE (stacked experts), Mixtral and gpt-oss (split or fused
experts, MXFP4 experts); and the MXFP4 dequantizer against gguf's and transformers'."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import (
    MODEL_ARCH,
    GGMLQuantizationType,
    GGUFWriter,
    RopeScalingType,
    TokenType,
    get_tensor_name_map,
    quants,
)
from safetensors.torch import load_file
from tokenizers import Tokenizer, pre_tokenizers
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from layerswarm.cli.common import resolve_model_cli
from layerswarm.errors import ModelFormatError
from layerswarm.shards.config import ModelConfig, Span
from layerswarm.shards.convert import convert_gguf
from layerswarm.shards.families.gpt_oss import dequantize_mxfp4
from layerswarm.shards.weights import load_client_head, load_span

MXFP4 = GGMLQuantizationType.MXFP4
ARCH = {"qwen3": "qwen3", "qwen3_moe": "qwen3moe", "mixtral": "llama"}
ATTENTION = {  # Hugging Face name inside `model.layers.{i}.` -> GGUF name inside `blk.{i}.`
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "mlp.gate.weight": "ffn_gate_inp.weight",
    "block_sparse_moe.gate.weight": "ffn_gate_inp.weight",
}
EXPERTS = {  # expert tensor name -> the GGUF stack it goes into
    "gate_proj": "ffn_gate_exps.weight",
    "up_proj": "ffn_up_exps.weight",
    "down_proj": "ffn_down_exps.weight",
    "w1": "ffn_gate_exps.weight",
    "w3": "ffn_up_exps.weight",
    "w2": "ffn_down_exps.weight",
}


def permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute of q/k rows (Mixtral's files have it, Qwen's do not)."""
    return (
        w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def gguf_tensors(model_dir: Path, config: ModelConfig) -> dict[str, np.ndarray]:
    """The model's tensors under llama.cpp's names, experts stacked `(experts, out, in)`."""
    hf = {n: t.numpy() for n, t in load_file(model_dir / "model.safetensors").items()}
    out = {
        "token_embd.weight": hf.pop("model.embed_tokens.weight"),
        "output_norm.weight": hf.pop("model.norm.weight"),
        "output.weight": hf.pop("lm_head.weight"),
    }
    stacks: dict[str, dict[int, np.ndarray]] = {}
    for name, value in hf.items():
        parts = name.split(".")
        i, rest = int(parts[2]), ".".join(parts[3:])
        if ".experts." in rest:
            e, kind = int(parts[-3]), parts[-2]
            stacks.setdefault(f"blk.{i}.{EXPERTS[kind]}", {})[e] = value
            continue
        if config.architecture == "mixtral" and rest.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config.num_heads if "q_proj" in rest else config.num_kv_heads
            value = permute(value, heads)
        out[f"blk.{i}.{ATTENTION[rest]}"] = value
    for name, by_expert in stacks.items():
        out[name] = np.stack([by_expert[e] for e in sorted(by_expert)])
    return out


def start_gguf(path: Path, arch: str, config: ModelConfig, pre: str) -> GGUFWriter:
    """A writer holding the metadata all these families' files have, and a byte tokenizer."""
    w = GGUFWriter(path, arch)
    w.add_block_count(config.num_layers)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_heads)
    w.add_head_count_kv(config.num_kv_heads)
    w.add_key_length(config.head_dim)
    w.add_value_length(config.head_dim)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_rope_freq_base(config.rope_theta)
    if config.moe is not None:
        w.add_expert_count(config.moe.num_experts)
        w.add_expert_used_count(config.moe.experts_per_token)
        w.add_expert_feed_forward_length(config.moe.intermediate_size)
    tokens = sorted(pre_tokenizers.ByteLevel.alphabet())  # the tiny models' byte tokenizer
    tokens[-1] = tokens[0] + tokens[1]  # one merge (a GGUF BPE needs one), still 256 tokens
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([TokenType.NORMAL] * len(tokens))
    w.add_token_merges([f"{tokens[0]} {tokens[1]}"])
    return w


def finish_gguf(w: GGUFWriter) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_gguf(path: Path, model_dir: Path, arch: str) -> None:
    config = ModelConfig.from_file(model_dir)
    w = start_gguf(path, arch, config, "gpt2")
    w.add_rope_dimension_count(config.head_dim)
    for name, value in gguf_tensors(model_dir, config).items():
        w.add_tensor(name, np.ascontiguousarray(value, dtype=np.float32))
    finish_gguf(w)


@pytest.mark.parametrize("kind", sorted(ARCH))
def test_a_gguf_file_converts_to_the_same_model(
    tiny_family: Callable[[str], Path], tmp_path: Path, kind: str
) -> None:
    model_dir = tiny_family("qwen3_moe" if kind == "qwen3_moe" else kind)
    write_gguf(tmp_path / "m.gguf", model_dir, ARCH[kind])
    convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    converted = ModelConfig.from_file(tmp_path / "out")
    assert converted.architecture == kind
    config = ModelConfig.from_file(model_dir)
    ours, theirs = (
        {
            **load_span(d, Span(0, config.num_layers)).state_dict(),
            **load_client_head(d).state_dict(),
        }
        for d in (tmp_path / "out", model_dir)
    )
    assert ours.keys() == theirs.keys()
    for name, value in ours.items():
        assert torch.equal(value, theirs[name]), name  # the same weights, bit for bit
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(0))
    # The same logits, but for the last bits: on some CPUs (an AMD EPYC) MKL's products depend
    # on where a weight sits in memory, and the two files map their tensors at other offsets.
    torch.testing.assert_close(
        logits(tmp_path / "out", ids), logits(model_dir, ids), rtol=0, atol=1e-5
    )


def logits(model_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    config = ModelConfig.from_file(model_dir)
    head = load_client_head(model_dir)
    span = load_span(model_dir, Span(0, config.num_layers))
    cache = span.new_cache(ids.shape[1])
    return head.logits(span(head.embed_tokens(ids), [0], cache, [cache.allocate(ids.shape[1])]))


# gpt-oss, written as llama.cpp's convert_hf_to_gguf GptOssModel writes it (conversion/gpt_oss.py
# at ggml-org/llama.cpp 2bbcf7fc93a4): names from gguf's TensorNameMap, `sinks` + ".weight", the
# interleaved `gate_up_proj` transposed and split 0::2 (gate) / 1::2 (up), `down_proj` transposed.
def gpt_oss_gguf_tensors(model_dir: Path, fused: bool) -> dict[str, np.ndarray]:
    hf = {n: t.numpy() for n, t in load_file(model_dir / "model.safetensors").items()}
    names = get_tensor_name_map(MODEL_ARCH.GPT_OSS, ModelConfig.from_file(model_dir).num_layers)
    out: dict[str, np.ndarray] = {}
    for name, value in hf.items():
        if "sinks" in name:
            name += ".weight"
        if name.endswith("down_proj_bias"):
            name = name.replace("down_proj_bias", "down_proj.bias")
        elif name.endswith("down_proj"):
            name, value = name + ".weight", value.swapaxes(-1, -2)
        elif "gate_up_proj" in name:
            i = int(name.split(".")[2])
            if name.endswith("_bias"):
                kind, gate, up = "bias", value[..., ::2], value[..., 1::2]
            else:
                value = value.swapaxes(-1, -2)
                kind, gate, up = "weight", value[:, ::2, :], value[:, 1::2, :]
            if fused:  # the later `fuse_gate_up_exps` option: gate rows, then up rows
                out[f"blk.{i}.ffn_gate_up_exps.{kind}"] = np.concatenate((gate, up), axis=1)
            else:
                out[f"blk.{i}.ffn_gate_exps.{kind}"], out[f"blk.{i}.ffn_up_exps.{kind}"] = gate, up
            continue
        out[names.get_name(name, try_suffixes=(".weight", ".bias"))] = value
    return out


def write_gpt_oss_gguf(
    path: Path, model_dir: Path, fused: bool = False, experts: str = "f32", drop: str = ""
) -> None:
    """`experts`: "f32", "mxfp4" (quantized by gguf.quants, as llama-quantize would) or
    "mxfp4-values" (the float32 values those MXFP4 bytes stand for). `drop`: a tensor left out."""
    config = ModelConfig.from_file(model_dir)
    assert config.moe is not None and config.rope_scaling is not None
    # TextModel.set_gguf_parameters, then GptOssModel's sliding window and expert width
    w = start_gguf(path, "gpt-oss", config, "gpt-4o")
    w.add_rope_scaling_type(RopeScalingType.YARN)
    w.add_rope_scaling_factor(config.rope_scaling.factor)
    w.add_rope_scaling_orig_ctx_len(config.rope_scaling.original_max_position_embeddings)
    w.add_rope_scaling_yarn_beta_fast(config.rope_scaling.beta_fast)
    w.add_rope_scaling_yarn_beta_slow(config.rope_scaling.beta_slow)
    w.add_sliding_window(config.sliding_window)
    for name, value in gpt_oss_gguf_tensors(model_dir, fused).items():
        if name == drop:
            continue
        value = np.ascontiguousarray(value, dtype=np.float32)
        if experts != "f32" and name.endswith("_exps.weight"):
            stored = quants.quantize(value, MXFP4)
            if experts == "mxfp4":
                w.add_tensor(name, stored, raw_dtype=MXFP4)
                continue
            value = quants.dequantize(stored, MXFP4)
        w.add_tensor(name, value)
    finish_gguf(w)


@pytest.mark.parametrize("fused", [False, True], ids=["gate-and-up", "fused-gate-up"])
def test_a_gpt_oss_gguf_file_converts_to_the_same_model(
    tiny_family: Callable[[str], Path], tmp_path: Path, fused: bool
) -> None:
    model_dir = tiny_family("gpt_oss")
    write_gpt_oss_gguf(tmp_path / "oss.gguf", model_dir, fused)
    # what `swarm-peer start --model oss.gguf` (and every other command) does with the file
    out = resolve_model_cli(str(tmp_path / "oss.gguf"), tmp_path / "cache")
    assert ModelConfig.from_file(out) == ModelConfig.from_file(model_dir)
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(0))
    assert torch.equal(logits(out, ids), logits(model_dir, ids))
    # o200k's split (tokenizer.ggml.pre "gpt-4o"): "I'm" whole, digits in threes
    pieces = Tokenizer.from_file(str(out / "tokenizer.json")).pre_tokenizer.pre_tokenize_str
    assert [p for p, _ in pieces("I'm 12345")] == ["I'm", "Ġ", "123", "45"]


def test_gpt_oss_mxfp4_experts_stay_mxfp4_and_load_as_their_values(
    tiny_family: Callable[[str], Path], tmp_path: Path
) -> None:
    model_dir = tiny_family("gpt_oss")
    write_gpt_oss_gguf(tmp_path / "q.gguf", model_dir, experts="mxfp4")
    write_gpt_oss_gguf(tmp_path / "v.gguf", model_dir, experts="mxfp4-values")
    convert_gguf(tmp_path / "q.gguf", tmp_path / "q")
    convert_gguf(tmp_path / "v.gguf", tmp_path / "v")
    config = ModelConfig.from_file(tmp_path / "q")
    assert config.weights_format == "mxfp4"
    stored = load_file(tmp_path / "q" / "model.safetensors")
    assert stored["model.layers.0.mlp.experts.gate_up_proj_blocks"].shape == (8, 192, 2, 16)
    assert stored["model.layers.0.mlp.experts.down_proj_scales"].dtype == torch.uint8
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(0))
    assert torch.equal(logits(tmp_path / "q", ids), logits(tmp_path / "v", ids))


@pytest.mark.parametrize("drop", ["blk.1.attn_sinks.weight", "blk.3.ffn_up_exps.bias"])
def test_a_gpt_oss_gguf_file_missing_a_tensor_is_refused_by_name(
    tiny_family: Callable[[str], Path], tmp_path: Path, drop: str
) -> None:
    write_gpt_oss_gguf(tmp_path / "bad.gguf", tiny_family("gpt_oss"), drop=drop)
    with pytest.raises(ModelFormatError, match=f"lacks the tensor '{drop}'"):
        convert_gguf(tmp_path / "bad.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before anything is written


def llama_cpp_nibble_layout(blocks: torch.Tensor) -> torch.Tensor:
    """llama.cpp's GptOssModel.transform_nibble_layout (HF's MXFP4 nibbles to ggml's), as is."""
    t_lo, t_hi = blocks & 0x0F, blocks & 0xF0
    tensor = (t_lo << 4) | (t_hi >> 4)
    blk_a, blk_b = tensor.chunk(2, dim=-1)
    blk_a0, blk_a1 = (blk_a & 0xF0).view(-1, 1), (blk_a << 4).view(-1, 1)
    blk_a = torch.stack((blk_a0, blk_a1), dim=2).view(tensor.shape)
    blk_b0, blk_b1 = (blk_b >> 4).view(-1, 1), (blk_b & 0x0F).view(-1, 1)
    blk_b = torch.stack((blk_b0, blk_b1), dim=2).view(tensor.shape)
    out = blk_a | blk_b
    return ((out & 0xF0) >> 4) | ((out & 0x0F) << 4)


def test_the_mxfp4_dequantizer_matches_gguf_and_transformers() -> None:
    """Our HF-layout MXFP4 dequantizer against two others on every nibble and many scales:
    gguf's (on the bytes llama.cpp's converter makes of them) and transformers'."""
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 6, 4, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(100, 150, (3, 6, 4), dtype=torch.uint8, generator=g)
    scales[0, 0, :] = torch.tensor([0, 1, 127, 252], dtype=torch.uint8)  # 2**-127 .. 2**125
    ours = dequantize_mxfp4(blocks, scales)  # (3, 6, 128)
    ggml = torch.cat((scales[..., None], llama_cpp_nibble_layout(blocks)), dim=-1)
    reference = quants.dequantize(ggml.reshape(3, 6, 4 * 17).numpy(), MXFP4)
    assert torch.equal(ours, torch.from_numpy(reference))
    hf = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # (3, 128, 6)
    assert torch.equal(ours, hf.transpose(1, 2))
