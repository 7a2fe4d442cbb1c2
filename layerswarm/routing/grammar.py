"""Grammar-constrained decoding: which tokens may come next, from llguidance over our tokenizer.

The client holds the head, so it masks the logits itself, with no round trip: each token the
sampler chooses has passed the mask, and advances the grammar. llguidance (what vLLM and SGLang
use) turns a JSON schema, a regex or a Lark grammar into a matcher over the tokenizer's byte
strings; its mask for SmolLM2's 49,152 tokens took 1.5 ms here, computed on a thread of its own
while the reply's step is in flight. Under speculation each verified position is masked by the
grammar's state after the tokens before it, so a drafted token the grammar forbids has
probability 0 and never stands.
"""

from __future__ import annotations

import json
import threading
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import llguidance
import numpy as np
import torch

from layerswarm.routing.text import ChatTokenizer

# Compact JSON with the usual spaces: a flexible grammar lets a small model emit whitespace
# until max_tokens (seen with SmolLM2-135M).
JSON_OPTIONS: dict[str, Any] = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}


class GrammarError(ValueError):
    """A grammar or schema that cannot be compiled."""


def json_schema_grammar(schema: dict[str, Any]) -> str:
    """The grammar of JSON that follows `schema` (`{"type": "object"}`: any object)."""
    try:
        options: Any = JSON_OPTIONS  # a TypedDict in llguidance's stubs, not at run time
        return str(llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=options))
    except ValueError as e:
        raise GrammarError(f"the JSON schema is not valid: {e}") from None


def regex_grammar(regex: str) -> str:
    return str(llguidance.LLMatcher.grammar_from_regex(regex))


def choice_grammar(choices: list[str]) -> str:
    """One of `choices`, exactly."""
    lark = "start: " + " | ".join(json.dumps(c) for c in choices)
    return str(llguidance.LLMatcher.grammar_from_lark(lark))


def lark_grammar(lark: str) -> str:
    return str(llguidance.LLMatcher.grammar_from_lark(lark))


class GrammarTokenizer:
    """llguidance's view of a model's tokenizer (building it reads the whole vocabulary, about
    0.3 s for SmolLM2's: one per tokenizer, kept)."""

    def __init__(self, tokenizer: ChatTokenizer) -> None:
        eos = sorted(tokenizer.eos_ids)
        self.inner = llguidance.LLTokenizer(tokenizer.tokenizer.to_str(), eos_token=eos or None)
        self.vocab = int(self.inner.vocab_size)

    def check(self, grammar: str) -> None:
        """Raises GrammarError for a grammar that does not compile."""
        error = llguidance.LLMatcher.validate_grammar(grammar, self.inner)
        if error:
            raise GrammarError(error)


_POOL: ThreadPoolExecutor | None = None


def _mask_pool() -> ThreadPoolExecutor:
    """The thread that computes every reply's next mask (started on first use)."""
    global _POOL
    with _LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(1, thread_name_prefix="layerswarm-grammar")
        return _POOL


_TOKENIZERS: weakref.WeakKeyDictionary[ChatTokenizer, GrammarTokenizer] = (
    weakref.WeakKeyDictionary()
)
_LOCK = threading.Lock()


def grammar_tokenizer(tokenizer: ChatTokenizer) -> GrammarTokenizer:
    """The `GrammarTokenizer` of `tokenizer`, built once."""
    with _LOCK:
        found = _TOKENIZERS.get(tokenizer)
        if found is None:
            found = _TOKENIZERS[tokenizer] = GrammarTokenizer(tokenizer)
        return found


class Grammar:
    """One reply's grammar state: the mask of the next token, advanced by each chosen one.

    The next mask is computed on a thread of its own as soon as a token is accepted, so it is
    ready when the next logits come back from the pipeline (the mask then costs the reply no
    time while its step crosses the network).
    """

    def __init__(self, tokenizer: GrammarTokenizer, grammar: str) -> None:
        self.matcher = llguidance.LLMatcher(tokenizer.inner, grammar, log_level=0)
        if self.matcher.is_error():
            raise GrammarError(self.matcher.get_error())
        self.vocab = tokenizer.vocab
        self.eos = list(tokenizer.inner.eos_tokens)
        self._next: Future[torch.Tensor] | None = _mask_pool().submit(self._allowed)

    def _allowed(self) -> torch.Tensor:
        """The tokens `(vocab,)` bool that may come next."""
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        allowed = np.unpackbits(bits, bitorder="little")[: self.vocab].astype(bool)
        if not allowed.any():  # an error state: let the reply end
            allowed[self.eos] = True
        return torch.from_numpy(allowed)

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """`logits (vocab,)` with every token the grammar forbids next at -inf."""
        allowed = self._next.result() if self._next is not None else self._allowed()
        self._next = None
        keep = torch.zeros(logits.shape[-1], dtype=torch.bool)
        n = min(self.vocab, logits.shape[-1])
        keep[:n] = allowed[:n]
        return logits.float().masked_fill(~keep.to(logits.device), float("-inf"))

    def accept(self, token: int) -> None:
        """`token` came next (it passed `mask`); the next mask starts at once."""
        if self._next is not None:  # accepted without a mask asked for: let it finish first
            self._next.result()
        self.matcher.consume_token(token)
        self._next = _mask_pool().submit(self._allowed)

    @property
    def complete(self) -> bool:
        """Whether what came so far is a whole sentence of the grammar."""
        if self._next is not None:  # the matcher is busy with the next mask
            self._next.result()
        return bool(self.matcher.is_accepting())
