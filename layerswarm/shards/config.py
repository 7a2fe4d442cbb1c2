"""Model configuration of a decoder (any supported family), and the half-open layer span a peer
serves. What differs between families is read by their modules in `shards.families`."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from layerswarm.errors import ModelFormatError

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
    """RoPE frequency scaling: Llama 3's (`rope_type: llama3`) or YaRN (`yarn`, gpt-oss)."""

    factor: float = 8.0  # unit: ratio of new to original context length
    low_freq_factor: float = 1.0  # unit: wavelengths above orig/low_freq_factor are scaled fully
    high_freq_factor: float = 4.0  # unit: wavelengths below orig/high_freq_factor are untouched
    original_max_position_embeddings: int = 8192  # unit: tokens
    kind: str = "llama3"  # "llama3" or "yarn"
    beta_fast: float = 32.0  # yarn: rotations where interpolation stops
    beta_slow: float = 1.0  # yarn: rotations where it is complete
    truncate: bool = True  # yarn: round the correction range to whole dimensions
    attention_factor: float | None = None  # yarn: cos/sin scale; None: 0.1 ln(factor) + 1


@dataclass(frozen=True)
class MoEConfig:
    """A mixture-of-experts MLP: a router picks `experts_per_token` of `num_experts` per token."""

    num_experts: int = 8
    experts_per_token: int = 2  # unit: experts each token runs (top-k)
    intermediate_size: int = 128  # unit: hidden features of one expert
    router: str = "softmax_topk"  # "softmax_topk" (Qwen3-MoE, Mixtral) or "topk_softmax" (gpt-oss)
    norm_topk_prob: bool = True  # softmax_topk: the k weights are renormalized to sum to 1
    router_bias: bool = False  # the router's linear carries a bias (gpt-oss)
    expert_bias: bool = False  # the experts' linears carry biases (gpt-oss)
    activation: str = "silu"  # "silu" (SwiGLU) or "gpt_oss" (clamped, alpha-sigmoid GLU)
    swiglu_alpha: float = 1.702  # gpt_oss activation: gate * sigmoid(alpha * gate)
    swiglu_limit: float = 7.0  # gpt_oss activation: gate and up are clamped to this
    dense_layers: tuple[int, ...] = ()  # layers with a plain MLP instead (Qwen3-MoE's mlp_only)


@dataclass(frozen=True)
class ModelConfig:
    """What the model math needs to know about a decoder of one of the supported families."""

    architecture: str = "llama"  # a family's name (see shards.families.FAMILIES)
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
    qk_norm: bool = False  # RMSNorm on q and k per head before RoPE (Qwen3)
    attention_out_bias: bool = False  # the output projection carries a bias (gpt-oss)
    attention_sinks: bool = False  # a learned logit per head joins each softmax (gpt-oss)
    sliding_window: int | None = None  # unit: tokens a sliding layer's query sees, itself included
    layer_types: tuple[str, ...] = ()  # per layer "full_attention" or "sliding_attention"
    moe: MoEConfig | None = None  # the experts; None: every layer has a plain SwiGLU MLP
    weights_format: str = ""  # a family's own storage variant (gpt-oss: "mxfp4" experts)

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ModelFormatError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )

    def sparse(self, layer: int) -> bool:
        """Whether `layer` has experts (else a plain MLP)."""
        return self.moe is not None and layer not in self.moe.dense_layers

    def sliding(self, layer: int) -> bool:
        """Whether `layer` attends over a sliding window (else over the whole context)."""
        if self.sliding_window is None:
            return False
        if not self.layer_types:
            return True
        return self.layer_types[layer] == "sliding_attention"

    def attention_parameters(self) -> int:
        """Weights of one layer's norms and attention."""
        q, kv, h = (
            self.num_heads * self.head_dim,
            self.num_kv_heads * self.head_dim,
            self.hidden_size,
        )
        bias = (q + 2 * kv) if self.attention_bias else 0
        bias += h if self.attention_out_bias else 0
        extra = (2 * self.head_dim if self.qk_norm else 0) + (
            self.num_heads if self.attention_sinks else 0
        )
        return 2 * h + h * (q + 2 * kv) + bias + q * h + extra

    def layer_parameters(self, layer: int | None = None) -> int:
        """Weights in one decoder layer, every expert counted: what memory must hold.

        Args:
            layer: which layer; None: the largest (a budget that holds n of these holds any n).
        """
        if layer is None:
            return max(self.layer_parameters(i) for i in range(self.num_layers))
        return self.attention_parameters() + self._mlp_parameters(layer, active=False)

    def active_parameters(self, layer: int | None = None) -> int:
        """Weights one token's pass through a layer reads: attention, the router and the
        `experts_per_token` chosen experts (all of a dense layer). Compute per token is about
        twice this in FLOPs.

        Args:
            layer: which layer; None: the largest.
        """
        if layer is None:
            return max(self.active_parameters(i) for i in range(self.num_layers))
        return self.attention_parameters() + self._mlp_parameters(layer, active=True)

    def _mlp_parameters(self, layer: int, active: bool) -> int:
        h = self.hidden_size
        if self.moe is None or not self.sparse(layer):
            return 3 * h * self.intermediate_size
        m = self.moe
        one = 3 * h * m.intermediate_size + (2 * m.intermediate_size + h if m.expert_bias else 0)
        router = m.num_experts * (h + (1 if m.router_bias else 0))
        return router + one * (m.experts_per_token if active else m.num_experts)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Read a Hugging Face `config.json` dictionary.

        Raises:
            ModelFormatError: the architecture is none of the supported families (the message
                lists them), or a field is missing.
        """
        from layerswarm.shards.families import family_for

        family = family_for(d)
        # transformers 5 writes `rope_parameters`; older configs `rope_theta` + `rope_scaling`.
        rope = d.get("rope_parameters") or {}
        try:
            hidden = int(d["hidden_size"])
            heads = int(d["num_attention_heads"])
            fields: dict[str, Any] = dict(
                architecture=family.name,
                vocab_size=int(d["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(d.get("intermediate_size") or 0),
                num_layers=int(d["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(d.get("num_key_value_heads") or heads),
                head_dim=int(d.get("head_dim") or hidden // heads),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 10000.0))),
                rope_scaling=_rope_scaling(d.get("rope_scaling") or rope),
                max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                attention_bias=bool(d.get("attention_bias", False)),
                bos_token_id=d.get("bos_token_id"),
                eos_token_ids=_as_tuple(d.get("eos_token_id")),
                torch_dtype=str(d.get("torch_dtype") or d.get("dtype") or "float32"),
            )
            fields.update(family.config_fields(d))
        except KeyError as e:
            raise ModelFormatError(f"config.json lacks the field {e.args[0]!r}") from None
        return cls(**fields)

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
    if kind == "yarn":
        attention_factor = d.get("attention_factor")
        return RopeScaling(
            factor=float(d["factor"]),
            original_max_position_embeddings=int(d["original_max_position_embeddings"]),
            kind="yarn",
            beta_fast=float(d.get("beta_fast") or 32.0),
            beta_slow=float(d.get("beta_slow") or 1.0),
            truncate=bool(d.get("truncate", True)),
            attention_factor=None if attention_factor is None else float(attention_factor),
        )
    if kind != "llama3":
        raise ModelFormatError(f"unsupported rope_scaling type {kind!r} (supported: llama3, yarn)")
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
