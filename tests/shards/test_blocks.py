"""The span math against transformers, span chaining, the KV cache, and what loading touches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from layerswarm.errors import CacheFull, ModelFormatError
from layerswarm.kernels.cpu_linear import pack_linears
from layerswarm.shards.config import ModelConfig, Span
from layerswarm.shards.weights import load_client_head, load_span, open_weights

TOL = 1e-4


def save_tiny(tmp_path: Path, kind: str = "llama", **overrides: object) -> Path:
    """A seeded random tiny model saved by transformers itself in a Hugging Face folder."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    common = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    common.update(overrides)
    if kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=False))
    else:
        model = LlamaForCausalLM(LlamaConfig(**common))
    with torch.no_grad():  # random norms, so a norm read from the wrong place shows
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if "norm" in name else 0.0))
    out = tmp_path / kind
    model.save_pretrained(out)
    return out


def hf_logits(model_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


def our_logits(
    model_dir: Path, ids: torch.Tensor, spans: list[Span] | None = None, pack: bool = False
) -> torch.Tensor:
    config = ModelConfig.from_file(model_dir)
    head = load_client_head(model_dir)
    if pack:  # the oneDNN layout the engine and peers use on a CPU
        pack_linears(head)
    spans = spans or [Span(0, config.num_layers)]
    hidden = head.embed_tokens(ids)
    for span in spans:
        model = load_span(model_dir, span)
        if pack:
            pack_linears(model)
        cache = model.new_cache(ids.shape[1])
        hidden = model(hidden, [0], cache, [cache.allocate(ids.shape[1])])
    return head.logits(hidden)


CASES = {
    "llama-gqa": ("llama", {}),
    "llama-tied-odd-head-dim": ("llama", {"tie_word_embeddings": True, "head_dim": 24}),
    "llama3-rope-scaling": (
        "llama",
        {
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
            "rope_theta": 500000.0,
        },
    ),
    "qwen2-biases": ("qwen2", {}),
    "mha": ("llama", {"num_key_value_heads": 4}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers_on_tiny_models(tmp_path: Path, case: str) -> None:
    kind, overrides = CASES[case]
    model_dir = save_tiny(tmp_path, kind, **overrides)
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(1))
    diff = (our_logits(model_dir, ids) - hf_logits(model_dir, ids)).abs().max()
    assert diff < TOL


@pytest.mark.parametrize("pack", [False, True], ids=["plain", "onednn-packed"])
def test_logits_match_transformers_on_smollm2(smollm2_dir: Path, pack: bool) -> None:
    ids = torch.randint(0, 49152, (1, 24), generator=torch.Generator().manual_seed(2))
    diff = (our_logits(smollm2_dir, ids, pack=pack) - hf_logits(smollm2_dir, ids)).abs().max()
    assert diff < TOL


def test_span_pieces_chained_equal_the_whole(tmp_path: Path) -> None:
    model_dir = save_tiny(tmp_path, num_hidden_layers=5)
    ids = torch.randint(0, 256, (1, 17), generator=torch.Generator().manual_seed(3))
    whole = our_logits(model_dir, ids)
    pieces = our_logits(model_dir, ids, [Span(0, 2), Span(2, 3), Span(3, 5)])
    assert torch.equal(whole, pieces)


def test_decode_with_cache_equals_recompute(tmp_path: Path) -> None:
    model_dir = save_tiny(tmp_path)
    ids = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(4))
    model = load_span(model_dir, Span(0, 4))
    head = load_client_head(model_dir)
    cache = model.new_cache(64, page_size=4)  # small pages: sessions span several
    session = cache.allocate(30)
    steps = [model(head.embed_tokens(ids[:, :11]), [0], cache, [session])]
    for t in range(11, 30):
        steps.append(model(head.embed_tokens(ids[:, t : t + 1]), [t], cache, [session]))
    incremental = head.logits(torch.cat(steps, dim=1))
    assert (incremental - our_logits(model_dir, ids)).abs().max() < TOL


def test_batched_decode_of_sessions_with_different_lengths(tmp_path: Path) -> None:
    model_dir = save_tiny(tmp_path)
    model = load_span(model_dir, Span(0, 4))
    head = load_client_head(model_dir)
    cache = model.new_cache(96, page_size=4)
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 256, (1, n), generator=gen) for n in (5, 13, 9)]
    blocker = cache.allocate(4)  # so that later sessions' pages are not one run
    sessions = [cache.allocate(p.shape[1] + 1) for p in prompts]
    cache.free(blocker)
    for p, s in zip(prompts, sessions, strict=True):
        model(head.embed_tokens(p), [0], cache, [s])
    nxt = torch.randint(0, 256, (3, 1), generator=gen)
    starts = [p.shape[1] for p in prompts]
    batched = model(head.embed_tokens(nxt), starts, cache, sessions)
    for row, p in enumerate(prompts):
        alone = our_logits(model_dir, torch.cat([p, nxt[row : row + 1]], dim=1))[:, -1]
        assert (head.logits(batched[row : row + 1])[:, -1] - alone).abs().max() < TOL


def test_loading_a_span_reads_only_its_tensors(tmp_path: Path) -> None:
    model_dir = save_tiny(tmp_path, num_hidden_layers=6)
    with open_weights(model_dir) as files:
        load_span(model_dir, Span(2, 4), files=files)
        layers = {int(name.split(".")[2]) for name in files.read}
        assert layers == {2, 3}
        assert all(name.startswith("model.layers.") for name in files.read)


def test_cache_refuses_a_session_that_does_not_fit() -> None:
    from layerswarm.shards.kv_cache import PagedKVCache

    cache = PagedKVCache(2, 2, 8, num_pages=4, page_size=16)
    cache.allocate(40)
    with pytest.raises(CacheFull, match="cache full"):
        cache.allocate(20)
    assert cache.tokens_free == 16


def test_missing_tensor_is_a_clear_error(tmp_path: Path) -> None:
    model_dir = save_tiny(tmp_path)
    tensors = load_file(model_dir / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, model_dir / "model.safetensors")
    load_span(model_dir, Span(0, 1))  # layer 0 is whole
    with pytest.raises(ModelFormatError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load_span(model_dir, Span(0, 2))


def test_unsupported_architecture_is_a_clear_error(tmp_path: Path) -> None:
    model_dir = save_tiny(tmp_path)
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["GPT2LMHeadModel"], "gpt2"
    (model_dir / "config.json").write_text(json.dumps(cfg))
    supported = (
        r"unsupported architecture \['GPT2LMHeadModel'\]: layerswarm runs GptOssForCausalLM, "
        r"LlamaForCausalLM, MistralForCausalLM, MixtralForCausalLM, Qwen2ForCausalLM, "
        r"Qwen3ForCausalLM, Qwen3MoeForCausalLM"
    )
    with pytest.raises(ModelFormatError, match=supported):
        ModelConfig.from_file(model_dir)


@pytest.mark.parametrize("text", ["3:3", "5:2", "a:b", "7", "-1:4"])
def test_bad_spans_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="span"):
        Span.parse(text)
