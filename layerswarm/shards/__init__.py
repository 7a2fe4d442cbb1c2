"""Single-device model math for a span of layers: config, weights, blocks, KV cache."""
