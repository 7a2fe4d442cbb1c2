"""Tensor names and parameter building that several families share: attention, a dense MLP,
experts stored one by one."""

from __future__ import annotations

import torch

from layerswarm.shards.config import ModelConfig
from layerswarm.shards.families import Get


def prefix(i: int) -> str:
    return f"model.layers.{i}."


def attention_tensors(config: ModelConfig, i: int) -> list[str]:
    """Norms and attention of layer `i`, in Hugging Face Llama names (plus the variants)."""
    a = prefix(i) + "self_attn."
    names = [prefix(i) + "input_layernorm.weight", prefix(i) + "post_attention_layernorm.weight"]
    names += [f"{a}{p}_proj.weight" for p in "qkvo"]
    if config.attention_bias:
        names += [f"{a}{p}_proj.bias" for p in "qkv"]
    if config.attention_out_bias:
        names.append(a + "o_proj.bias")
    if config.qk_norm:
        names += [a + "q_norm.weight", a + "k_norm.weight"]
    if config.attention_sinks:
        names.append(a + "sinks")
    return names


def attention_state(get: Get, config: ModelConfig, i: int) -> dict[str, torch.Tensor]:
    """`DecoderLayer` parameters of the norms and attention of layer `i`."""
    a = prefix(i) + "self_attn."
    state = {
        "input_norm": get(prefix(i) + "input_layernorm.weight"),
        "post_norm": get(prefix(i) + "post_attention_layernorm.weight"),
        "qkv.weight": torch.cat([get(f"{a}{p}_proj.weight") for p in "qkv"]),
        "o_proj.weight": get(a + "o_proj.weight"),
    }
    if config.attention_bias:
        state["qkv.bias"] = torch.cat([get(f"{a}{p}_proj.bias") for p in "qkv"])
    if config.attention_out_bias:
        state["o_proj.bias"] = get(a + "o_proj.bias")
    if config.qk_norm:
        state["q_norm"] = get(a + "q_norm.weight")
        state["k_norm"] = get(a + "k_norm.weight")
    if config.attention_sinks:
        state["sinks"] = get(a + "sinks")
    return state


def dense_mlp_tensors(i: int) -> list[str]:
    return [f"{prefix(i)}mlp.{p}_proj.weight" for p in ("gate", "up", "down")]


def dense_mlp_state(get: Get, i: int) -> dict[str, torch.Tensor]:
    m = prefix(i) + "mlp."
    return {
        "gate_up.weight": torch.cat([get(m + "gate_proj.weight"), get(m + "up_proj.weight")]),
        "down_proj.weight": get(m + "down_proj.weight"),
    }


def expert_tensors(experts: str, n: int, gate: str, up: str, down: str) -> list[str]:
    """`{experts}.{e}.{gate|up|down}.weight` for every expert (Qwen3-MoE, Mixtral)."""
    return [f"{experts}.{e}.{p}.weight" for e in range(n) for p in (gate, up, down)]


def expert_state(
    get: Get, router: str, experts: str, n: int, gate: str, up: str, down: str
) -> dict[str, torch.Tensor]:
    """`MoEBlock` parameters (under `moe.`) from experts stored one by one."""
    state = {"moe.router_weight": get(router)}
    for e in range(n):
        pre = f"{experts}.{e}."
        state[f"moe.experts.{e}.gate_up.weight"] = torch.cat(
            [get(pre + gate + ".weight"), get(pre + up + ".weight")]
        )
        state[f"moe.experts.{e}.down.weight"] = get(pre + down + ".weight")
    return state
