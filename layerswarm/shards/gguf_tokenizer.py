"""The tokenizer of a GGUF file as a Hugging Face `tokenizer.json` and `tokenizer_config.json`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from gguf import TokenType
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from layerswarm.errors import ModelFormatError

log = logging.getLogger(__name__)

# Byte-level pre-tokenizers by `tokenizer.ggml.pre`, matched to each model's own tokenizer.json.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# o200k (gpt-oss, GPT-4o, Llama 4): the regex of their tokenizer.json, which llama.cpp's
# llama-vocab.cpp quotes for LLAMA_VOCAB_PRE_TYPE_GPT4O (`tokenizer.ggml.pre` "gpt-4o", "llama4").
_O200K_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT2_PRE = ("default", "gpt2", "gpt-2")
_LLAMA3_PRE = ("llama-bpe", "llama3", "llama-v3")
_SPLITS = {
    **dict.fromkeys(_LLAMA3_PRE, _LLAMA3_SPLIT),
    "gpt-4o": _O200K_SPLIT,
    "llama4": _O200K_SPLIT,
}


def _pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if pre == "smollm":  # SmolLM2's tokenizer.json splits every digit apart first
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in _SPLITS:  # a regex split, then bytes to characters (Llama 3's, o200k's)
        split = pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated", invert=False)
        no_regex = pre_tokenizers.ByteLevel(
            add_prefix_space=False, trim_offsets=True, use_regex=False
        )
        return pre_tokenizers.Sequence([split, no_regex])
    if pre not in _GPT2_PRE:
        log.warning("unknown GGUF pre-tokenizer %r: splitting text as GPT-2 does", pre)
    return byte_level


def gguf_tokenizer(meta: dict[str, Any], path: Path) -> Tokenizer:
    """A byte-level BPE `tokenizers.Tokenizer` from `tokenizer.ggml.*` metadata."""
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ModelFormatError(
            f"{path} has a {kind!r} tokenizer; layerswarm converts byte-level BPE ('gpt2') only"
        )
    tokens: list[str] = meta.get("tokenizer.ggml.tokens") or []
    merges: list[str] = meta.get("tokenizer.ggml.merges") or []
    if not tokens or not merges:
        raise ModelFormatError(f"{path} lacks tokenizer.ggml.tokens or tokenizer.ggml.merges")
    vocab: dict[str, int] = {}
    for i, token in enumerate(tokens):
        vocab.setdefault(token, i)
    pairs = [_merge_pair(m, path) for m in merges]
    tokenizer = Tokenizer(models.BPE(vocab, pairs, fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre", "default"))
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    types = meta.get("tokenizer.ggml.token_type") or [TokenType.NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise ModelFormatError(f"{path} has {len(tokens)} tokens but {len(types)} token types")
    kinds = {TokenType.CONTROL: True, TokenType.USER_DEFINED: False}  # value: special or not
    added = [
        AddedToken(token, special=kinds[t], normalized=False)
        for token, t in zip(tokens, types, strict=True)
        if t in kinds
    ]
    tokenizer.add_special_tokens([a for a in added if a.special])
    tokenizer.add_tokens([a for a in added if not a.special])
    return tokenizer


def _merge_pair(merge: str, path: Path) -> tuple[str, str]:
    left, space, right = merge.partition(" ")
    if not space:
        raise ModelFormatError(f"{path}: the merge {merge!r} is not two tokens")
    return left, right


def tokenizer_config(meta: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    out: dict[str, Any] = {
        # Not "GPT2Tokenizer": transformers 5 then swaps in GPT-2's own pre-tokenizer and drops
        # SmolLM2's Digits step; the generic class keeps tokenizer.json as written.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
    }
    for name in ("bos", "eos", "unknown", "padding"):
        token_id = meta.get(f"tokenizer.ggml.{name}_token_id")
        if token_id is not None and 0 <= token_id < len(tokens):
            key = {"unknown": "unk", "padding": "pad"}.get(name, name)
            out[f"{key}_token"] = tokens[token_id]
    if "tokenizer.chat_template" in meta:
        out["chat_template"] = meta["tokenizer.chat_template"]
    return out
