"""`swarm-api`'s HTTP/1.1 server: read requests, check the API key, answer or stream JSON.

A small asyncio server of our own instead of a web framework: the OpenAI API needs a handful of
routes, Content-Length request bodies, JSON replies and server-sent events (sent chunked, so a
connection stays open for the next request). The routes themselves are in `api`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ApiConfig:
    """How the server listens and whom it answers."""

    model_id: str = "smollm2-135m"  # the id /v1/models lists and requests name
    aliases: tuple[str, ...] = ()  # other names requests may use for the model
    api_key: str | None = None  # None: no Authorization header needed
    max_body_bytes: int = 8 * 2**20  # unit: bytes of a request body at most
    read_timeout: float = 60.0  # unit: s to wait for a request's next line or body
    default_max_tokens: int | None = None  # unit: tokens; None: the rest of the context
    max_active: int = 16  # unit: replies generated at once; more wait in a queue
    max_waiting: int = 64  # unit: replies waiting for a turn; past that, 429 with Retry-After


class ApiError(Exception):
    """An error reply in the OpenAI format: `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.headers = headers or {}  # extra HTTP headers, e.g. Retry-After
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.kind = kind or _error_type(status)

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }


def _error_type(status: int) -> str:
    return {
        401: "authentication_error",
        404: "not_found_error",
        503: "service_unavailable",
    }.get(status, "invalid_request_error" if status < 500 else "server_error")


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    keep_alive: bool = True

    def json(self) -> dict[str, Any]:
        try:
            value = json.loads(self.body or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}") from None
        if not isinstance(value, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return value


@dataclass
class Reply:
    """A JSON reply, or a stream of server-sent events when `events` is set."""

    status: int = 200
    body: dict[str, Any] | None = None
    events: AsyncIterator[dict[str, Any]] | None = None
    headers: dict[str, str] = field(default_factory=dict)


Handler = Callable[[Request], Awaitable[Reply]]


async def serve_api(
    handler: Handler,
    config: ApiConfig,
    host: str,
    port: int,
    on_ready: Callable[[str, int], None],
    stop: asyncio.Event,
) -> None:
    """Listen on `host:port` (0: any free port) until `stop` is set; `on_ready(host, port)`."""

    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await _serve_connection(handler, config, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError, ValueError):
            pass  # the client went away, stalled, or sent a line past the stream's limit
        finally:
            writer.close()

    server = await asyncio.start_server(on_connection, host, port, limit=2**16)
    bound = server.sockets[0].getsockname()
    on_ready(bound[0], bound[1])
    async with server:
        await stop.wait()


async def _serve_connection(
    handler: Handler,
    config: ApiConfig,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
) -> None:
    while True:
        try:
            request = await asyncio.wait_for(_read_request(reader, config), config.read_timeout)
        except ApiError as e:
            await _write_json(writer, e.status, e.body(), keep_alive=False)
            return
        if request is None:
            return
        reply = await _answer(handler, config, request)
        if reply.events is None:
            await _write_json(
                writer, reply.status, reply.body or {}, request.keep_alive, reply.headers
            )
        else:
            await _write_events(writer, reply.events)
        if not request.keep_alive:
            return


async def _answer(handler: Handler, config: ApiConfig, request: Request) -> Reply:
    try:
        _check_key(config, request)
        return await handler(request)
    except ApiError as e:
        return Reply(e.status, e.body(), headers=e.headers)
    except Exception as e:  # a bug, not the client's fault: say so, keep serving
        log.exception("answering %s %s", request.method, request.path)
        return Reply(500, ApiError(500, f"internal error: {e}").body())


def _check_key(config: ApiConfig, request: Request) -> None:
    if config.api_key is None:
        return
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    ok = scheme.lower() == "bearer" and hmac.compare_digest(
        token.strip().encode(), config.api_key.encode()
    )
    if not ok:
        raise ApiError(401, "incorrect or missing API key", code="invalid_api_key")


async def _read_request(reader: asyncio.StreamReader, config: ApiConfig) -> Request | None:
    """The next request on the connection; None when the client closed it."""
    line = await reader.readline()
    if not line.strip():
        return None
    parts = line.decode("latin-1").split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise ApiError(400, "malformed request line")
    method, target, version = parts
    headers: dict[str, str] = {}
    while True:
        h = await reader.readline()
        if h in (b"\r\n", b"\n", b""):
            break
        name, sep, value = h.decode("latin-1").partition(":")
        if not sep:
            raise ApiError(400, "malformed header line")
        headers[name.strip().lower()] = value.strip()
    if "chunked" in headers.get("transfer-encoding", "").lower():
        raise ApiError(411, "chunked request bodies are not supported: send Content-Length")
    try:
        length = int(headers.get("content-length", "0"))
    except ValueError:
        raise ApiError(400, "bad Content-Length") from None
    if not 0 <= length <= config.max_body_bytes:
        raise ApiError(413, f"the body must be at most {config.max_body_bytes} bytes")
    body = await reader.readexactly(length) if length else b""
    connection = headers.get("connection", "").lower()
    keep_alive = connection != "close" and (version == "HTTP/1.1" or connection == "keep-alive")
    path = target.split("?", 1)[0]
    return Request(method.upper(), path, headers, body, keep_alive)


def _head(status: int, headers: dict[str, str]) -> bytes:
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def _write_json(
    writer: asyncio.StreamWriter,
    status: int,
    body: dict[str, Any],
    keep_alive: bool,
    extra: dict[str, str] | None = None,
) -> None:
    data = json.dumps(body).encode()
    headers = (extra or {}) | {
        "Content-Type": "application/json",
        "Content-Length": str(len(data)),
        "Connection": "keep-alive" if keep_alive else "close",
    }
    writer.write(_head(status, headers) + data)
    await writer.drain()


async def _write_events(
    writer: asyncio.StreamWriter, events: AsyncIterator[dict[str, Any]]
) -> None:
    """Server-sent events, `data: {json}` each, then `data: [DONE]`, as HTTP chunks."""
    headers = {
        "Content-Type": "text/event-stream",
        "Cache-Control": "no-cache",
        "Transfer-Encoding": "chunked",
        "Connection": "keep-alive",
    }
    writer.write(_head(200, headers))

    async def send(data: str) -> None:
        raw = f"data: {data}\n\n".encode()
        writer.write(f"{len(raw):x}\r\n".encode() + raw + b"\r\n")
        await writer.drain()

    try:
        async for event in events:
            await send(json.dumps(event))
        await send("[DONE]")
        writer.write(b"0\r\n\r\n")
        await writer.drain()
    finally:
        aclose = getattr(events, "aclose", None)
        if aclose is not None:
            await aclose()  # stops the reply's worker when the client went away
