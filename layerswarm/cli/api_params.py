"""Check an OpenAI request body and turn it into a prompt's token ids and a `SamplingConfig`.

Pure functions of the body: every bad field raises `ApiError(400, ..., param=field)`. Fields the
swarm cannot honour (n > 1, logprobs, tools) are refused rather than ignored; presence and
frequency penalties are checked and ignored (use the `repetition_penalty` extension instead).
"""

from __future__ import annotations

from typing import Any

from layerswarm.cli.api_server import ApiError
from layerswarm.routing.sampling import SamplingConfig
from layerswarm.routing.text import ChatTokenizer, Message

ROLES = {"system", "user", "assistant", "developer"}  # developer: OpenAI's newer "system"
MAX_STOPS = 4  # OpenAI's limit on stop strings


def parse_prompt(tokenizer: ChatTokenizer, body: dict[str, Any], chat: bool) -> list[int]:
    """The prompt's token ids: chat messages through the model's template, or plain text."""
    if chat:
        return tokenizer.encode_chat(parse_messages(body.get("messages")))
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt)
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        ids = [int(t) for t in prompt]
    else:
        raise ApiError(400, "prompt must be a string or a list of token ids", param="prompt")
    if not ids:
        raise ApiError(400, "the prompt is empty", param="prompt")
    for name in ("echo", "suffix"):
        if body.get(name):
            raise ApiError(400, f"{name} is not supported", param=name)
    if body.get("best_of") not in (None, 1):
        raise ApiError(400, "best_of must be 1", param="best_of")
    return ids


def parse_messages(messages: object) -> list[Message]:
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", param="messages")
    out: list[Message] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ApiError(
                400, f"messages[{i}] needs a role among {sorted(ROLES)}", param="messages"
            )
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": _content(m.get("content"), i)})
    return out


def _content(content: object, i: int) -> str:
    """A message's text: a string, or a list of `{"type": "text", "text": ...}` parts."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise ApiError(400, f"messages[{i}]: only text parts", param="messages")
            texts.append(str(part.get("text", "")))
        return "".join(texts)
    raise ApiError(400, f"messages[{i}].content must be text", param="messages")


def parse_sampling(
    body: dict[str, Any], prompt_tokens: int, context: int, default_max: int | None
) -> SamplingConfig:
    """The body's sampling fields; `max_tokens` defaults to `default_max` or the context left."""
    _refuse_unsupported(body)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is None:
        max_tokens = default_max or max(context - prompt_tokens, 1)
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    _number(body, "presence_penalty", 0.0, -2.0, 2.0)
    _number(body, "frequency_penalty", 0.0, -2.0, 2.0)
    repetition_penalty = _number(body, "repetition_penalty", 1.0, 1e-6, 100.0)
    if not _is_int(max_tokens) or max_tokens < 1:
        raise ApiError(400, "max_tokens must be an integer >= 1", param="max_tokens")
    top_k = body.get("top_k", 0) or 0
    if not _is_int(top_k) or top_k < 0:
        raise ApiError(400, "top_k must be an integer >= 0", param="top_k")
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise ApiError(400, "seed must be an integer", param="seed")
    if top_p == 0.0:  # the most probable token only
        temperature, top_p = 0.0, 1.0
    return SamplingConfig(
        max_new_tokens=int(max_tokens),
        temperature=temperature,
        top_k=int(top_k),
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        seed=seed,
        stop=_stops(body.get("stop")),
    )


def _refuse_unsupported(body: dict[str, Any]) -> None:
    if body.get("n") not in (None, 1):
        raise ApiError(400, "only n=1 is supported", param="n")
    if body.get("logprobs") or body.get("top_logprobs"):
        raise ApiError(400, "logprobs are not supported", param="logprobs")
    if body.get("tools") or body.get("functions"):
        raise ApiError(400, "tools are not supported", param="tools")
    if not isinstance(body.get("stream", False), bool):
        raise ApiError(400, "stream must be true or false", param="stream")


def _stops(stop: object) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    if isinstance(stop, list) and len(stop) <= MAX_STOPS and all(isinstance(s, str) for s in stop):
        return tuple(stop)
    raise ApiError(400, f"stop must be a string or up to {MAX_STOPS} strings", param="stop")


def _number(body: dict[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise ApiError(400, f"{name} must be a number in [{low:g}, {high:g}]", param=name)
    return float(value)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
