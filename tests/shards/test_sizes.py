"""MoE accounting: memory counts every expert, compute the active ones; placement tables on the
published configs of Qwen3-30B-A3B, Mixtral-8x7B and gpt-oss-20b (no weights needed)."""

from __future__ import annotations

from typing import Any

import pytest

from layerswarm.peer.placement import layers_that_fit
from layerswarm.shards.config import ModelConfig, Span
from layerswarm.shards.sizes import layer_weight_bytes, span_flops_per_token, span_weight_bytes

GIB = 2**30
# The fields of each model's config.json that sizes depend on.
CONFIGS: dict[str, dict[str, Any]] = {
    "Qwen3-30B-A3B": {
        "architectures": ["Qwen3MoeForCausalLM"],
        "vocab_size": 151936,
        "hidden_size": 2048,
        "intermediate_size": 6144,
        "num_hidden_layers": 48,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "head_dim": 128,
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "moe_intermediate_size": 768,
        "norm_topk_prob": True,
    },
    "Mixtral-8x7B": {
        "architectures": ["MixtralForCausalLM"],
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
    },
    "gpt-oss-20b": {
        "architectures": ["GptOssForCausalLM"],
        "vocab_size": 201088,
        "hidden_size": 2880,
        "intermediate_size": 2880,
        "num_hidden_layers": 24,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "num_local_experts": 32,
        "num_experts_per_tok": 4,
        "sliding_window": 128,
        "attention_bias": True,
    },
}
# name: (published total parameters, published active parameters per token, whether that
# active figure counts the embedding lookup: OpenAI's model card counts only the unembedding)
PUBLISHED = {
    "Qwen3-30B-A3B": (30.5e9, 3.3e9, True),
    "Mixtral-8x7B": (46.7e9, 12.9e9, True),
    "gpt-oss-20b": (20.91e9, 3.61e9, False),
}


def whole_model(config: ModelConfig, embedding_active: bool) -> tuple[int, int]:
    """(total, active per token) parameters, embedding and head included."""
    table = config.vocab_size * config.hidden_size
    layers = range(config.num_layers)
    total = sum(config.layer_parameters(i) for i in layers) + 2 * table
    active = sum(config.active_parameters(i) for i in layers) + table * (
        2 if embedding_active else 1
    )
    return total, active


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_expert_counts_in_memory_and_only_the_active_ones_in_compute(name: str) -> None:
    config = ModelConfig.from_dict(CONFIGS[name])
    published_total, published_active, embedding_active = PUBLISHED[name]
    total, active = whole_model(config, embedding_active)
    assert abs(total / published_total - 1) < 0.02
    assert abs(active / published_active - 1) < 0.02
    span = Span(0, config.num_layers)
    table = config.vocab_size * config.hidden_size
    assert span_weight_bytes(config, span, 2.0) == 2 * (total - 2 * table)
    assert span_flops_per_token(config, span) == 2 * (active - table * (1 + embedding_active))


# name, budget, bytes per weight -> layers that fit (1 GiB kept for the KV cache)
PLACEMENT = {
    ("Qwen3-30B-A3B", 24, 1.02): 38,  # int8: 0.59 GiB a layer, every expert counted
    ("Qwen3-30B-A3B", 24, 2.0): 19,  # bf16: 1.16 GiB a layer
    ("Qwen3-30B-A3B", 64, 2.0): 48,  # all of it
    ("Mixtral-8x7B", 24, 0.6): 28,  # int4: 0.81 GiB a layer
    ("Mixtral-8x7B", 24, 2.0): 8,  # bf16: 2.70 GiB a layer (active only: 31 would "fit")
    ("gpt-oss-20b", 16, 2.0): 9,  # bf16: 1.53 GiB a layer
    ("gpt-oss-20b", 8, 0.6): 15,  # int4: 0.46 GiB a layer
}


@pytest.mark.parametrize("case", sorted(PLACEMENT))
def test_placement_fits_layers_by_all_their_experts(case: tuple[str, int, float]) -> None:
    name, budget_gib, bytes_per_weight = case
    config = ModelConfig.from_dict(CONFIGS[name])
    per_layer = layer_weight_bytes(config, bytes_per_weight)
    n = layers_that_fit(budget_gib * GIB, per_layer, GIB, config.num_layers)
    assert n == PLACEMENT[case]
    # Counting only the active experts would claim (nearly) the whole model fits.
    active = int(config.active_parameters() * bytes_per_weight)
    assert layers_that_fit(budget_gib * GIB, active, GIB, config.num_layers) > n or n == 48
