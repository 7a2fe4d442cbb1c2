"""Check an OpenAI request body against its schema, and turn it into token ids and sampling.

The schema is pydantic models of OpenAI's request fields (strict types: `true` is no number and
`"0.5"` no float); every bad field raises `ApiError(400, ..., param=field)`. Unknown fields are
allowed, as OpenAI's own server allows them. Fields the swarm cannot honour (`echo`, `suffix`,
the legacy `functions`) are refused rather than ignored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError

from layerswarm.cli.api_server import ApiError
from layerswarm.cli.api_tools import forced_call_grammar, messages_with_tools, template_takes_tools
from layerswarm.routing.grammar import (
    GrammarError,
    choice_grammar,
    json_schema_grammar,
    lark_grammar,
    regex_grammar,
)
from layerswarm.routing.sampling import MAX_LOGPROBS, SamplingConfig
from layerswarm.routing.text import ChatTokenizer, Message

MAX_STOPS = 4  # OpenAI's limit on stop strings
MAX_CHOICES = 16  # unit: choices a request may ask for (`n`); each is a session of its own
Number = Annotated[float, Field(strict=True)]  # an int or a float, never a bool or a string


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(_Body):
    include_usage: StrictBool = False


class JsonSchemaSpec(_Body):
    name: StrictStr = "response"
    description: StrictStr | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: StrictBool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None


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
    n: Annotated[StrictInt, Field(ge=1, le=MAX_CHOICES)] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    # chat: true or false, with top_logprobs; completions: how many alternatives to list
    logprobs: StrictBool | Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    response_format: ResponseFormat | None = None
    # vLLM's extensions for constrained output, one at most
    guided_json: dict[str, Any] | None = None
    guided_regex: StrictStr | None = None
    guided_choice: Annotated[list[StrictStr], Field(min_length=1)] | None = None
    guided_grammar: StrictStr | None = None  # Lark
    functions: list[Any] | None = None
    user: StrictStr | None = None


class TextPart(_Body):
    type: Literal["text"]
    text: StrictStr = ""


class FunctionCall(_Body):
    name: StrictStr
    arguments: StrictStr = "{}"  # JSON text


class ToolCallIn(_Body):
    id: StrictStr = ""
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Body):
    # developer: OpenAI's newer "system"
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: StrictStr | list[TextPart] | None = None
    name: StrictStr | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: StrictStr | None = None


class FunctionSpec(_Body):
    name: Annotated[StrictStr, Field(min_length=1, max_length=64, pattern=r"^[\w.-]+$")]
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None


class ToolSpec(_Body):
    type: Literal["function"]
    function: FunctionSpec


class NamedFunction(_Body):
    name: StrictStr


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: NamedFunction


class ChatRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    tools: list[ToolSpec] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: StrictBool | None = None


@dataclass(frozen=True)
class ToolPlan:
    """The tools a reply may call, and whether it must."""

    tools: list[dict[str, Any]]  # OpenAI's definitions, as JSON
    forced: list[dict[str, Any]] | None  # tools one of which must be called; None: auto
    parallel: bool  # several calls in one reply

    @property
    def names(self) -> list[str]:
        return [str(t["function"]["name"]) for t in self.tools]


def parse_tools(request: SamplingFields) -> ToolPlan | None:
    """What `tools` and `tool_choice` ask; None for no tools (or `tool_choice: "none"`)."""
    if not isinstance(request, ChatRequest) or not request.tools:
        if isinstance(request, ChatRequest) and isinstance(request.tool_choice, NamedToolChoice):
            raise ApiError(400, "tool_choice names a tool, but there are no tools", "tool_choice")
        return None
    choice = request.tool_choice or "auto"
    if choice == "none":
        return None
    tools = [t.model_dump(exclude_none=True) for t in request.tools]
    forced: list[dict[str, Any]] | None = None
    if choice == "required":
        forced = tools
    elif isinstance(choice, NamedToolChoice):
        forced = [t for t in tools if t["function"]["name"] == choice.function.name]
        if not forced:
            raise ApiError(400, f"no tool is named {choice.function.name!r}", "tool_choice")
    parallel = request.parallel_tool_calls is not False
    return ToolPlan(tools, forced, parallel)


class CompletionRequest(SamplingFields):
    prompt: (
        StrictStr
        | Annotated[list[StrictStr], Field(min_length=1, max_length=1)]
        | Annotated[list[StrictInt], Field(min_length=1)]
    )
    echo: StrictBool | None = None
    suffix: StrictStr | None = None
    best_of: Annotated[StrictInt, Field(ge=1, le=MAX_CHOICES)] | None = None


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
        messages = [_message(m) for m in request.messages]
        plan = parse_tools(request)
        if plan is None:
            return tokenizer.encode_chat(messages)
        if template_takes_tools(tokenizer.template_source):
            return tokenizer.encode_chat(messages, plan.tools)
        return tokenizer.encode_chat(messages_with_tools(messages, plan.tools))
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


def _message(m: ChatMessage) -> Message:
    """A message as chat templates take it (a tool call's arguments as an object)."""
    message: Message = {"role": "system" if m.role == "developer" else m.role, "content": _text(m)}
    if m.tool_calls:
        message["tool_calls"] = [
            {
                "id": c.id,
                "type": "function",
                "function": {
                    "name": c.function.name,
                    "arguments": _json_or_text(c.function.arguments),
                },
            }
            for c in m.tool_calls
        ]
    if m.tool_call_id is not None:
        message["tool_call_id"] = m.tool_call_id
    if m.name is not None:
        message["name"] = m.name
    return message


def _json_or_text(text: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


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
    if fields.functions:
        raise ApiError(400, "functions is not supported: use tools", param="functions")
    if not isinstance(fields, ChatRequest) and getattr(fields, "tools", None):
        raise ApiError(400, "tools need /v1/chat/completions", param="tools")


def parse_grammar(fields: SamplingFields) -> str | None:
    """The grammar the reply must follow (llguidance's form), None for free text: from
    `response_format` (`json_object`, `json_schema`) or a `guided_*` extension.

    Raises:
        ApiError: 400 for a bad schema or for two constraints at once.
    """
    plan = parse_tools(fields)
    if plan is not None and plan.forced is not None:
        # Several calls only when asked outright: a small model forced to call may not stop.
        return forced_call_grammar(plan.forced, fields.parallel_tool_calls is True)  # type: ignore[attr-defined]
    given = [
        name
        for name in ("guided_json", "guided_regex", "guided_choice", "guided_grammar")
        if getattr(fields, name) is not None
    ]
    form = fields.response_format
    if form is not None and form.type != "text":
        given.append("response_format")
    if len(given) > 1:
        raise ApiError(400, f"give one of {', '.join(given)}, not several", param=given[1])
    if not given:
        return None
    param = given[0]
    try:
        if form is not None and param == "response_format":
            return json_schema_grammar(_response_schema(form))
        if fields.guided_json is not None:
            return json_schema_grammar(fields.guided_json)
        if fields.guided_regex is not None:
            return regex_grammar(fields.guided_regex)
        if fields.guided_choice is not None:
            return choice_grammar(fields.guided_choice)
        return lark_grammar(fields.guided_grammar or "")
    except GrammarError as e:
        raise ApiError(400, str(e), param=param) from None


def _response_schema(form: ResponseFormat) -> dict[str, Any]:
    if form.type == "json_object":
        return {"type": "object"}
    if form.json_schema is None:
        raise ApiError(400, "response_format.json_schema is missing", param="response_format")
    return form.json_schema.schema_ or {"type": "object"}


def parse_choices(request: SamplingFields) -> tuple[int, int]:
    """(choices to generate, choices to return): `best_of` and `n`.

    Raises:
        ApiError: 400 for `best_of` < `n`, or `best_of` > `n` streamed (OpenAI's rules).
    """
    n = request.n or 1
    best_of = getattr(request, "best_of", None) or n
    if best_of < n:
        raise ApiError(400, "best_of must be at least n", param="best_of")
    if best_of > n and request.stream:
        raise ApiError(400, "best_of > n cannot be streamed", param="best_of")
    if best_of > MAX_CHOICES:
        raise ApiError(400, f"best_of may be {MAX_CHOICES} at most", param="best_of")
    return best_of, n
