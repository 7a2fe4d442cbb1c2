"""Tiny random models of every family, saved by transformers itself, with a byte tokenizer."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

COMMON: dict[str, Any] = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)

# Each family's tiny config: what it changes from Llama is switched on and made to matter.
FAMILY_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "qwen3": ("Qwen3", {"head_dim": 24}),  # an explicit head_dim that is not hidden / heads
    "qwen3_moe": (
        "Qwen3Moe",
        {
            "num_experts": 8,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "norm_topk_prob": True,
            "mlp_only_layers": [2],  # layer 2 has a plain MLP
        },
    ),
    "mixtral": ("Mixtral", {"num_local_experts": 8, "num_experts_per_tok": 2}),
    "gpt_oss": (
        "GptOss",
        {
            "num_local_experts": 8,
            "num_experts_per_tok": 2,
            "head_dim": 16,
            "sliding_window": 8,  # shorter than the test prompts, so the window cuts
            "rope_parameters": {
                "rope_type": "yarn",
                "rope_theta": 150000.0,
                "factor": 4.0,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "original_max_position_embeddings": 128,
                "truncate": False,
            },
        },
    ),
}
FAMILIES = sorted(FAMILY_CONFIGS)


def save_tiny_family(out: Path, family: str, **overrides: Any) -> Path:
    """A seeded random tiny model of `family`, saved with transformers' `save_pretrained`.

    Matrices get std 0.1 (transformers' 0.02 leaves every token alike); norms, biases and sinks
    are random too, so one read from the wrong place shows.
    """
    import transformers

    prefix, extra = FAMILY_CONFIGS[family]
    config_cls = getattr(transformers, f"{prefix}Config")
    model_cls = getattr(transformers, f"{prefix}ForCausalLM")
    torch.manual_seed(0)
    model = model_cls(config_cls(**(COMMON | extra | overrides)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p) * 0.3 + 1.0)
            elif "bias" in name or "sinks" in name:
                p.copy_(torch.randn_like(p) * 0.5)
            elif "embed" in name:
                p.copy_(torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * 0.1)
    model.save_pretrained(out)
    write_byte_tokenizer(out)
    return out


def write_byte_tokenizer(out: Path) -> None:
    """A byte-level tokenizer of 256 tokens (no merges): enough for a client to run."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # the 256 characters bytes map to
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab, [], fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "Tok"}))


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """`tiny_family(name)`: the folder of that family's tiny model, made once per session."""
    made: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in made:
            made[family] = save_tiny_family(tmp_path_factory.mktemp(family) / family, family)
        return made[family]

    return get


@pytest.fixture(params=FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    """Each family's name in turn (tests taking it run once per family)."""
    name: str = request.param
    return name
