"""gpt-oss: attention sinks, sliding-window and full attention in alternation, biases on every
projection, YaRN RoPE, and experts with a clamped `(up + 1) * g * sigmoid(1.702 g)` activation.

Routing: the top k router logits (the router has a bias), then a softmax over those k.
Experts are stored fused per layer: `mlp.experts.gate_up_proj (experts, hidden, 2 * inter)`
with gate and up interleaved column by column, `down_proj (experts, inter, hidden)`, and their
biases; OpenAI's release stores them as MXFP4 (`*_blocks` and `*_scales`), dequantized here.
"""

from __future__ import annotations

from typing import Any

import torch

from layerswarm.errors import ModelFormatError
from layerswarm.shards.config import ModelConfig, MoEConfig
from layerswarm.shards.families import Family, Get
from layerswarm.shards.families.common import attention_state, attention_tensors, prefix

# The 16 values of an FP4 (e2m1) nibble, as in OCP's microscaling spec and transformers' mxfp4.
FP4_VALUES = (
    0.0,
    0.5,
    1.0,
    1.5,
    2.0,
    3.0,
    4.0,
    6.0,
    -0.0,
    -0.5,
    -1.0,
    -1.5,
    -2.0,
    -3.0,
    -4.0,
    -6.0,
)


def config_fields(d: dict[str, Any]) -> dict[str, Any]:
    n = int(d["num_hidden_layers"])
    types = tuple(d.get("layer_types") or ())
    if types and len(types) != n:
        raise ModelFormatError(f"layer_types names {len(types)} of {n} layers")
    quant = (d.get("quantization_config") or {}).get("quant_method")
    if quant not in (None, "mxfp4"):
        raise ModelFormatError(f"gpt-oss weights quantized as {quant!r}: only mxfp4 or none")
    moe = MoEConfig(
        num_experts=int(d["num_local_experts"]),
        experts_per_token=int(d.get("num_experts_per_tok") or d.get("experts_per_token") or 4),
        intermediate_size=int(d["intermediate_size"]),
        router="topk_softmax",
        router_bias=True,
        expert_bias=True,
        activation="gpt_oss",
        swiglu_alpha=float(d.get("swiglu_alpha", 1.702)),
        swiglu_limit=float(d.get("swiglu_limit", 7.0)),
    )
    bias = bool(d.get("attention_bias", True))
    return {
        "attention_bias": bias,
        "attention_out_bias": bias,
        "attention_sinks": True,
        "sliding_window": int(d.get("sliding_window") or 128),
        "layer_types": types
        or tuple("sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)),
        "moe": moe,
        "weights_format": "mxfp4" if quant == "mxfp4" else "",
    }


def _expert_names(config: ModelConfig, i: int) -> tuple[str, ...]:
    e = prefix(i) + "mlp.experts."
    mats: tuple[str, ...]
    if config.weights_format == "mxfp4":
        mats = (
            "gate_up_proj_blocks",
            "gate_up_proj_scales",
            "down_proj_blocks",
            "down_proj_scales",
        )
    else:
        mats = ("gate_up_proj", "down_proj")
    return tuple(e + m for m in (*mats, "gate_up_proj_bias", "down_proj_bias"))


def layer_tensors(config: ModelConfig, i: int) -> list[str]:
    r = prefix(i) + "mlp.router."
    return [*attention_tensors(config, i), r + "weight", r + "bias", *_expert_names(config, i)]


def layer_state(get: Get, config: ModelConfig, i: int) -> dict[str, torch.Tensor]:
    assert config.moe is not None  # config_fields always sets it
    r = prefix(i) + "mlp.router."
    e = prefix(i) + "mlp.experts."
    state = attention_state(get, config, i)
    state["moe.router_weight"] = get(r + "weight")
    state["moe.router_bias"] = get(r + "bias")
    dtype = state["moe.router_weight"].dtype
    if config.weights_format == "mxfp4":
        # (experts, out, in) as nn.Linear holds them
        gate_up = dequantize_mxfp4(get(e + "gate_up_proj_blocks"), get(e + "gate_up_proj_scales"))
        down = dequantize_mxfp4(get(e + "down_proj_blocks"), get(e + "down_proj_scales"))
        gate_up, down = gate_up.to(dtype), down.to(dtype)
    else:
        gate_up = get(e + "gate_up_proj").transpose(1, 2)  # (experts, 2 * inter, hidden)
        down = get(e + "down_proj").transpose(1, 2)  # (experts, hidden, inter)
    gate_up_bias = get(e + "gate_up_proj_bias")  # (experts, 2 * inter), interleaved
    down_bias = get(e + "down_proj_bias")
    for x in range(config.moe.num_experts):
        # Interleaved rows (gate, up, gate, up, ...) -> gate rows, then up rows.
        state[f"moe.experts.{x}.gate_up.weight"] = torch.cat((gate_up[x, 0::2], gate_up[x, 1::2]))
        state[f"moe.experts.{x}.gate_up.bias"] = torch.cat(
            (gate_up_bias[x, 0::2], gate_up_bias[x, 1::2])
        )
        state[f"moe.experts.{x}.down.weight"] = down[x].contiguous()
        state[f"moe.experts.{x}.down.bias"] = down_bias[x]
    return state


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """MXFP4 to float32: `blocks (..., rows, groups, 16)` uint8, two FP4 values a byte (low
    nibble first), and `scales (..., rows, groups)` uint8 powers of two biased by 127.

    Returns:
        `(..., rows, groups * 32)` float32.
    """
    blocks = blocks.to(torch.uint8)
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    *lead, groups, width = blocks.shape
    out = torch.empty(*lead, groups, width * 2, dtype=torch.float32)
    out[..., 0::2] = lut[(blocks & 0x0F).long()]
    out[..., 1::2] = lut[(blocks >> 4).long()]
    out = torch.ldexp(out, (scales.to(torch.int32) - 127)[..., None].float())
    return out.reshape(*lead, groups * width * 2)


FAMILY = Family(
    "gpt_oss",
    ("GptOssForCausalLM",),
    config_fields,
    layer_tensors,
    layer_state,
    "gpt-oss (sinks, sliding window, MXFP4 experts)",
)
