"""Llama, Mistral and Qwen2 (q/k/v biases): RMSNorm, RoPE, GQA attention, SwiGLU MLP."""

from __future__ import annotations

from typing import Any

import torch

from layerswarm.shards.config import ModelConfig
from layerswarm.shards.families import Family, Get
from layerswarm.shards.families.common import (
    attention_state,
    attention_tensors,
    dense_mlp_state,
    dense_mlp_tensors,
)


def layer_tensors(config: ModelConfig, i: int) -> list[str]:
    return attention_tensors(config, i) + dense_mlp_tensors(i)


def layer_state(get: Get, config: ModelConfig, i: int) -> dict[str, torch.Tensor]:
    return attention_state(get, config, i) | dense_mlp_state(get, i)


def _qwen2_fields(d: dict[str, Any]) -> dict[str, Any]:
    return {"attention_bias": bool(d.get("attention_bias", True))}


FAMILIES = [
    Family("llama", ("LlamaForCausalLM",), lambda d: {}, layer_tensors, layer_state, "Llama 2/3"),
    Family("mistral", ("MistralForCausalLM",), lambda d: {}, layer_tensors, layer_state, "Mistral"),
    Family(
        "qwen2", ("Qwen2ForCausalLM",), _qwen2_fields, layer_tensors, layer_state, "Qwen2 (biases)"
    ),
]
