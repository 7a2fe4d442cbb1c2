"""`swarm-api`: serve a model through the swarm with an OpenAI-compatible HTTP API.

swarm-api --model M --peer HOST:PORT --peer ... --port 8000           # these peers
swarm-api --model M --local --api-key SECRET                          # every layer here

Routes: GET /v1/models, POST /v1/chat/completions and /v1/completions (with "stream": true as
server-sent events). Once listening it prints `LAYERSWARM-API-READY {"host", "port", "url",
"model"}` on stdout. Each reply runs in a worker thread over its own pipeline, so requests run
concurrently; the HTTP side is in `api_server`, the checks of a request in `api_params`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from layerswarm.cli.api_params import parse_prompt, parse_sampling
from layerswarm.cli.api_replies import Admission, Finished, admitted, generate
from layerswarm.cli.api_server import ApiConfig, ApiError, Reply, Request, serve_api
from layerswarm.cli.common import run_main, setup_logging
from layerswarm.errors import (
    ContextOverflow,
    LayerswarmError,
    ModelFormatError,
    NoRouteError,
    PeerUnavailable,
)
from layerswarm.routing.generate import Generator
from layerswarm.routing.session import SwarmBusy

log = logging.getLogger(__name__)
READY_PREFIX = "LAYERSWARM-API-READY "  # then one line of JSON
# The flags of swarm-chat that say which model and which swarm; the rest are chat-only.
SWARM_FLAGS = (
    "model",
    "local",
    "peer",
    "dtype",
    "mdns_interface",
    "bootstrap",
    "swarm_key",
    "insecure_plaintext",
    "speculate",
    "draft_model",
    "draft_quant",
    "verbose",
)


def build_parser() -> argparse.ArgumentParser:
    from layerswarm.cli.chat import build_parser as chat_parser

    ap = argparse.ArgumentParser(
        prog="swarm-api", description="Serve a model with an OpenAI-compatible HTTP API."
    )
    # Copied from swarm-chat so both commands find a swarm the same way (argparse has no public
    # way to take some of another parser's arguments).
    where = ap.add_mutually_exclusive_group()
    for action in chat_parser()._actions:
        if action.dest in ("local", "peer"):
            where._add_action(action)
        elif action.dest in SWARM_FLAGS:
            ap._add_action(action)
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on")
    ap.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free one)")
    ap.add_argument(
        "--api-key", help="require `Authorization: Bearer KEY` (default: $LAYERSWARM_API_KEY)"
    )
    ap.add_argument("--served-model-name", help="the model id clients name (default: --model's)")
    ap.add_argument(
        "--max-tokens", type=int, default=None, help="a reply's tokens when a request says none"
    )
    ap.add_argument(
        "--max-active", type=int, default=16, help="replies generated at once (default 16)"
    )
    ap.add_argument(
        "--max-waiting",
        type=int,
        default=64,
        help="replies queued beyond those; past that, 429 with Retry-After (default 64)",
    )
    return ap


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Our flags, over swarm-chat's defaults for the rest, so `open_generator` finds every
    attribute it reads even when swarm-chat gains a flag."""
    from layerswarm.cli.chat import build_parser as chat_parser

    defaults = vars(chat_parser().parse_args([]))
    return argparse.Namespace(**(defaults | vars(build_parser().parse_args(argv))))


def as_api_error(e: Exception) -> ApiError:
    """Our errors as the HTTP status and OpenAI error body a client understands."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, ContextOverflow):
        return ApiError(400, str(e), code="context_length_exceeded")
    if isinstance(e, SwarmBusy):
        return ApiError(429, str(e), code="rate_limit_exceeded", headers={"Retry-After": "5"})
    if isinstance(e, NoRouteError | PeerUnavailable):
        return ApiError(503, f"the swarm cannot serve this now: {e}", code="no_route")
    if isinstance(e, ModelFormatError | ValueError):
        return ApiError(400, str(e))
    if isinstance(e, LayerswarmError):
        return ApiError(502, f"the swarm failed: {e}", code="swarm_error")
    raise e


# --- the routes ---------------------------------------------------------------------------------


class OpenAiRoutes:
    """The OpenAI API over one Generator (which opens a pipeline per reply, so is shared)."""

    def __init__(self, gen: Generator, config: ApiConfig) -> None:
        self.gen = gen
        self.config = config
        self.created = int(time.time())
        self.admission = Admission(config.max_active, config.max_waiting)

    async def __call__(self, request: Request) -> Reply:
        route = (request.method, request.path.rstrip("/"))
        if route == ("GET", "/v1/models"):
            return Reply(body={"object": "list", "data": [self.model_card()]})
        if route[0] == "GET" and route[1].startswith("/v1/models/"):
            self.check_model(route[1].removeprefix("/v1/models/"))
            return Reply(body=self.model_card())
        if route == ("POST", "/v1/chat/completions"):
            return await self.complete(request.json(), chat=True)
        if route == ("POST", "/v1/completions"):
            return await self.complete(request.json(), chat=False)
        raise ApiError(404, f"no route {request.method} {request.path}", code="unknown_url")

    def model_card(self) -> dict[str, Any]:
        return {
            "id": self.config.model_id,
            "object": "model",
            "created": self.created,
            "owned_by": "layerswarm",
            "max_model_len": self.gen.head.config.max_position_embeddings,
        }

    def check_model(self, name: object) -> None:
        if name is None:
            raise ApiError(400, "you must name the model", param="model")
        if name != self.config.model_id and name not in self.config.aliases:
            raise ApiError(
                404,
                f"the model {name!r} does not exist; this server serves {self.config.model_id!r}",
                param="model",
                code="model_not_found",
            )

    async def complete(self, body: dict[str, Any], chat: bool) -> Reply:
        self.check_model(body.get("model"))
        limit = self.gen.head.config.max_position_embeddings
        try:
            prompt = parse_prompt(self.gen.tokenizer, body, chat)
            sampling = parse_sampling(body, len(prompt), limit, self.config.default_max_tokens)
        except (ValueError, LayerswarmError) as e:
            raise as_api_error(e) from None
        if len(prompt) >= limit:
            raise ApiError(
                400,
                f"the prompt has {len(prompt)} tokens; the model's context holds {limit}",
                param="messages" if chat else "prompt",
                code="context_length_exceeded",
            )
        shape = ReplyShape(chat, self.config.model_id, len(prompt))
        await self.admission.enter()
        pieces = admitted(self.admission, generate(self.gen, prompt, sampling))
        if not body.get("stream"):
            return Reply(body=await self.collect(pieces, shape))
        try:  # wait for the first piece, so that a failure to start gets its own status
            first = await anext(pieces)
        except Exception as e:
            await pieces.aclose()  # type: ignore[attr-defined]
            raise as_api_error(e) from None
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return Reply(events=stream_events(first, pieces, shape, include_usage))

    async def collect(
        self, pieces: AsyncIterator[str | Finished], shape: ReplyShape
    ) -> dict[str, Any]:
        text: list[str] = []
        try:
            async for item in pieces:
                if isinstance(item, Finished):
                    return shape.whole("".join(text), item)
                text.append(item)
        except Exception as e:
            raise as_api_error(e) from None
        finally:  # frees the reply's turn at once, not when the iterator is collected
            await pieces.aclose()  # type: ignore[attr-defined]
        raise ApiError(500, "the reply ended without finishing")


@dataclass(frozen=True)
class ReplyShape:
    """The JSON of replies and chunks, chat or plain completion."""

    chat: bool
    model: str
    prompt_tokens: int
    id: str = ""
    created: int = 0

    def __post_init__(self) -> None:
        prefix = "chatcmpl-" if self.chat else "cmpl-"
        object.__setattr__(self, "id", prefix + uuid.uuid4().hex)
        object.__setattr__(self, "created", int(time.time()))

    def envelope(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def usage(self, done: Finished) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": done.completion_tokens,
            "total_tokens": self.prompt_tokens + done.completion_tokens,
        }

    def whole(self, text: str, done: Finished) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "finish_reason": done.reason, "logprobs": None}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        obj = "chat.completion" if self.chat else "text_completion"
        return self.envelope(obj) | {"choices": [choice], "usage": self.usage(done)}

    def chunk(self, text: str | None, reason: str | None = None) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "finish_reason": reason, "logprobs": None}
        if self.chat:
            choice["delta"] = {} if text is None else {"content": text}
        else:
            choice["text"] = text or ""
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return self.envelope(obj) | {"choices": [choice]}


async def stream_events(
    first: str | Finished,
    pieces: AsyncIterator[str | Finished],
    shape: ReplyShape,
    include_usage: bool,
) -> AsyncIterator[dict[str, Any]]:
    """The chunks of a streamed reply; a failure mid-reply becomes an error event."""
    if shape.chat:
        yield shape.chunk("") | {
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]
        }
    item = first
    try:
        while True:
            if isinstance(item, Finished):
                yield shape.chunk(None, item.reason)
                if include_usage:
                    yield shape.envelope(shape.chunk(None)["object"]) | {
                        "choices": [],
                        "usage": shape.usage(item),
                    }
                return
            yield shape.chunk(item)
            item = await anext(pieces)
    except Exception as e:
        yield as_api_error(e).body()
    finally:
        await pieces.aclose()  # type: ignore[attr-defined]


# --- the command --------------------------------------------------------------------------------


def api_config(args: argparse.Namespace) -> ApiConfig:
    import os

    model = str(args.model)
    name = args.served_model_name or (Path(model).name if Path(model).exists() else model)
    key = args.api_key or os.environ.get("LAYERSWARM_API_KEY") or None
    if args.max_tokens is not None and args.max_tokens < 1:
        raise SystemExit("error: --max-tokens must be >= 1")
    if args.max_active < 1 or args.max_waiting < 0:
        raise SystemExit("error: --max-active must be >= 1 and --max-waiting >= 0")
    return ApiConfig(
        model_id=name,
        aliases=(model,),
        api_key=key,
        default_max_tokens=args.max_tokens,
        max_active=args.max_active,
        max_waiting=args.max_waiting,
    )


def ready_line(host: str, port: int, model: str) -> str:
    url = f"http://{host}:{port}/v1"
    return READY_PREFIX + json.dumps({"host": host, "port": port, "url": url, "model": model})


async def serve(gen: Generator, config: ApiConfig, host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)

    def on_ready(bound_host: str, bound_port: int) -> None:
        print(ready_line(bound_host, bound_port, config.model_id), flush=True)

    await serve_api(OpenAiRoutes(gen, config), config, host, port, on_ready, stop)


def main(argv: list[str] | None = None) -> None:
    run_main(_main, argv)


def _main(argv: list[str] | None) -> None:
    from layerswarm.cli.chat import close_generator, open_generator

    args = parse_args(argv)
    setup_logging(args.verbose)
    config = api_config(args)
    gen = open_generator(args)
    try:
        asyncio.run(serve(gen, config, args.host, args.port))
    finally:
        close_generator(gen)


if __name__ == "__main__":
    main()
