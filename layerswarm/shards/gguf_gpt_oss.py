"""gpt-oss GGUF files (`general.architecture` `gpt-oss`) back into Hugging Face's layout.

What llama.cpp writes, read in its converter (`convert_hf_to_gguf.py` class `GptOssModel`, since
moved to `conversion/gpt_oss.py`; ggml-org/llama.cpp at 2bbcf7fc93a4), its loader
(`llama_model_openai_moe::load_arch_hparams`/`load_arch_tensors`) and the gguf package's
`TensorNameMap` for `MODEL_ARCH.GPT_OSS`, and undone here:

- Names: `post_attention_layernorm` is `blk.N.post_attention_norm`, `self_attn.sinks` is
  `attn_sinks.weight`, the router `mlp.router` is `ffn_gate_inp` (weight and bias); q/k/v/o
  carry biases. q and k are not permuted (GptOssModel derives from TextModel, not LlamaModel).
- Experts: HF's fused `gate_up_proj (experts, hidden, 2 * inter)`, gate and up interleaved
  column by column, is transposed and split into `ffn_gate_exps` (columns 0::2) and
  `ffn_up_exps` (1::2), each `(experts, inter, hidden)` in torch order; its bias likewise into
  `ffn_gate_exps.bias` and `ffn_up_exps.bias`. `down_proj` is transposed into `ffn_down_exps`.
  A later converter option (`fuse_gate_up_exps`) writes one `ffn_gate_up_exps` holding the gate
  rows then the up rows; that is read too.
- MXFP4 experts are repacked, not dequantized (`transform_nibble_layout`): a ggml MXFP4 block is
  the E8M0 scale byte then 16 bytes whose low nibbles hold values 0-15 and high nibbles 16-31
  (gguf's `quants.MXFP4`); HF's `*_blocks` hold value pairs (2k low, 2k+1 high) and `*_scales`
  the same scale bytes.
- Metadata (TextModel.set_gguf_parameters + GptOssModel's): block_count, context_length,
  embedding_length, feed_forward_length, head counts, key_length (head_dim), rope freq_base,
  rms epsilon, expert_count, expert_used_count, yarn rope scaling (factor,
  original_context_length, and yarn_beta_fast/slow/attn_factor when the HF config named them),
  attention.sliding_window, expert_feed_forward_length. The sliding/full alternation
  (`attention.sliding_window_pattern`, default 2: even layers slide) and the swiglu limit 7.0
  are llama.cpp's defaults, as in HF's config, unless the file says otherwise; a separate RoPE
  base for sliding layers (`rope.freq_base_swa`, which its loader accepts) is refused.

MXFP4 expert stacks become HF's `*_blocks`/`*_scales` (uint8, `quantization_config: mxfp4`),
as OpenAI ships gpt-oss: the repack is lossless and keeps gpt-oss-20b's experts at ~10 GB where
float32 would take ~76 GB; the family dequantizes them at load. Experts stored as any other type
are dequantized to float32 `gate_up_proj`/`down_proj`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, ReaderTensor

from layerswarm.errors import ModelFormatError
from layerswarm.shards.gguf_tensors import (
    Derived,
    Entry,
    Planned,
    as_float32,
    dequantize_rows,
    meta_int,
)

ARCH = "gpt-oss"
# (GGUF name inside `blk.{i}.`, Hugging Face name inside `model.layers.{i}.`), in disk order.
_TENSORS = (
    ("attn_norm.weight", "input_layernorm.weight"),
    *(
        (f"attn_{g}.{kind}", f"self_attn.{h}_proj.{kind}")
        for g, h in (("q", "q"), ("k", "k"), ("v", "v"), ("output", "o"))
        for kind in ("weight", "bias")
    ),
    ("attn_sinks.weight", "self_attn.sinks"),
    ("post_attention_norm.weight", "post_attention_layernorm.weight"),
    ("ffn_gate_inp.weight", "mlp.router.weight"),
    ("ffn_gate_inp.bias", "mlp.router.bias"),
)
_MXFP4 = GGMLQuantizationType.MXFP4
_SWIGLU_LIMIT = 7.0  # HF GptOssConfig's default; llama.cpp's swiglu_oai uses the same


def experts_are_mxfp4(tensors: dict[str, ReaderTensor]) -> bool:
    """Every expert weight stack is MXFP4 (then they are repacked, not dequantized)."""
    stacks = [t for n, t in tensors.items() if n.endswith("_exps.weight")]
    return bool(stacks) and all(t.tensor_type == _MXFP4 for t in stacks)


def config_fields(
    meta: dict[str, Any],
    tensors: dict[str, ReaderTensor],
    path: Path,
    rope_scaling: dict[str, Any] | None,
) -> dict[str, Any]:
    """config.json fields of gpt-oss (`meta` keys read under `llama.`, as convert.py does)."""
    layers = meta_int(meta, "llama.block_count", path)
    base, swa_base = meta.get("llama.rope.freq_base"), meta.get("llama.rope.freq_base_swa")
    if swa_base is not None and base is not None and swa_base != base:
        raise ModelFormatError(f"{path}: a second RoPE base for sliding layers is not supported")
    fields: dict[str, Any] = {
        "architectures": ["GptOssForCausalLM"],
        "model_type": "gpt_oss",
        "num_local_experts": meta_int(meta, "llama.expert_count", path),
        "num_experts_per_tok": meta_int(meta, "llama.expert_used_count", path),
        "intermediate_size": meta_int(
            meta, "llama.expert_feed_forward_length", path, meta.get("llama.feed_forward_length")
        ),
        "sliding_window": meta_int(meta, "llama.attention.sliding_window", path),
        "layer_types": _layer_types(
            meta_int(meta, "llama.attention.sliding_window_pattern", path, 2), layers
        ),
        "swiglu_limit": _swiglu_limit(meta.get("llama.swiglu_clamp_exp"), path),
        # GGUF has no key for it; gpt-oss's YaRN does not round its correction range to whole
        # dimensions (transformers' GptOssConfig default rope_parameters: `"truncate": False`).
        "rope_scaling": None if rope_scaling is None else rope_scaling | {"truncate": False},
    }
    if experts_are_mxfp4(tensors):
        fields["quantization_config"] = {"quant_method": "mxfp4"}
    return fields


def _layer_types(period: int, layers: int) -> list[str]:
    """HF `layer_types` from llama.cpp's swa period n: layer i slides when `i % n < n - 1`
    (its `set_swa_pattern`; 0: every layer)."""
    sliding = [period == 0 or i % period < period - 1 for i in range(layers)]
    return ["sliding_attention" if s else "full_attention" for s in sliding]


def _swiglu_limit(values: list[float] | None, path: Path) -> float:
    limits = {as_float32(v) for v in values or () if v}
    if len(limits) > 1:
        raise ModelFormatError(
            f"{path}: a swiglu limit per layer ({sorted(limits)}) is not supported"
        )
    return limits.pop() if limits else _SWIGLU_LIMIT


@dataclass(frozen=True)
class _Rows:
    """Rows `lo:hi` of every expert of a stacked GGUF tensor (`data` is `(experts, rows, ...)`):
    a whole stack, or the gate or up half of a fused `ffn_gate_up_exps`."""

    tensor: ReaderTensor
    lo: int
    hi: int

    @property
    def shape(self) -> tuple[int, ...]:  # (experts, rows, columns) or (experts, rows) of a bias
        dims = [int(d) for d in reversed(self.tensor.shape.tolist())]
        return (dims[0], self.hi - self.lo, *dims[2:])

    def raw(self, x: int) -> np.ndarray:  # expert x's rows as stored (bytes for MXFP4)
        return np.asarray(self.tensor.data[x, self.lo : self.hi])


Read = Callable[[_Rows, int], np.ndarray]


def layer_entries(
    blk: dict[str, ReaderTensor], i: int, config: dict[str, Any], path: Path
) -> list[Planned]:
    """Layer `i`'s tensors under HF gpt-oss names, with the experts fused back together."""
    pre = f"model.layers.{i}."
    entries: list[Planned] = [
        Entry(pre + hf_name, _need(blk, i, path, gguf_name)) for gguf_name, hf_name in _TENSORS
    ]
    n, inter, hidden = (
        config["num_local_experts"],
        config["intermediate_size"],
        config["hidden_size"],
    )
    gate, up = _gate_up(blk, i, path, "weight")
    gate_b, up_b = _gate_up(blk, i, path, "bias")
    down = _whole(_need(blk, i, path, "ffn_down_exps.weight"))
    down_b = _whole(_need(blk, i, path, "ffn_down_exps.bias"))
    for rows, want in (
        (gate, (n, inter, hidden)),
        (up, (n, inter, hidden)),
        (gate_b, (n, inter)),
        (up_b, (n, inter)),
        (down, (n, hidden, inter)),
        (down_b, (n, hidden)),
    ):
        if rows.shape != want:
            raise ModelFormatError(
                f"{path}: {rows.tensor.name} holds {rows.shape} (experts, rows, columns), "
                f"expected {want} from the metadata"
            )
    mxfp4 = "quantization_config" in config  # every stack MXFP4: bytes repacked, not dequantized
    # (HF name, shape, sources (two: interleaved), read one expert, transposed, safetensors dtype)
    specs: list[tuple[str, tuple[int, ...], tuple[_Rows, ...], Read, bool, str]]
    if mxfp4:
        gate_up_blocks, down_blocks = (n, 2 * inter, hidden // 32, 16), (n, hidden, inter // 32, 16)
        specs = [
            ("gate_up_proj_blocks", gate_up_blocks, (gate, up), _mxfp4_blocks, False, "U8"),
            ("gate_up_proj_scales", gate_up_blocks[:3], (gate, up), _mxfp4_scales, False, "U8"),
            ("down_proj_blocks", down_blocks, (down,), _mxfp4_blocks, False, "U8"),
            ("down_proj_scales", down_blocks[:3], (down,), _mxfp4_scales, False, "U8"),
        ]
    else:  # HF stores (in, out): (experts, hidden, 2 * inter) and (experts, inter, hidden)
        specs = [
            ("gate_up_proj", (n, hidden, 2 * inter), (gate, up), _float, True, "F32"),
            ("down_proj", (n, inter, hidden), (down,), _float, True, "F32"),
        ]
    specs += [
        ("gate_up_proj_bias", (n, 2 * inter), (gate_b, up_b), _float, False, "F32"),
        ("down_proj_bias", (n, hidden), (down_b,), _float, False, "F32"),
    ]
    return entries + [
        Derived(
            f"{pre}mlp.experts.{name}",
            shape,
            tuple(r.tensor for r in rows),
            _expert_chunks(rows, read, transpose),
            dtype,
        )
        for name, shape, rows, read, transpose, dtype in specs
    ]


def _need(blk: dict[str, ReaderTensor], i: int, path: Path, name: str) -> ReaderTensor:
    if name not in blk:
        raise ModelFormatError(f"{path} lacks the tensor 'blk.{i}.{name}'")
    return blk[name]


def _whole(t: ReaderTensor) -> _Rows:
    return _Rows(t, 0, int(t.data.shape[1]))


def _gate_up(blk: dict[str, ReaderTensor], i: int, path: Path, kind: str) -> tuple[_Rows, _Rows]:
    """The gate and up experts (`kind`: weight or bias), from two stacks or one fused."""
    fused = blk.get(f"ffn_gate_up_exps.{kind}")
    if fused is not None:  # gate rows, then up rows
        half = int(fused.data.shape[1]) // 2
        return _Rows(fused, 0, half), _Rows(fused, half, 2 * half)
    gate = _need(blk, i, path, f"ffn_gate_exps.{kind}")
    return _whole(gate), _whole(_need(blk, i, path, f"ffn_up_exps.{kind}"))


def _expert_chunks(
    rows: tuple[_Rows, ...], read: Read, transpose: bool
) -> Callable[[], Iterator[np.ndarray]]:
    """Expert by expert: one source as it is, or two (gate, up) with their rows interleaved
    (g0, u0, g1, u1, ...) as HF fuses them; then transposed to HF's (in, out) if asked."""

    def chunks() -> Iterator[np.ndarray]:
        for x in range(rows[0].shape[0]):
            parts = [read(r, x) for r in rows]  # (rows, ...) each
            out = np.stack(parts, axis=1).reshape(-1, *parts[0].shape[1:])
            yield out.T if transpose else out

    return chunks


def _float(rows: _Rows, x: int) -> np.ndarray:
    return dequantize_rows(rows.tensor, rows.raw(x))


def _mxfp4(rows: _Rows, x: int) -> np.ndarray:  # (rows, groups, 17): scale byte, 16 nibble pairs
    raw = rows.raw(x)
    return raw.reshape(raw.shape[0], -1, 17)


def _mxfp4_scales(rows: _Rows, x: int) -> np.ndarray:
    return _mxfp4(rows, x)[..., 0]  # E8M0, 127 = 2**0, in both layouts


def _mxfp4_blocks(rows: _Rows, x: int) -> np.ndarray:
    """ggml's nibble order (low nibbles: values 0-15, high: 16-31) to HF's (byte k: values 2k
    in the low nibble, 2k + 1 in the high), as llama.cpp's transform_nibble_layout reversed."""
    q = _mxfp4(rows, x)[..., 1:]
    values = np.concatenate((q & 0x0F, q >> 4), axis=-1)  # (rows, groups, 32), in order
    paired: np.ndarray = values[..., 0::2] | (values[..., 1::2] << 4)
    return paired
