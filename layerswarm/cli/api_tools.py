"""Tool calls: tools into the prompt, the grammar that forces a call, and calls parsed out of
the model's text, per family.

Families and their syntax (each parser is tried in this order on a whole reply):
- Hermes / Qwen 2.5+: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, repeated.
- gpt-oss (harmony): `...<|channel|>commentary to=functions.NAME ... <|message|>{...}<|call|>`.
- Llama 3.x: `<|python_tag|>`? then `{"name": ..., "parameters": {...}}`, `;`-separated.
- the fallback: a reply that is, as a whole, JSON naming a known tool with its arguments.

A model whose chat template takes no `tools` (SmolLM2's) gets them in the system prompt, with
Hermes' instructions, and its earlier calls and their results written in Hermes' syntax.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from layerswarm.routing.grammar import lark_grammar

HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
HARMONY_CALL = re.compile(
    r"to=functions\.([\w.-]+)[^<]*(?:<\|constrain\|>\s*\w+\s*)?<\|message\|>(.*?)(?:<\|call\|>|$)",
    re.DOTALL,
)
LLAMA_TAG = "<|python_tag|>"


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text
    id: str = ""

    def __post_init__(self) -> None:
        if not self.id:
            object.__setattr__(self, "id", "call_" + uuid.uuid4().hex[:24])

    def json(self, index: int) -> dict[str, Any]:
        """As OpenAI's `message.tool_calls[index]`."""
        function = {"name": self.name, "arguments": self.arguments}
        return {"index": index, "id": self.id, "type": "function", "function": function}


def tool_names(tools: list[dict[str, Any]]) -> list[str]:
    return [str(t["function"]["name"]) for t in tools]


def parse_tool_calls(text: str, names: list[str]) -> tuple[str, list[ToolCall]]:
    """The reply's text before any call, and the calls it makes (`[]`: none, all text)."""
    for parser in (_hermes, _harmony, _llama, _whole_json):
        found = parser(text, names)
        if found is not None:
            return found
    return text, []


def _call(obj: object, names: list[str]) -> ToolCall | None:
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # already JSON text, as some models write it
        return ToolCall(str(obj["name"]), args)
    return ToolCall(str(obj["name"]), json.dumps(args))


def _loads(text: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def _hermes(text: str, names: list[str]) -> tuple[str, list[ToolCall]] | None:
    at = text.find("<tool_call>")
    if at == -1:
        return None
    calls = [_call(_loads(body), names) for body in HERMES_CALL.findall(text[at:])]
    found = [c for c in calls if c is not None]
    return (text[:at].strip(), found) if found else None


def _harmony(text: str, names: list[str]) -> tuple[str, list[ToolCall]] | None:
    found = [
        ToolCall(name, body.strip())
        for name, body in HARMONY_CALL.findall(text)
        if name in names and _loads(body.strip()) is not None
    ]
    if not found:
        return None
    return text[: text.find("to=functions.")].split("<|channel|>")[0].strip(), found


def _llama(text: str, names: list[str]) -> tuple[str, list[ToolCall]] | None:
    body = text.strip()
    if body.startswith(LLAMA_TAG):
        body = body[len(LLAMA_TAG) :]
    calls = [_call(_loads(part), names) for part in body.split(";") if part.strip()]
    if calls and all(c is not None for c in calls):
        return "", [c for c in calls if c is not None]
    return None


def _whole_json(text: str, names: list[str]) -> tuple[str, list[ToolCall]] | None:
    obj = _loads(text.strip())
    items = obj if isinstance(obj, list) else [obj]
    calls = [_call(item, names) for item in items]
    if calls and all(c is not None for c in calls):
        return "", [c for c in calls if c is not None]
    return None


# --- the prompt ---------------------------------------------------------------------------------

HERMES_SYSTEM = (
    "You are a function calling AI model. You are provided with function signatures within "
    "<tools></tools> XML tags. You may call one or more functions to assist with the user query. "
    "Here are the available tools: <tools>\n{tools}\n</tools>\nFor each function call, return a "
    "json object with function name and arguments within <tool_call></tool_call> XML tags:\n"
    '<tool_call>\n{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)


def template_takes_tools(template: str | None) -> bool:
    return template is not None and "tools" in template


def messages_with_tools(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """For a template that takes no `tools`: the tools in the system prompt (Hermes' way), and
    earlier calls and their results as Hermes' text."""
    described = "\n".join(json.dumps(t) for t in tools)
    system = HERMES_SYSTEM.format(tools=described)
    out: list[dict[str, Any]] = []
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            calls = "\n".join(
                "<tool_call>\n"
                + json.dumps({"name": c["function"]["name"], "arguments": _args(c)})
                + "\n</tool_call>"
                for c in m["tool_calls"]
            )
            out.append({"role": "assistant", "content": ((m.get("content") or "") + calls)})
        elif m["role"] == "tool":
            out.append(
                {
                    "role": "user",
                    "content": f"<tool_response>\n{m.get('content') or ''}\n</tool_response>",
                }
            )
        else:
            out.append({"role": m["role"], "content": m.get("content") or ""})
    if out and out[0]["role"] == "system":
        out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + system}
    else:
        out.insert(0, {"role": "system", "content": system})
    return out


def _args(call: dict[str, Any]) -> object:
    raw = call["function"].get("arguments") or "{}"
    parsed = _loads(raw) if isinstance(raw, str) else raw
    return parsed if parsed is not None else raw


# --- forcing a call -----------------------------------------------------------------------------


def forced_call_grammar(tools: list[dict[str, Any]], parallel: bool) -> str:
    """A grammar of one Hermes call (several with `parallel`) to one of `tools`, its arguments
    following the tool's schema: how `tool_choice` "required" or a named tool is kept."""
    options = [
        {
            "type": "object",
            "properties": {
                "name": {"const": t["function"]["name"]},
                "arguments": t["function"].get("parameters") or {"type": "object"},
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in tools
    ]
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    options_json = json.dumps(
        schema
        | {
            "x-guidance": {
                "whitespace_flexible": False,
                "item_separator": ", ",
                "key_separator": ": ",
            }
        }
    )
    repeat = "+" if parallel else ""
    lark = (
        f"start: call{repeat}\n"
        f'call: "<tool_call>\\n" body "\\n</tool_call>"\n'
        f"body: %json {options_json}\n"
    )
    return lark_grammar(lark)


# --- streaming ----------------------------------------------------------------------------------

HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"


class ToolStream:
    """A reply's text as it streams, split into content to show now and calls as each ends.

    Content streams as it comes, less a tail that could begin `<tool_call>`. A Hermes call is
    sent when its `</tool_call>` arrives. A reply that opens like JSON or Llama's tag may be a
    call written bare: it is held to its end, then parsed whole.
    """

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.text = ""  # everything so far
        self.sent = 0  # characters of `text` already sent as content or calls
        self.bare = False  # the reply may be a bare call: hold it all
        self.calls = 0  # calls parsed out so far

    def push(self, piece: str) -> list[str | ToolCall]:
        """What to send now of the text `piece` adds: content, and calls that ended."""
        self.text += piece
        if self.bare:
            return []
        if self.sent == 0:
            head = self.text.lstrip()
            if head[:1] in ("{", "[") or head.startswith(LLAMA_TAG):
                self.bare = bool(head)
                return []
            if not head or LLAMA_TAG.startswith(head):  # nothing yet, or maybe the tag
                return []
        return self._scan(final=False)

    def finish(self) -> list[str | ToolCall]:
        """What is left to send at the reply's end."""
        if self.bare:
            content, calls = parse_tool_calls(self.text, self.names)
            self.calls += len(calls)
            return [*([content] if content else []), *calls] if calls else [self.text]
        return self._scan(final=True)

    def _scan(self, final: bool) -> list[str | ToolCall]:
        out: list[str | ToolCall] = []
        while True:
            rest = self.text[self.sent :]
            at = rest.find(HERMES_OPEN)
            if at == -1:
                ready = len(rest) - (0 if final else _partial_suffix(rest, HERMES_OPEN))
                self._content(out, rest[:ready])
                self.sent += ready
                return out
            self._content(out, rest[:at])
            end = rest.find(HERMES_CLOSE, at)
            if end == -1 and not final:  # a call still arriving
                self.sent += at
                return out
            block = rest[at : end + len(HERMES_CLOSE)] if end != -1 else rest[at:]
            _, calls = parse_tool_calls(block, self.names)
            out.extend(calls or [block])
            self.calls += len(calls)
            self.sent += at + len(block)

    def _content(self, out: list[str | ToolCall], text: str) -> None:
        if text and (self.calls == 0 or text.strip()):  # no blank lines between calls
            out.append(text)


def _partial_suffix(text: str, marker: str) -> int:
    """How many trailing characters of `text` could begin `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0
