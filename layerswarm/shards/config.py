"""Model configuration for Llama-family decoders, and the half-open layer span a peer serves."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from layerswarm.errors import ModelFormatError

# Architectures whose math is the Llama block (RMSNorm, RoPE, GQA attention, SwiGLU MLP).
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def parse_dtype(name: str) -> torch.dtype:
    """`float32`, `bfloat16` or `float16` (or fp32, bf16, fp16) as a torch dtype."""
    try:
        return DTYPES[DTYPE_ALIASES.get(name, name)]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose float32, bfloat16 or float16") from None


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3 style RoPE frequency scaling (`rope_type: llama3`)."""

    factor: float = 8.0  # unit: ratio of new to original context length
    low_freq_factor: float = 1.0  # unit: wavelengths above orig/low_freq_factor are scaled fully
    high_freq_factor: float = 4.0  # unit: wavelengths below orig/high_freq_factor are untouched
    original_max_position_embeddings: int = 8192  # unit: tokens


@dataclass(frozen=True)
class ModelConfig:
    """What the model math needs to know about a Llama-family decoder."""

    architecture: str = "llama"  # one of SUPPORTED_ARCHITECTURES' values
    vocab_size: int = 256  # unit: tokens
    hidden_size: int = 64  # unit: features per token
    intermediate_size: int = 128  # unit: MLP hidden features
    num_layers: int = 2  # unit: transformer blocks
    num_heads: int = 4  # unit: query heads
    num_kv_heads: int = 2  # unit: key/value heads (GQA when fewer than num_heads)
    head_dim: int = 16  # unit: features per head
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 2048  # unit: tokens of context
    tie_word_embeddings: bool = False  # the head reuses the embedding matrix
    attention_bias: bool = False  # q/k/v projections carry biases (Qwen2)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    torch_dtype: str = "float32"  # dtype the weights were saved in

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ModelFormatError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )

    def layer_parameters(self) -> int:
        """Weights in one decoder layer (norms, attention projections, MLP)."""
        q, kv, h = (
            self.num_heads * self.head_dim,
            self.num_kv_heads * self.head_dim,
            self.hidden_size,
        )
        bias = (q + 2 * kv) if self.attention_bias else 0
        return 2 * h + h * (q + 2 * kv) + bias + q * h + 3 * h * self.intermediate_size

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Read a Hugging Face `config.json` dictionary.

        Raises:
            ModelFormatError: the architecture is not a Llama-family decoder, or a field is missing.
        """
        archs = d.get("architectures") or []
        model_type = d.get("model_type")
        arch = next(
            (SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES), None
        )
        if arch is None and model_type in SUPPORTED_ARCHITECTURES.values():
            arch = model_type
        if arch is None:
            raise ModelFormatError(
                f"unsupported architecture {archs or model_type!r}: layerswarm runs Llama-family "
                f"decoders ({', '.join(sorted(SUPPORTED_ARCHITECTURES))})"
            )
        # transformers 5 writes `rope_parameters`; older configs `rope_theta` + `rope_scaling`.
        rope = d.get("rope_parameters") or {}
        try:
            hidden = int(d["hidden_size"])
            heads = int(d["num_attention_heads"])
            cfg = cls(
                architecture=arch,
                vocab_size=int(d["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(d["intermediate_size"]),
                num_layers=int(d["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(d.get("num_key_value_heads") or heads),
                head_dim=int(d.get("head_dim") or hidden // heads),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 10000.0))),
                rope_scaling=_rope_scaling(d.get("rope_scaling") or rope),
                max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                attention_bias=bool(d.get("attention_bias", arch == "qwen2")),
                bos_token_id=d.get("bos_token_id"),
                eos_token_ids=_as_tuple(d.get("eos_token_id")),
                torch_dtype=str(d.get("torch_dtype") or "float32"),
            )
        except KeyError as e:
            raise ModelFormatError(f"config.json lacks the field {e.args[0]!r}") from None
        return cfg

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        """Read `config.json` (a file, or the model folder holding it)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ModelFormatError(f"no config.json at {path}")
        return cls.from_dict(json.loads(path.read_text()))


def _rope_scaling(d: dict[str, Any] | None) -> RopeScaling | None:
    if not d:
        return None
    kind = d.get("rope_type", d.get("type"))
    if kind in (None, "default"):
        return None
    if kind != "llama3":
        raise ModelFormatError(f"unsupported rope_scaling type {kind!r} (supported: llama3)")
    return RopeScaling(
        factor=float(d["factor"]),
        low_freq_factor=float(d["low_freq_factor"]),
        high_freq_factor=float(d["high_freq_factor"]),
        original_max_position_embeddings=int(d["original_max_position_embeddings"]),
    )


def _as_tuple(v: int | list[int] | None) -> tuple[int, ...]:
    if v is None:
        return ()
    return tuple(v) if isinstance(v, list) else (int(v),)


@dataclass(frozen=True, order=True)
class Span:
    """A half-open range of transformer layers `[start, end)`."""

    start: int
    end: int

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.end:
            raise ValueError(f"a span needs 0 <= start < end, got [{self.start}, {self.end})")

    def __len__(self) -> int:
        return self.end - self.start

    def __contains__(self, layer: object) -> bool:
        return isinstance(layer, int) and self.start <= layer < self.end

    def __str__(self) -> str:
        return f"{self.start}:{self.end}"

    @classmethod
    def parse(cls, text: str) -> Span:
        """Parse `A:B` (layers A up to, not including, B)."""
        try:
            a, b = text.split(":")
            return cls(int(a), int(b))
        except ValueError:
            raise ValueError(f"a span is written START:END, e.g. 0:15; got {text!r}") from None

    def check_within(self, num_layers: int) -> None:
        if self.end > num_layers:
            raise ValueError(f"span {self} goes past the model's {num_layers} layers")
