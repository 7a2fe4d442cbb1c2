"""Write a synthetic mixture-of-experts model for benchmarks: random weights, real layout.

A Qwen3-MoE checkpoint (as transformers saves it) with SmolLM2-135M's widths (hidden 576, 9
query and 3 key/value heads of 64, vocabulary 49152) and 8 experts of 768 features a layer, top 2
per token: two experts are exactly SmolLM2's MLP in size, so a token costs about what a
SmolLM2 token costs while memory holds four times its MLP weights. 12 layers, bf16: ~350 MB.
SmolLM2's tokenizer is copied in when its converted folder is in the cache.

    python scripts/make_synthetic_moe.py [--out ~/.cache/layerswarm/models/synthetic-moe]
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

from layerswarm.cli.common import default_cache_dir


def make(out: Path, layers: int, experts: int, top_k: int, dtype: torch.dtype) -> Path:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        moe_intermediate_size=768,
        num_hidden_layers=layers,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        num_experts=experts,
        num_experts_per_tok=top_k,
        norm_topk_prob=True,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        rope_theta=100000.0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(config).to(dtype)
    with torch.no_grad():  # a router with some spread, so tokens do not all pick one expert
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0.0, 0.5)
    model.save_pretrained(out)
    smollm2 = default_cache_dir() / "models" / "smollm2-135m"
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (smollm2 / name).is_file():
            shutil.copy(smollm2 / name, out / name)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=default_cache_dir() / "models" / "synthetic-moe")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = ap.parse_args()
    out = make(args.out, args.layers, args.experts, args.top_k, getattr(torch, args.dtype))
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(f"wrote {out} ({size / 1e6:.0f} MB of weights)")


if __name__ == "__main__":
    main()
