"""What a span costs, from the model side: bytes in memory and FLOPs per token.

For a mixture-of-experts model the two differ by an order of magnitude: memory holds every
expert of a layer (a layer-range split keeps them all with their layer), while a token runs only
the router's top k. Qwen3-30B-A3B: 623 M weights a layer, 57 M of them read per token.
"""

from __future__ import annotations

from layerswarm.shards.config import ModelConfig, Span


def layer_weight_bytes(
    config: ModelConfig, bytes_per_weight: float, layer: int | None = None
) -> int:
    """Bytes of one layer's weights, every expert counted (None: the largest layer)."""
    return int(config.layer_parameters(layer) * bytes_per_weight)


def span_weight_bytes(config: ModelConfig, span: Span, bytes_per_weight: float) -> int:
    """Bytes of a span's weights, every expert counted."""
    return sum(layer_weight_bytes(config, bytes_per_weight, i) for i in range(span.start, span.end))


def span_flops_per_token(config: ModelConfig, span: Span) -> int:
    """Matmul FLOPs one decode token costs in a span: two per weight it reads (attention, the
    router and the chosen experts; attention over the context is left out, small at short
    contexts)."""
    return sum(2 * config.active_parameters(i) for i in range(span.start, span.end))
