"""The registry of model families: what differs between them, one small module each.

A family says which Hugging Face architectures it is, which `ModelConfig` fields its
`config.json` sets beyond the common ones (attention variant, norms, MLP or experts), and the
tensor names of each layer in its checkpoints and how they become this package's parameters.
Adding a family is one module here (plus its tests); the math switches on `ModelConfig`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from layerswarm.errors import ModelFormatError
from layerswarm.shards.config import ModelConfig

Get = Callable[[str], torch.Tensor]  # reads one tensor of the checkpoint, cast to the model dtype


@dataclass(frozen=True)
class Family:
    """One family of decoders and how to read its checkpoints."""

    name: str  # ModelConfig.architecture
    architectures: tuple[str, ...]  # Hugging Face `architectures` entries
    config_fields: Callable[[dict[str, Any]], dict[str, Any]]  # config.json -> ModelConfig fields
    layer_tensors: Callable[[ModelConfig, int], list[str]]  # names layer i reads, in order
    layer_state: Callable[[Get, ModelConfig, int], dict[str, torch.Tensor]]  # -> DecoderLayer's
    description: str = ""  # for the README and error messages, e.g. "Qwen3 (q/k norms)"


def _all() -> list[Family]:
    from layerswarm.shards.families import gpt_oss, llama, mixtral, qwen3, qwen3_moe

    return [*llama.FAMILIES, qwen3.FAMILY, qwen3_moe.FAMILY, mixtral.FAMILY, gpt_oss.FAMILY]


def families() -> dict[str, Family]:
    """Every supported family by name."""
    return {f.name: f for f in _all()}


def supported_architectures() -> list[str]:
    """The Hugging Face architecture names layerswarm runs, sorted."""
    return sorted(a for f in _all() for a in f.architectures)


def family_for(d: dict[str, Any]) -> Family:
    """The family of a `config.json` dictionary (by `architectures`, else `model_type`).

    Raises:
        ModelFormatError: no supported family; the message lists the supported architectures.
    """
    archs = d.get("architectures") or []
    for f in _all():
        if any(a in f.architectures for a in archs):
            return f
    by_name = families().get(str(d.get("model_type")))
    if by_name is not None and not archs:
        return by_name
    raise ModelFormatError(
        f"unsupported architecture {archs or d.get('model_type')!r}: layerswarm runs "
        f"{', '.join(supported_architectures())}"
    )


def family_of(config: ModelConfig) -> Family:
    """The family of a parsed config."""
    return families()[config.architecture]


def layer_tensor_names(config: ModelConfig, layers: range) -> list[str]:
    """The checkpoint names of `layers`' tensors (a peer's span), in order."""
    family = family_of(config)
    return [n for i in layers for n in family.layer_tensors(config, i)]


def client_tensor_names(config: ModelConfig) -> list[str]:
    """The checkpoint names of what a client holds: embedding, final norm and head."""
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    return names if config.tie_word_embeddings else [*names, "lm_head.weight"]
