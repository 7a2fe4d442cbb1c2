"""`swarm-api`: serve a model through the swarm with an OpenAI-compatible HTTP API.

swarm-api --model M --peer HOST:PORT --peer ... --port 8000           # these peers
swarm-api --model M --local --api-key SECRET                          # every layer here

Routes: GET /v1/models, POST /v1/chat/completions and /v1/completions (with "stream": true as
server-sent events); the dashboard at `/` and `/chat`, Prometheus metrics at `/metrics`. Once
listening it prints `LAYERSWARM-API-READY {"host", "port", "url", "model"}` on stdout. Every
reply runs on the client's one event loop over its own pipeline, so requests run concurrently;
the HTTP server and its limits are in `api_server`, the request schema in `api_params`, the
replies in `api_replies`, the dashboard in `dashboard`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import time
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from layerswarm.cli.api_complete import complete
from layerswarm.cli.api_params import ChatRequest, CompletionRequest, SamplingFields, validate
from layerswarm.cli.api_replies import Admission
from layerswarm.cli.api_server import ApiConfig, ApiError, read_json, serve_app
from layerswarm.cli.common import run_main, setup_logging
from layerswarm.cli.dashboard import ClientSource, InFlight, dashboard_routes
from layerswarm.cli.swarm_flags import add_swarm_arguments
from layerswarm.metrics import note_event
from layerswarm.routing.generate import Generator

log = logging.getLogger(__name__)
READY_PREFIX = "LAYERSWARM-API-READY "  # then one line of JSON


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="swarm-api", description="Serve a model with an OpenAI-compatible HTTP API."
    )
    add_swarm_arguments(ap)  # swarm-chat's too: both commands find a swarm the same way
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
    ap.add_argument(
        "--max-connections",
        type=int,
        default=ApiConfig.max_connections,
        help="open connections at most; more are refused with a 503 (default %(default)s)",
    )
    ap.add_argument(
        "--max-connections-per-ip",
        type=int,
        default=ApiConfig.max_connections_per_ip,
        help="open connections from one address at most (default %(default)s)",
    )
    ap.add_argument(
        "--max-headers",
        type=int,
        default=ApiConfig.max_headers,
        help="headers of a request at most; more: 431 (default %(default)s)",
    )
    ap.add_argument(
        "--head-timeout",
        type=float,
        default=ApiConfig.head_timeout,
        metavar="S",
        help="a request's headers must arrive within this; else 408 (default %(default)s)",
    )
    ap.add_argument("--tls-cert", metavar="PEM", help="serve HTTPS with this certificate (chain)")
    ap.add_argument("--tls-key", metavar="PEM", help="the certificate's private key")
    return ap


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Our flags, over swarm-chat's defaults for the rest, so `open_generator` finds every
    attribute it reads even when swarm-chat gains a flag."""
    from layerswarm.cli.chat import build_parser as chat_parser

    defaults = vars(chat_parser().parse_args([]))
    return argparse.Namespace(**(defaults | vars(build_parser().parse_args(argv))))


# --- the routes ---------------------------------------------------------------------------------


class OpenAiRoutes:
    """The OpenAI API over one Generator (which opens a pipeline per reply, so is shared)."""

    def __init__(self, gen: Generator, config: ApiConfig) -> None:
        self.gen = gen
        self.config = config
        self.created = int(time.time())
        self.admission = Admission(config.max_active, config.max_waiting)

    def routes(self) -> list[Route]:
        return [
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/models/{name:path}", self.model, methods=["GET"]),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/completions", self.completion, methods=["POST"]),
        ]

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self.model_card()]})

    async def model(self, request: Request) -> Response:
        self.check_model(request.path_params["name"])
        return JSONResponse(self.model_card())

    async def chat(self, request: Request) -> Response:
        body = validate(ChatRequest, await read_json(request, self.config))
        return await self.complete(body)

    async def completion(self, request: Request) -> Response:
        body = validate(CompletionRequest, await read_json(request, self.config))
        return await self.complete(body)

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

    async def complete(self, body: SamplingFields) -> Response:
        self.check_model(body.model)
        return await complete(self.gen, self.config, self.admission, body)


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
    if min(args.max_connections, args.max_connections_per_ip, args.max_headers) < 1:
        raise SystemExit("error: connection and header limits must be >= 1")
    if bool(args.tls_cert) != bool(args.tls_key):
        raise SystemExit("error: --tls-cert and --tls-key go together")
    return ApiConfig(
        model_id=name,
        aliases=(model,),
        api_key=key,
        default_max_tokens=args.max_tokens,
        max_active=args.max_active,
        max_waiting=args.max_waiting,
        max_connections=args.max_connections,
        max_connections_per_ip=args.max_connections_per_ip,
        max_headers=args.max_headers,
        head_timeout=args.head_timeout,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
    )


def ready_line(host: str, port: int, model: str, tls: bool = False) -> str:
    url = f"{'https' if tls else 'http'}://{host}:{port}/v1"
    return READY_PREFIX + json.dumps({"host": host, "port": port, "url": url, "model": model})


def build_app(gen: Generator, config: ApiConfig) -> Starlette:
    """The OpenAI routes, the dashboard and `/metrics`, with errors in the OpenAI format."""
    source = ClientSource(gen, config.model_id)  # before InFlight wraps the generator
    flights = InFlight(gen)
    routes = [*OpenAiRoutes(gen, config).routes(), *dashboard_routes(source, flights)]

    async def api_error(request: Request, e: Exception) -> Response:
        assert isinstance(e, ApiError)
        return e.response()

    async def http_error(request: Request, e: Exception) -> Response:
        assert isinstance(e, HTTPException)
        what = f"no route {request.method} {request.url.path}"
        return ApiError(e.status_code, what, code="unknown_url").response()

    async def internal(request: Request, e: Exception) -> Response:
        log.error("answering %s %s", request.method, request.url.path, exc_info=e)
        return ApiError(500, f"internal error: {e}").response()

    handlers = {ApiError: api_error, HTTPException: http_error, Exception: internal}
    return Starlette(routes=routes, exception_handlers=handlers)


async def serve(gen: Generator, config: ApiConfig, host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def on_ready(bound_host: str, bound_port: int) -> None:
        tls = config.tls_cert is not None
        print(ready_line(bound_host, bound_port, config.model_id, tls), flush=True)

    await serve_app(build_app(gen, config), config, host, port, on_ready, stop)


def on_swarm_event(text: str) -> None:
    """The client's news (reroutes, peers leaving): to the log and to the dashboard."""
    log.info("%s", text)
    if not text.startswith(("rerouted", "banned")):  # the routing noted those already
        note_event("leave" if "leaving" in text else "info", text)


def main(argv: list[str] | None = None) -> None:
    run_main(_main, argv)


def _main(argv: list[str] | None) -> None:
    from layerswarm.cli.chat import close_generator, open_generator

    args = parse_args(argv)
    setup_logging(args.verbose)
    config = api_config(args)
    gen = open_generator(args, on_event=on_swarm_event)
    try:
        asyncio.run(serve(gen, config, args.host, args.port))
    finally:
        close_generator(gen)


if __name__ == "__main__":
    main()
