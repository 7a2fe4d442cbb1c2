"""Mixtral: Mistral attention, and every layer's MLP is experts (softmax, top k, renormalized).

Checkpoint names: `block_sparse_moe.gate.weight` (the router) and
`block_sparse_moe.experts.{e}.w1|w3|w2.weight` (gate, up, down).
"""

from __future__ import annotations

from typing import Any

import torch

from layerswarm.shards.config import ModelConfig, MoEConfig
from layerswarm.shards.families import Family, Get
from layerswarm.shards.families.common import (
    attention_state,
    attention_tensors,
    expert_state,
    expert_tensors,
    prefix,
)


def config_fields(d: dict[str, Any]) -> dict[str, Any]:
    moe = MoEConfig(
        num_experts=int(d["num_local_experts"]),
        experts_per_token=int(d["num_experts_per_tok"]),
        intermediate_size=int(d["intermediate_size"]),
        norm_topk_prob=True,
    )
    window = d.get("sliding_window")
    return {"moe": moe, "sliding_window": int(window) if window else None}


def _n(config: ModelConfig) -> int:
    assert config.moe is not None  # config_fields always sets it
    return config.moe.num_experts


def layer_tensors(config: ModelConfig, i: int) -> list[str]:
    m = prefix(i) + "block_sparse_moe."
    return [
        *attention_tensors(config, i),
        m + "gate.weight",
        *expert_tensors(m + "experts", _n(config), "w1", "w3", "w2"),
    ]


def layer_state(get: Get, config: ModelConfig, i: int) -> dict[str, torch.Tensor]:
    m = prefix(i) + "block_sparse_moe."
    return attention_state(get, config, i) | expert_state(
        get, m + "gate.weight", m + "experts", _n(config), "w1", "w3", "w2"
    )


FAMILY = Family(
    "mixtral", ("MixtralForCausalLM",), config_fields, layer_tensors, layer_state, "Mixtral"
)
