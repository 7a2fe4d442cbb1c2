"""Convert a GGUF file into a Hugging Face style model folder, weights in float32.

Architectures (`general.architecture`): `llama` (Llama, Mistral, and Mixtral when it has
experts), `qwen3`, `qwen3moe` and `gpt-oss` (see gguf_gpt_oss.py; its MXFP4 experts stay MXFP4).
The folder holds `model.safetensors` (the family's Hugging Face tensor names, written layer by
layer so a span's tensors lie together on disk; stacked experts are written one by one),
`config.json`, `tokenizer.json`, `tokenizer_config.json` (with
the chat template) and `generation_config.json`.
"""

from __future__ import annotations

import json
import logging
import math
import struct
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader, ReaderTensor

from layerswarm.errors import ModelFormatError
from layerswarm.shards import gguf_gpt_oss
from layerswarm.shards.gguf_tensors import (
    Entry,
    Planned,
    Progress,
    as_float32,
    check_types,
    dequantize,
    meta_int,
    source_names,
    write_safetensors,
)
from layerswarm.shards.gguf_tokenizer import gguf_tokenizer, tokenizer_config

log = logging.getLogger(__name__)


# `general.architecture` values this module converts -> whether llama.cpp interleaved q/k rows
# (its LlamaModel.permute, which Mixtral inherits; Qwen models and gpt-oss are stored as they are).
GGUF_ARCHITECTURES = {"llama": True, "qwen3": False, "qwen3moe": False, gguf_gpt_oss.ARCH: False}
_QK_NORMS = (
    ("attn_q_norm.weight", "self_attn.q_norm.weight"),
    ("attn_k_norm.weight", "self_attn.k_norm.weight"),
)
_EXPERT_STACKS = ("ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight")

# (gguf name inside `blk.{i}.`, Hugging Face name inside `model.layers.{i}.`), in the order
# written to disk. Biases are optional (Qwen2-style q/k/v biases).
_LAYER_TENSORS = (
    ("attn_norm.weight", "input_layernorm.weight"),
    ("attn_q.weight", "self_attn.q_proj.weight"),
    ("attn_q.bias", "self_attn.q_proj.bias"),
    ("attn_k.weight", "self_attn.k_proj.weight"),
    ("attn_k.bias", "self_attn.k_proj.bias"),
    ("attn_v.weight", "self_attn.v_proj.weight"),
    ("attn_v.bias", "self_attn.v_proj.bias"),
    ("attn_output.weight", "self_attn.o_proj.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
    ("ffn_gate.weight", "mlp.gate_proj.weight"),
    ("ffn_up.weight", "mlp.up_proj.weight"),
    ("ffn_down.weight", "mlp.down_proj.weight"),
)
_OPTIONAL = {"attn_q.bias", "attn_k.bias", "attn_v.bias"}
# Tensors llama.cpp may store that carry no weights of their own: `rope_freqs` becomes
# `rope_scaling` in config.json; `attn_rot_embd` is a cache of RoPE sines that old files carry.
_CONSUMED = ("rope_freqs.weight", ".attn_rot_embd")
_YARN_KEYS = (
    ("yarn_beta_fast", "beta_fast"),
    ("yarn_beta_slow", "beta_slow"),
    ("yarn_attn_factor", "attention_factor"),
)


def convert_gguf(gguf_path: Path, out_dir: Path, progress: Progress | None = None) -> None:
    """Convert a GGUF file (llama, qwen3, qwen3moe, gpt-oss) into a Hugging Face style folder.

    Args:
        gguf_path: the `.gguf` file.
        out_dir: the folder to write into (created if missing; files in it are overwritten).
        progress: told `("converting 120/272 tensors", 0.44)` as each tensor is written.

    Raises:
        ModelFormatError: the file is not GGUF, not a supported architecture, lacks metadata or
            tensors, or stores a tensor type or tokenizer this converter cannot read.
    """
    gguf_path = Path(gguf_path)
    reader = _open(gguf_path)
    meta = {name: field.contents() for name, field in reader.fields.items()}
    arch = meta.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ModelFormatError(
            f"{gguf_path} holds a {arch!r} model; layerswarm converts only "
            f"{', '.join(GGUF_ARCHITECTURES)} GGUF files"
        )
    tensors = {t.name: t for t in reader.tensors}
    config = _config(meta, tensors, gguf_path, arch)
    entries = _plan(tensors, config, gguf_path, arch)
    tokenizer = gguf_tokenizer(meta, gguf_path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_safetensors(out_dir / "model.safetensors", entries, progress)
    _write_json(out_dir / "config.json", config)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    _write_json(out_dir / "tokenizer_config.json", tokenizer_config(meta, config))
    generation: dict[str, Any] = {
        k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config
    }
    _write_json(out_dir / "generation_config.json", generation)


def _open(path: Path) -> GGUFReader:
    if not path.is_file():
        raise ModelFormatError(f"no GGUF file at {path}")
    try:
        return GGUFReader(path)
    except (ValueError, OSError, struct.error) as e:
        raise ModelFormatError(f"{path} is not a readable GGUF file: {e}") from None


def _config(
    meta: dict[str, Any], tensors: dict[str, ReaderTensor], path: Path, arch: str
) -> dict[str, Any]:
    """A Hugging Face `config.json` from `<arch>.*` metadata."""
    if arch != "llama":  # the keys below are read under the file's own architecture
        meta = {k.replace(f"{arch}.", "llama.", 1): v for k, v in meta.items()}
    if "token_embd.weight" not in tensors:
        raise ModelFormatError(f"{path} lacks the tensor 'token_embd.weight'")
    hidden = meta_int(meta, "llama.embedding_length", path)
    heads = meta_int(meta, "llama.attention.head_count", path)
    head_dim = meta_int(meta, "llama.attention.key_length", path, hidden // heads)
    rope_dim = meta_int(meta, "llama.rope.dimension_count", path, head_dim)
    if rope_dim != head_dim:
        raise ModelFormatError(
            f"{path} rotates {rope_dim} of {head_dim} features per head; "
            "partial RoPE is not supported"
        )
    theta = as_float32(meta.get("llama.rope.freq_base", 10000.0))
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": meta_int(
            meta, "llama.feed_forward_length", path, meta.get("llama.expert_feed_forward_length")
        ),
        "num_hidden_layers": meta_int(meta, "llama.block_count", path),
        "num_attention_heads": heads,
        "num_key_value_heads": meta_int(meta, "llama.attention.head_count_kv", path, heads),
        "head_dim": head_dim,
        "vocab_size": int(tensors["token_embd.weight"].shape[1]),
        "rms_norm_eps": as_float32(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": theta,
        "rope_scaling": _rope_scaling(meta, tensors, head_dim, theta, path),
        "max_position_embeddings": meta_int(meta, "llama.context_length", path, 2048),
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": "blk.0.attn_q.bias" in tensors,
        "mlp_bias": False,
        "hidden_act": "silu",
        "torch_dtype": "float32",
    }
    if arch == gguf_gpt_oss.ARCH:
        config |= gguf_gpt_oss.config_fields(meta, tensors, path, config["rope_scaling"])
    else:
        config |= _family_fields(meta, path, arch)
    if arch == "qwen3moe":  # layers stored with a plain MLP
        layers = range(config["num_hidden_layers"])
        config["mlp_only_layers"] = [
            i for i in layers if f"blk.{i}.ffn_gate_inp.weight" not in tensors
        ]
    eos = [
        meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id") if k in meta
    ]
    eos = list(dict.fromkeys(eos))  # Llama 3 instruct ends a turn with eot, a document with eos
    if eos:
        config["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    for key, hf_key in (("bos_token_id", "bos_token_id"), ("padding_token_id", "pad_token_id")):
        if f"tokenizer.ggml.{key}" in meta:
            config[hf_key] = meta[f"tokenizer.ggml.{key}"]
    return config


def _family_fields(meta: dict[str, Any], path: Path, arch: str) -> dict[str, Any]:
    """What the architecture adds to config.json: its class, and its experts."""
    experts = int(meta.get("llama.expert_count") or 0)
    moe: dict[str, Any] = {}
    if experts or arch == "qwen3moe":
        moe["num_experts_per_tok"] = meta_int(meta, "llama.expert_used_count", path)
        moe["norm_topk_prob"] = True  # llama.cpp renormalizes the top k for both
    if arch == "qwen3moe":
        moe["num_experts"] = experts
        moe["moe_intermediate_size"] = meta_int(meta, "llama.expert_feed_forward_length", path)
        return {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe"} | moe
    if arch == "qwen3":
        return {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3"}
    if experts:
        return (
            {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral"}
            | moe
            | {"num_local_experts": experts}
        )
    return {}


def _rope_scaling(
    meta: dict[str, Any], tensors: dict[str, ReaderTensor], head_dim: int, theta: float, path: Path
) -> dict[str, Any] | None:
    """`rope_scaling` from `llama.rope.scaling.*`, or recovered from a `rope_freqs` tensor."""
    original = meta.get("llama.rope.scaling.original_context_length")
    if "rope_freqs.weight" in tensors:
        # llama.cpp turns Llama 3's `rope_scaling` into per-frequency factors and drops the
        # parameters; the largest factor is `factor`, the others are Meta's published defaults.
        factors = dequantize(tensors["rope_freqs.weight"])
        factor, context = float(factors.max()), int(original or 8192)
        if not np.allclose(factors, _llama3_factors(head_dim, theta, factor, 1.0, 4.0, context)):
            raise ModelFormatError(f"{path}: rope_freqs.weight matches no llama3 rope_scaling")
        return {
            "rope_type": "llama3",
            "factor": factor,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": context,
        }
    kind = meta.get("llama.rope.scaling.type")
    if kind in (None, "none"):
        return None
    scaling = {"rope_type": kind, "factor": as_float32(meta.get("llama.rope.scaling.factor", 1.0))}
    if original:
        scaling["original_max_position_embeddings"] = original
    for key, hf_key in _YARN_KEYS:  # llama.cpp writes these when the HF config names them
        if f"llama.rope.scaling.{key}" in meta:
            scaling[hf_key] = as_float32(meta[f"llama.rope.scaling.{key}"])
    return scaling


def _llama3_factors(
    head_dim: int,
    theta: float,
    factor: float,
    low_freq_factor: float,
    high_freq_factor: float,
    original_max_position_embeddings: int,
) -> np.ndarray:
    """The per-frequency factors llama.cpp's convert_hf_to_gguf stores as `rope_freqs`."""
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    wavelen = 2 * math.pi / freqs
    smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (
        high_freq_factor - low_freq_factor
    )
    out = 1 / ((1 - smooth) / factor + smooth)
    out = np.where(wavelen < original_max_position_embeddings / high_freq_factor, 1.0, out)
    return np.where(wavelen > original_max_position_embeddings / low_freq_factor, factor, out)


def _plan(
    tensors: dict[str, ReaderTensor], config: dict[str, Any], path: Path, arch: str
) -> list[Planned]:
    """Every tensor to write, in disk order: embedding, layer 0, layer 1, ..., norm, head."""
    entries: list[Planned] = [Entry("model.embed_tokens.weight", tensors["token_embd.weight"])]
    for i in range(config["num_hidden_layers"]):
        blk = _layer(tensors, i)
        if arch == gguf_gpt_oss.ARCH:
            entries += gguf_gpt_oss.layer_entries(blk, i, config, path)
        else:
            entries += _llama_layer(blk, i, config, path, GGUF_ARCHITECTURES[arch])
    if "output_norm.weight" not in tensors:
        raise ModelFormatError(f"{path} lacks the tensor 'output_norm.weight'")
    entries.append(Entry("model.norm.weight", tensors["output_norm.weight"]))
    if "output.weight" in tensors:
        entries.append(Entry("lm_head.weight", tensors["output.weight"]))
    used = source_names(entries)
    extra = [n for n in tensors if n not in used and not any(c in n for c in _CONSUMED)]
    if extra:
        raise ModelFormatError(f"{path} holds tensors this architecture does not have: {extra[:5]}")
    check_types(entries)
    return entries


def _llama_layer(
    blk: dict[str, ReaderTensor], i: int, config: dict[str, Any], path: Path, permuted: bool
) -> list[Planned]:
    """Layer `i` of a llama-like file (Llama, Mistral, Mixtral, Qwen3, Qwen3-MoE)."""
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    sparse = "ffn_gate_inp.weight" in blk  # experts instead of ffn_gate/up/down
    own = _LAYER_TENSORS[:9] if sparse else _LAYER_TENSORS  # [:9]: up to ffn_norm
    entries: list[Planned] = []
    for gguf_name, hf_name in own + _QK_NORMS:
        source = blk.get(gguf_name)
        if source is None and (gguf_name in _OPTIONAL or (gguf_name, hf_name) in _QK_NORMS):
            continue
        if source is None:
            raise ModelFormatError(f"{path} lacks the tensor 'blk.{i}.{gguf_name}'")
        n_heads = heads.get(gguf_name.split(".")[0]) if permuted else None
        entries.append(Entry(f"model.layers.{i}.{hf_name}", source, n_heads))
    if sparse:
        entries += _experts(blk, i, config, path)
    return entries


def _layer(tensors: dict[str, ReaderTensor], i: int) -> dict[str, ReaderTensor]:
    pre = f"blk.{i}."
    return {n[len(pre) :]: t for n, t in tensors.items() if n.startswith(pre)}


def _experts(
    blk: dict[str, ReaderTensor], i: int, config: dict[str, Any], path: Path
) -> list[Planned]:
    """The router and every expert of layer `i`, from llama.cpp's stacked `ffn_*_exps`."""
    mixtral = config["architectures"] == ["MixtralForCausalLM"]
    pre = f"model.layers.{i}." + ("block_sparse_moe." if mixtral else "mlp.")
    names = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
    missing = [n for n in _EXPERT_STACKS if n not in blk]
    if missing:
        raise ModelFormatError(f"{path} lacks the tensor 'blk.{i}.{missing[0]}' (stored experts)")
    entries: list[Planned] = [Entry(pre + "gate.weight", blk["ffn_gate_inp.weight"])]
    n = int(blk["ffn_gate_exps.weight"].shape[-1])
    for e in range(n):
        for stack, name in zip(_EXPERT_STACKS, names, strict=True):
            entries.append(Entry(f"{pre}experts.{e}.{name}.weight", blk[stack], expert=e))
    return entries


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
