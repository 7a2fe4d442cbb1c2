"""The `logprobs` of OpenAI replies: the sampler's notes (`TokenLogprob`) as chat's
`{"content": [...]}` or completions' `{"tokens", "token_logprobs", ...}`.

The values are those of the distribution each token was drawn from: after the penalties, the
grammar's mask, temperature, top-k and top-p (a token those cut has -9999, as vLLM writes -inf);
under greedy decoding, the penalized logits' softmax at temperature 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from layerswarm.routing.sampling import TokenLogprob
from layerswarm.routing.text import ChatTokenizer

FLOOR = -9999.0  # what a probability of 0 is written as (JSON has no -inf)


class TokenTexts:
    """Each token's bytes and text, as logprobs show them (a token that ends inside a UTF-8
    character shows its bytes, and U+FFFD in its text)."""

    def __init__(self, tokenizer: ChatTokenizer) -> None:
        self.tokenizer = tokenizer.tokenizer
        decoder = self.tokenizer.decoder
        self.byte_level = type(decoder).__name__ == "ByteLevel" if decoder else False
        self.bytes_of = lru_cache(maxsize=65536)(self._bytes)

    def _bytes(self, token: int) -> bytes:
        if self.byte_level:  # GPT-2's byte alphabet: one character a byte
            piece = self.tokenizer.id_to_token(token) or ""
            if all(ch in _UNBYTE for ch in piece):
                return bytes(_UNBYTE[ch] for ch in piece)
        return str(self.tokenizer.decode([token], skip_special_tokens=False)).encode()

    def text(self, token: int) -> str:
        return self.bytes_of(token).decode("utf-8", errors="replace")


def _gpt2_unbyte() -> dict[str, int]:
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {chr(b): b for b in printable}
    extra = (b for b in range(256) if b not in printable)
    table.update({chr(256 + n): b for n, b in enumerate(extra)})
    return table


_UNBYTE = _gpt2_unbyte()


def _value(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else FLOOR


def chat_logprobs(texts: TokenTexts, notes: Sequence[TokenLogprob]) -> dict[str, Any]:
    """Chat's `choice.logprobs`: `{"content": [{token, logprob, bytes, top_logprobs}], ...}`."""

    def entry(token: int, logprob: float) -> dict[str, Any]:
        raw = texts.bytes_of(token)
        return {"token": texts.text(token), "logprob": _value(logprob), "bytes": list(raw)}

    content = [
        entry(n.token, n.logprob) | {"top_logprobs": [entry(t, lp) for t, lp in n.top]}
        for n in notes
    ]
    return {"content": content, "refusal": None}


def completion_logprobs(
    texts: TokenTexts, notes: Sequence[TokenLogprob], offset: int
) -> dict[str, Any]:
    """Completions' `choice.logprobs`, the text of its first token starting at `offset`."""
    tokens, offsets = [], []
    for n in notes:
        offsets.append(offset)
        tokens.append(texts.text(n.token))
        offset += len(tokens[-1])
    tops = [{texts.text(t): _value(lp) for t, lp in n.top} for n in notes]
    return {
        "tokens": tokens,
        "token_logprobs": [_value(n.logprob) for n in notes],
        "top_logprobs": tops,
        "text_offset": offsets,
    }
