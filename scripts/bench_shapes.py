"""Benchmark models of a larger shape with random weights: our folder and an F32 GGUF of them.

`llama_1b(cache, tokenizer_gguf)` makes a Llama-3.2-1B-shaped model (hidden 2048, 16 layers,
32 heads, 8 KV heads, intermediate 8192, tied embeddings, rope theta 500000 without llama3's
scaling) with transformers' `LlamaConfig` and its own random init (std 0.02), saved once as a
Hugging Face folder (what our engine and transformers load) and written as an F32 GGUF the way
llama.cpp's converter writes Llama (q/k rows interleaved) for `llama-bench`.

The vocabulary is SmolLM2's 49152, not Llama 3's 128256: the GGUF carries SmolLM2's tokenizer
(llama.cpp loads none without one; the benchmark feeds token ids), and the tied 49152 x 2048
head is 101M weights against 263M, so the model has 1.07B weights against 1.24B; the 16 layers,
where the decode step's time goes, are the real ones' shape.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

VOCAB = 49152  # SmolLM2's: see the module's docstring
SHAPE_1B = {
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
}
TOKENIZER_KEYS = ("model", "pre", "tokens", "token_type", "merges", "bos_token_id",
                  "eos_token_id", "unknown_token_id", "padding_token_id")  # fmt: skip


def llama_1b(cache: Path, tokenizer_gguf: Path) -> tuple[Path, Path]:
    """(our model folder, its F32 GGUF), made once under `cache`."""
    folder = cache / "models" / "llama-1b-shape-random"
    gguf_path = cache / "llamacpp" / "gguf" / "llama-1b-shape-random.F32.gguf"
    if not (folder / "config.json").exists():
        _save_folder(folder)
    if not gguf_path.exists():
        _write_gguf(folder, tokenizer_gguf, gguf_path)
    return folder, gguf_path


def _save_folder(folder: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        **SHAPE_1B,
    )
    model = LlamaForCausalLM(config)
    tmp = folder.with_name(folder.name + ".part")
    model.save_pretrained(tmp, safe_serialization=True)
    tmp.replace(folder)


def _permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf does to q/k rows (`LlamaModel.permute`)."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_gguf(folder: Path, tokenizer_gguf: Path, out: Path) -> None:
    from gguf import GGUFReader, GGUFWriter
    from safetensors.numpy import load_file

    c = SHAPE_1B
    heads, kv_heads = c["num_attention_heads"], c["num_key_value_heads"]
    tensors: dict[str, np.ndarray] = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors |= load_file(f)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".part")
    w = GGUFWriter(tmp, "llama")
    w.add_context_length(8192)
    w.add_embedding_length(c["hidden_size"])
    w.add_block_count(c["num_hidden_layers"])
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(c["hidden_size"] // heads)
    w.add_rope_freq_base(500000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(VOCAB)
    w.add_file_type(0)  # all F32
    reader = GGUFReader(tokenizer_gguf)
    for key in TOKENIZER_KEYS:
        field = reader.fields[f"tokenizer.ggml.{key}"]
        value = field.contents()
        vtype = field.types[0]
        sub = field.types[-1] if len(field.types) > 1 else None
        w.add_key_value(f"tokenizer.ggml.{key}", value, vtype, sub_type=sub)
    names = {
        **{"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"},
        **{f"self_attn.{p}_proj": f"attn_{p}" for p in "qkv"},
        **{"self_attn.o_proj": "attn_output"},
        **{f"mlp.{p}_proj": f"ffn_{p}" for p in ("gate", "up", "down")},
    }
    w.add_tensor("token_embd.weight", tensors["model.embed_tokens.weight"])
    for i in range(c["num_hidden_layers"]):
        for hf, ours in names.items():
            value = tensors[f"model.layers.{i}.{hf}.weight"]
            if ours in ("attn_q", "attn_k"):
                value = _permute(value, heads if ours == "attn_q" else kv_heads)
            w.add_tensor(f"blk.{i}.{ours}.weight", np.ascontiguousarray(value))
    w.add_tensor("output_norm.weight", tensors["model.norm.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.replace(out)
