"""Load a peer's span onto its device: weights, quantization, kernels, CUDA graphs, speed."""

from __future__ import annotations

import logging

import torch

from layerswarm.peer.config import PeerConfig
from layerswarm.peer.measure import SpeedSample, device_name, measure_speed
from layerswarm.shards.blocks import SpanModel
from layerswarm.shards.config import DTYPES, ModelConfig, Span
from layerswarm.shards.cuda_graphs import enable_cuda_graphs
from layerswarm.shards.kv_cache import PagedKVCache
from layerswarm.shards.quantize import (
    QuantLinear,
    memory_bytes,
    open_chooser,
    pack_linears,
    quantize,
)
from layerswarm.shards.weights import Progress, load_span

log = logging.getLogger(__name__)


def cache_tokens_for(config: PeerConfig, model_config: ModelConfig, span: Span) -> int:
    """How many tokens of KV cache the peer's memory budget holds for its span."""
    per_token = PagedKVCache.bytes_per_token(
        len(span), model_config.num_kv_heads, model_config.head_dim, DTYPES[config.dtype]
    )
    return max(1, config.cache_memory_bytes // per_token)


def kernel_backend(config: PeerConfig) -> str | None:
    """The kernels `SpanModel` is told to use: None picks by device."""
    return None if config.kernels == "auto" else config.kernels


# Bytes one weight takes, by quantization and compute dtype (int4: two a byte, plus scales).
BYTES_PER_WEIGHT = {
    "none": {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0},
    "int8": {"float32": 1.02, "bfloat16": 1.02, "float16": 1.02},
    "int4": {"float32": 0.6, "bfloat16": 0.6, "float16": 0.6},
}


def load_peer_model(
    config: PeerConfig, model_config: ModelConfig, span: Span, progress: Progress | None
) -> tuple[SpanModel, SpeedSample]:
    """Load the span onto the peer's device, quantize it if asked, and measure how fast it runs.

    On a GPU each layer moves there and is quantized there, one at a time: the VRAM it takes
    at most is the quantized span plus one layer at full precision.
    """
    span.check_within(model_config.num_layers)
    dtype = DTYPES[config.dtype]
    device = torch.device(config.device)
    if device.type == "cuda":  # this (the compute) thread's device, where Triton launches
        torch.cuda.set_device(device)
    model = load_span(config.model_dir, span, dtype, model_config, None, progress)
    model.kernel_backend = kernel_backend(config)
    if device.type != "cpu":
        for layer in model.layers:
            layer.to(device)
            if config.quant != "none":
                quantize(layer, config.quant, config.quant_group_size)  # type: ignore[arg-type]
        model.to_device(device)
    else:
        model.to_device(device)  # the CPU: kernels as asked (Triton only in the interpreter)
        if config.quant != "none":
            quantize(model, config.quant, config.quant_group_size)  # type: ignore[arg-type]
        # The linears quantization left: the fast CPU layouts, measured here (or read from the
        # plans this machine kept) unless the config fixes them.
        tuner = open_chooser(config.cpu_plans, config.cpu_plans_dir)
        pack_linears(model, tuner)
        if tuner is not None:
            log.info("CPU linear plans: %s", tuner.summary())
    if config.kernels != "auto":
        for module in model.modules():
            if isinstance(module, QuantLinear):
                module.use_backend(config.kernels)
    if config.cuda_graphs:
        enable_cuda_graphs(model)
    interpreted = device.type == "cpu" and model.triton
    # Triton's interpreter (`--kernels triton` on a CPU) runs ~1000x slower than the twins, and
    # its speed means nothing: a few tokens say enough for the records.
    speed = measure_speed(model, prompt=8, steps=1) if interpreted else measure_speed(model)
    log.info(
        "loaded layers %s of %s on %s (%s, %s weights: %.1f MiB, kernels: %s%s); one decode "
        "step takes %.2f ms a layer (threads: %s)",
        span,
        config.model_name,
        device_name(device),
        config.dtype,
        config.quant,
        memory_bytes(model) / 2**20,
        model.ops.__name__.rsplit(".", 1)[-1],
        ", CUDA graphs" if model.step_runner is not None else "",
        speed.decode_s_per_layer * 1e3,
        speed.decode_threads or "all",
    )
    return model, speed
