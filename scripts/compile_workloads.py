"""Model steps that launch what scripts/gpu_check.sh's GPU steps launch, for the compile check.

Run inside `triton_variants.compiling_instead`: each Triton launch compiles instead of running,
so the steps run on CPU tensors of the real shapes (one layer: every layer has the same shapes)
and their outputs mean nothing.
"""

from __future__ import annotations

import torch

from layerswarm.shards.blocks import SpanModel, StepBatch
from layerswarm.shards.config import ModelConfig, Span
from layerswarm.shards.quantize import QuantLinear, quantize

PROMPT = 64  # bench_gpu_decode.py's prompt; measure_speed's prefill is 64 tokens too


def _config(fields: dict[str, object]) -> ModelConfig:
    return ModelConfig(
        hidden_size=fields["hidden_size"],  # type: ignore[arg-type]
        intermediate_size=fields["intermediate_size"],  # type: ignore[arg-type]
        num_layers=1,
        num_heads=fields["num_attention_heads"],  # type: ignore[arg-type]
        num_kv_heads=fields["num_key_value_heads"],  # type: ignore[arg-type]
        head_dim=fields["hidden_size"] // fields["num_attention_heads"],  # type: ignore[operator]
        max_position_embeddings=4096,
    )


def steps(model: SpanModel) -> None:
    """A prefill, decode steps of 1 and 8 sessions, and a mixed step, as the GPU steps run."""
    c = model.config
    dtype = next(model.parameters()).dtype
    cache = model.new_cache(16 * 512)
    sessions = [cache.open_session(512) for _ in range(8)]

    def run(starts: list[int], counts: list[int], seqs: list[int]) -> None:
        x = torch.zeros(sum(counts), c.hidden_size, dtype=dtype)
        model.forward_flat(x, StepBatch(starts, counts, [sessions[i] for i in seqs]), cache)

    for i in range(8):
        run([0], [PROMPT + 40 * i], [i])  # prompts of different lengths
    run([PROMPT], [1], [0])  # decode, batch 1
    run([PROMPT + 40 * i for i in range(8)], [1] * 8, list(range(8)))  # batch 8
    run([PROMPT + 1, 0], [1, 32], [0, 1])  # a decode step beside a prefill chunk
    run([PROMPT + 2, 4], [1, 4], [0, 2])  # a continued prefill: start > 0


def model_workload() -> None:
    from bench_gpu_decode import SHAPES
    from gpu_check_scheduler import CONFIG as SCHEDULER

    for name in ("smollm2", "llama-1b"):
        config = _config(SHAPES[name])
        for quant in ("none", "int8", "int4"):
            torch.manual_seed(0)
            model = SpanModel(config, Span(0, 1), kernel_backend="triton").to(torch.bfloat16)
            if quant != "none":
                quantize(model, quant, 128)  # type: ignore[arg-type]
                for m in model.modules():
                    if isinstance(m, QuantLinear):
                        m.use_backend("triton")
            steps(model)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        one = ModelConfig(**{**SCHEDULER.__dict__, "num_layers": 1})
        steps(SpanModel(one, Span(0, 1), kernel_backend="triton").to(dtype))
