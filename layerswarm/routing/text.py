"""Text in and out: the tokenizer, the model's chat template, and streaming detokenization."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from layerswarm.errors import ModelFormatError

# {"role": "user" | "assistant" | "system" | "tool", "content": "...", and for tool calls
# "tool_calls" / "tool_call_id" as OpenAI's messages carry them}
Message = dict[str, Any]


class ChatTokenizer:
    """A model folder's tokenizer.json and chat template."""

    def __init__(self, model_dir: str | Path) -> None:
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise ModelFormatError(f"no tokenizer.json in {model_dir}")
        self.tokenizer = Tokenizer.from_file(str(path))
        cfg = _read_json(model_dir / "tokenizer_config.json")
        template = cfg.get("chat_template")
        jinja_file = model_dir / "chat_template.jinja"
        if jinja_file.is_file():
            template = jinja_file.read_text()
        self.template_source: str | None = template if isinstance(template, str) else None
        self.bos_token = _token_text(cfg.get("bos_token"))
        self.eos_token = _token_text(cfg.get("eos_token"))
        gen = _read_json(model_dir / "generation_config.json")
        eos = gen.get("eos_token_id", _read_json(model_dir / "config.json").get("eos_token_id"))
        ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
        if self.eos_token and (t := self.tokenizer.token_to_id(self.eos_token)) is not None:
            ids.append(t)
        self.eos_ids = frozenset(int(i) for i in ids)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    def apply_chat_template(
        self,
        messages: Sequence[Message],
        add_generation_prompt: bool = True,
        tools: Sequence[dict[str, Any]] | None = None,
    ) -> str:
        """Render a conversation with the model's template (or a plain fallback without one).

        `tools`: OpenAI's tool definitions, for a template that takes them (Hugging Face's
        convention: a `tools` variable of `{"type": "function", "function": {...}}` items).
        """
        if self.template_source is None:
            turns = [f"{m['role']}: {m['content']}" for m in messages]
            return "\n".join(turns) + ("\nassistant:" if add_generation_prompt else "")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        env.filters["tojson"] = _tojson  # Hugging Face's: plain JSON, no HTML escapes
        try:
            template = env.from_string(self.template_source)
        except jinja2.TemplateError as e:
            raise ModelFormatError(f"the model's chat template does not parse: {e}") from e
        return template.render(
            messages=list(messages),
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            tools=list(tools) if tools else None,
        )

    def encode_chat(
        self, messages: Sequence[Message], tools: Sequence[dict[str, Any]] | None = None
    ) -> list[int]:
        return self.encode(self.apply_chat_template(messages, tools=tools))


def _tojson(
    value: object,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _raise(message: str) -> None:
    raise ModelFormatError(f"chat template: {message}")


def _read_json(path: Path) -> dict[str, Any]:
    return dict(json.loads(path.read_text())) if path.is_file() else {}


def _token_text(v: object) -> str | None:
    if isinstance(v, dict):
        return str(v.get("content"))
    return v if isinstance(v, str) else None


class TextStream:
    """Turns token ids into text pieces as they arrive, never splitting a multi-byte character.

    Each token is decoded once, incrementally, by `tokenizers`' `DecodeStream` (it holds back a
    token that ends inside a UTF-8 sequence until the next completes it), rather than the whole
    reply re-decoded at every token. Stop strings are held back while the text could still be
    the start of one.
    """

    def __init__(self, tokenizer: ChatTokenizer, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""  # every piece decoded so far
        self.sent = ""  # text already released
        self.stopped = False
        self._decoder = DecodeStream(skip_special_tokens=True)

    def push(self, token: int) -> str:
        """Add a token; return the text now safe to show (maybe "")."""
        self.ids.append(token)
        piece = self._decoder.step(self.tokenizer.tokenizer, token)
        if not piece:
            return ""
        self.text += piece
        return self._release(self.text, final=False)

    def flush(self) -> str:
        """The text still held back, at the end of generation."""
        return self._release(self.text, final=True)

    def _release(self, text: str, final: bool) -> str:
        if self.stopped:
            return ""
        end = len(text)
        for s in self.stop:
            at = text.find(s, len(self.sent) - len(s) + 1 if self.sent else 0)
            if at != -1 and at < end:
                end = at
                self.stopped = True
        if not self.stopped and not final:
            end -= _held_back(text, self.stop)
        piece = text[len(self.sent) : end]
        self.sent = text[:end] if end >= len(self.sent) else self.sent
        return piece


def _held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of `text` could begin a stop string."""
    hold = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                hold = max(hold, n)
                break
    return hold
