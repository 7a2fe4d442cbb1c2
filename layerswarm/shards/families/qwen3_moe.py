"""Qwen3-MoE: Qwen3 attention, and experts where `decoder_sparse_step` and `mlp_only_layers` say.

Routing: a softmax over all experts, the top k, renormalized when `norm_topk_prob`.
Checkpoint names: `mlp.gate.weight` (the router), `mlp.experts.{e}.{gate,up,down}_proj.weight`.
"""

from __future__ import annotations

from typing import Any

import torch

from layerswarm.shards.config import ModelConfig, MoEConfig
from layerswarm.shards.families import Family, Get
from layerswarm.shards.families.common import (
    attention_state,
    attention_tensors,
    dense_mlp_state,
    dense_mlp_tensors,
    expert_state,
    expert_tensors,
    prefix,
)
from layerswarm.shards.families.qwen3 import qwen3_attention_fields


def config_fields(d: dict[str, Any]) -> dict[str, Any]:
    n = int(d["num_hidden_layers"])
    experts = int(d.get("num_experts", d.get("num_local_experts", 0)))
    step = int(d.get("decoder_sparse_step", 1) or 1)
    only_mlp = set(d.get("mlp_only_layers") or [])
    dense = tuple(
        i for i in range(n) if i in only_mlp or experts == 0 or (i + 1) % step != 0
    )  # as transformers' Qwen3MoeDecoderLayer decides
    moe = MoEConfig(
        num_experts=experts,
        experts_per_token=int(d["num_experts_per_tok"]),
        intermediate_size=int(d["moe_intermediate_size"]),
        norm_topk_prob=bool(d.get("norm_topk_prob", False)),  # transformers' default
        dense_layers=dense,
    )
    return qwen3_attention_fields(d) | {"moe": moe}


def _experts(config: ModelConfig) -> int:
    assert config.moe is not None  # config_fields always sets it
    return config.moe.num_experts


def layer_tensors(config: ModelConfig, i: int) -> list[str]:
    names = attention_tensors(config, i)
    if not config.sparse(i):
        return names + dense_mlp_tensors(i)
    m = prefix(i) + "mlp."
    return [
        *names,
        m + "gate.weight",
        *expert_tensors(m + "experts", _experts(config), "gate_proj", "up_proj", "down_proj"),
    ]


def layer_state(get: Get, config: ModelConfig, i: int) -> dict[str, torch.Tensor]:
    state = attention_state(get, config, i)
    if not config.sparse(i):
        return state | dense_mlp_state(get, i)
    m = prefix(i) + "mlp."
    return state | expert_state(
        get, m + "gate.weight", m + "experts", _experts(config), "gate_proj", "up_proj", "down_proj"
    )


FAMILY = Family(
    "qwen3_moe",
    ("Qwen3MoeForCausalLM",),
    config_fields,
    layer_tensors,
    layer_state,
    "Qwen3-MoE (e.g. Qwen3-30B-A3B, 235B-A22B)",
)
