"""Qwen3 dense: the Llama block with an RMSNorm on q and on k per head, and an explicit head_dim."""

from __future__ import annotations

from typing import Any

import torch

from layerswarm.errors import ModelFormatError
from layerswarm.shards.config import ModelConfig
from layerswarm.shards.families import Family, Get
from layerswarm.shards.families.common import (
    attention_state,
    attention_tensors,
    dense_mlp_state,
    dense_mlp_tensors,
)


def qwen3_attention_fields(d: dict[str, Any]) -> dict[str, Any]:
    """Fields Qwen3 and Qwen3-MoE share: q/k norms, and a sliding window only where enabled."""
    fields: dict[str, Any] = {"qk_norm": True, "attention_bias": bool(d.get("attention_bias"))}
    if d.get("use_sliding_window") and d.get("sliding_window"):
        # Qwen3 releases ship with use_sliding_window false; honour it if a config says true.
        n = int(d["num_hidden_layers"])
        first_full = int(d.get("max_window_layers", n))
        fields["sliding_window"] = int(d["sliding_window"])
        types = d.get("layer_types") or [
            "sliding_attention" if i >= first_full else "full_attention" for i in range(n)
        ]
        if len(types) != n:
            raise ModelFormatError(f"layer_types names {len(types)} of {n} layers")
        fields["layer_types"] = tuple(types)
    return fields


def layer_tensors(config: ModelConfig, i: int) -> list[str]:
    return attention_tensors(config, i) + dense_mlp_tensors(i)


def layer_state(get: Get, config: ModelConfig, i: int) -> dict[str, torch.Tensor]:
    return attention_state(get, config, i) | dense_mlp_state(get, i)


FAMILY = Family(
    "qwen3",
    ("Qwen3ForCausalLM",),
    qwen3_attention_fields,
    layer_tensors,
    layer_state,
    "Qwen3 (q/k norms)",
)
