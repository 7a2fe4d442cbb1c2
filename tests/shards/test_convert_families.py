"""GGUF files of the new families (as llama.cpp lays them out) convert into folders that give the
logits of the folder they were written from (itself checked against transformers in
test_families.py): Qwen3, Qwen3-MoE (stacked experts) and Mixtral."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFWriter, TokenType
from safetensors.torch import load_file
from tokenizers import pre_tokenizers

from layerswarm.shards.config import ModelConfig, Span
from layerswarm.shards.convert import convert_gguf
from layerswarm.shards.weights import load_client_head, load_span

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


def write_gguf(path: Path, model_dir: Path, arch: str) -> None:
    config = ModelConfig.from_file(model_dir)
    w = GGUFWriter(path, arch)
    w.add_block_count(config.num_layers)
    w.add_context_length(512)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_heads)
    w.add_head_count_kv(config.num_kv_heads)
    w.add_key_length(config.head_dim)
    w.add_value_length(config.head_dim)
    w.add_rope_dimension_count(config.head_dim)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_rope_freq_base(config.rope_theta)
    if config.moe is not None:
        w.add_expert_count(config.moe.num_experts)
        w.add_expert_used_count(config.moe.experts_per_token)
        w.add_expert_feed_forward_length(config.moe.intermediate_size)
    tokens = sorted(pre_tokenizers.ByteLevel.alphabet())  # the tiny models' byte tokenizer
    tokens[-1] = tokens[0] + tokens[1]  # one merge (a GGUF BPE needs one), still 256 tokens
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([TokenType.NORMAL] * len(tokens))
    w.add_token_merges([f"{tokens[0]} {tokens[1]}"])
    for name, value in gguf_tensors(model_dir, config).items():
        w.add_tensor(name, np.ascontiguousarray(value, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("kind", sorted(ARCH))
def test_a_gguf_file_converts_to_the_same_model(
    tiny_family: Callable[[str], Path], tmp_path: Path, kind: str
) -> None:
    model_dir = tiny_family("qwen3_moe" if kind == "qwen3_moe" else kind)
    write_gguf(tmp_path / "m.gguf", model_dir, ARCH[kind])
    convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    converted = ModelConfig.from_file(tmp_path / "out")
    assert converted.architecture == kind
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(0))
    assert torch.equal(logits(tmp_path / "out", ids), logits(model_dir, ids))


def logits(model_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    config = ModelConfig.from_file(model_dir)
    head = load_client_head(model_dir)
    span = load_span(model_dir, Span(0, config.num_layers))
    cache = span.new_cache(ids.shape[1])
    return head.logits(span(head.embed_tokens(ids), [0], cache, [cache.allocate(ids.shape[1])]))
