"""Check an OpenAI request body against its schema, and turn it into token ids and sampling.

The schema is pydantic models of OpenAI's request fields (strict types: `true` is no number and
`"0.5"` no float); every bad field raises `ApiError(400, ..., param=field)`. Unknown fields are
allowed, as OpenAI's own server allows them. Fields the swarm cannot honour (n > 1, tools) are
refused rather than ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError

from layerswarm.cli.api_server import ApiError
from layerswarm.routing.sampling import MAX_LOGPROBS, SamplingConfig
from layerswarm.routing.text import ChatTokenizer, Message

MAX_STOPS = 4  # OpenAI's limit on stop strings
Number = Annotated[float, Field(strict=True)]  # an int or a float, never a bool or a string


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(_Body):
    include_usage: StrictBool = False


class SamplingFields(_Body):
    """The fields every completion request shares."""

    model: StrictStr | None = None
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    temperature: Annotated[Number, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[Number, Field(ge=0.0, le=1.0)] | None = None
    top_k: Annotated[StrictInt, Field(ge=0)] | None = None
    presence_penalty: Annotated[Number, Field(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[Number, Field(ge=-2.0, le=2.0)] | None = None
    repetition_penalty: Annotated[Number, Field(ge=1e-6, le=100.0)] | None = None
    seed: StrictInt | None = None
    stop: StrictStr | Annotated[list[StrictStr], Field(max_length=MAX_STOPS)] | None = None
    n: Literal[1] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    # chat: true or false, with top_logprobs; completions: how many alternatives to list
    logprobs: StrictBool | Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    user: StrictStr | None = None


class TextPart(_Body):
    type: Literal["text"]
    text: StrictStr = ""


class ChatMessage(_Body):
    # developer: OpenAI's newer "system"
    role: Literal["system", "user", "assistant", "developer"]
    content: StrictStr | list[TextPart] | None = None
    name: StrictStr | None = None


class ChatRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]


class CompletionRequest(SamplingFields):
    prompt: (
        StrictStr
        | Annotated[list[StrictStr], Field(min_length=1, max_length=1)]
        | Annotated[list[StrictInt], Field(min_length=1)]
    )
    echo: StrictBool | None = None
    suffix: StrictStr | None = None
    best_of: Literal[1] | None = None


Model = TypeVar("Model", bound=BaseModel)


def validate(kind: type[Model], body: dict[str, Any]) -> Model:
    """`body` as the request model `kind`; the first bad field becomes a 400 naming it."""
    try:
        return kind.model_validate(body)
    except ValidationError as e:
        first = e.errors()[0]
        param = str(first["loc"][0]) if first["loc"] else None
        where = ".".join(str(part) for part in first["loc"])
        raise ApiError(400, f"{where}: {first['msg']}", param=param) from None


def parse_prompt(tokenizer: ChatTokenizer, request: SamplingFields) -> list[int]:
    """The prompt's token ids: chat messages through the model's template, or plain text.

    Renders templates and tokenizes: run it off the event loop.
    """
    if isinstance(request, ChatRequest):
        messages: list[Message] = [
            {"role": "system" if m.role == "developer" else m.role, "content": _text(m)}
            for m in request.messages
        ]
        return tokenizer.encode_chat(messages)
    if not isinstance(request, CompletionRequest):
        raise TypeError(f"not a completion request: {type(request).__name__}")
    for name in ("echo", "suffix"):
        if getattr(request, name):
            raise ApiError(400, f"{name} is not supported", param=name)
    prompt = request.prompt
    if isinstance(prompt, list) and isinstance(prompt[0], str):
        prompt = prompt[0]
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
    if not ids:
        raise ApiError(400, "the prompt is empty", param="prompt")
    return ids


def _text(message: ChatMessage) -> str:
    """A message's text: a string, or the concatenation of its text parts."""
    content = message.content
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(part.text for part in content)


def parse_sampling(
    body: dict[str, Any] | SamplingFields,
    prompt_tokens: int,
    context: int,
    default_max: int | None,
) -> SamplingConfig:
    """The body's sampling fields; `max_tokens` defaults to `default_max` or the context left."""
    fields = validate(SamplingFields, body) if isinstance(body, dict) else body
    _refuse_unsupported(fields)
    max_tokens = fields.max_completion_tokens or fields.max_tokens
    if max_tokens is None:
        max_tokens = default_max or max(context - prompt_tokens, 1)
    temperature = 1.0 if fields.temperature is None else fields.temperature
    top_p = 1.0 if fields.top_p is None else fields.top_p
    if top_p == 0.0:  # the most probable token only
        temperature, top_p = 0.0, 1.0
    stop = fields.stop
    return SamplingConfig(
        max_new_tokens=max_tokens,
        temperature=temperature,
        top_k=fields.top_k or 0,
        top_p=top_p,
        repetition_penalty=fields.repetition_penalty or 1.0,
        presence_penalty=fields.presence_penalty or 0.0,
        frequency_penalty=fields.frequency_penalty or 0.0,
        seed=fields.seed,
        stop=() if stop is None else (stop,) if isinstance(stop, str) else tuple(stop),
        logprobs=_logprobs(fields),
    )


def _logprobs(fields: SamplingFields) -> int | None:
    """How many alternatives each token's logprobs list, None for no logprobs: chat's
    `logprobs: true` with `top_logprobs`, or completions' `logprobs: N`."""
    if isinstance(fields.logprobs, bool):
        if fields.top_logprobs is not None and not fields.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        return (fields.top_logprobs or 0) if fields.logprobs else None
    if fields.top_logprobs is not None:
        if fields.logprobs is None:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        return fields.top_logprobs
    return fields.logprobs


def _refuse_unsupported(fields: SamplingFields) -> None:
    if fields.tools or fields.functions:
        raise ApiError(400, "tools are not supported", param="tools")
