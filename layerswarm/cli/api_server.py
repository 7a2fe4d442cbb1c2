"""`swarm-api`'s HTTP server: Starlette on uvicorn (h11), with the limits a public port needs.

Why Starlette on uvicorn rather than aiohttp: vLLM, SGLang and Parallax serve their OpenAI APIs
this way, so clients and proxies meet a server they know; pydantic (which checks requests'
OpenAI schema) and Starlette's streaming responses fit the API as it is. Neither server enforces
everything a port open to strangers needs, so what each lacks is added here. Read in the
installed sources (uvicorn 0.54.0, h11 0.16.0):

- uvicorn arms no timer when a connection opens, and its keep-alive timer is cancelled by any
  byte received (`H11Protocol.data_received`): an idle connection, or a slowloris client that
  sends a byte now and then, is held forever. `GuardedProtocol` adds a deadline for a
  request's head, from the connection's start and from the first byte of each later request.
- uvicorn accepts every connection; `limit_concurrency` answers 503 only once a request's head
  has come. `GuardedProtocol` caps connections in all and per client address when they open.
- h11 bounds a request's head to `max_incomplete_event_size` bytes (a 400 past it) only while
  it arrives in pieces (a head that came whole in one read passes), and counts no headers;
  `guard` answers 431 past `max_headers` or `max_head_bytes`.
- httptools (uvicorn's "auto" choice when installed) bounds neither: the protocol is always h11.
- Authentication is checked by `guard` from the head alone, before the body is read; the body
  is then read in `read_json` up to `max_body_bytes`, within `read_timeout`.
(aiohttp, read the same way, bounds line and field sizes and headers' count, but has no
deadline for reading a request's head either.)
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import h11
import uvicorn
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from layerswarm.metrics import HTTP_REFUSALS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ApiConfig:
    """How the server listens and whom it answers."""

    model_id: str = "smollm2-135m"  # the id /v1/models lists and requests name
    aliases: tuple[str, ...] = ()  # other names requests may use for the model
    api_key: str | None = None  # None: no Authorization header needed
    max_body_bytes: int = 8 * 2**20  # unit: bytes of a request body at most
    max_headers: int = 64  # unit: header fields of a request at most (431 past it)
    max_head_bytes: int = 16 * 2**10  # unit: bytes of a request line and headers (400 past it)
    max_connections: int = 1024  # unit: open connections at most; more are refused (503)
    max_connections_per_ip: int = 64  # unit: open connections from one address at most
    head_timeout: float = 10.0  # unit: s for a request's line and headers to arrive (408)
    read_timeout: float = 60.0  # unit: s for a request's body to arrive
    keep_alive_timeout: int = 30  # unit: s an idle connection stays open between requests
    default_max_tokens: int | None = None  # unit: tokens; None: the rest of the context
    max_active: int = 16  # unit: replies generated at once; more wait in a queue
    max_waiting: int = 64  # unit: replies waiting for a turn; past that, 429 with Retry-After
    tls_cert: str | None = None  # a PEM certificate (chain): serve HTTPS
    tls_key: str | None = None  # its PEM private key


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

    def told(self) -> ApiError:
        """Log why this error is sent (every 4xx and 5xx says why in the log); returns it."""
        level = logging.ERROR if self.status >= 500 and self.status != 503 else logging.WARNING
        log.log(level, "answered %d %s: %s", self.status, self.code or self.kind, self.message)
        return self

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        self.told()
        return JSONResponse(self.body(), self.status, headers=self.headers)

    def raw(self, close: bool = True) -> bytes:
        """The whole HTTP/1.1 response, for the protocol level (no request cycle to answer)."""
        self.told()
        data = json.dumps(self.body()).encode()
        head = [f"HTTP/1.1 {self.status} {_PHRASES.get(self.status, 'Error')}"]
        head += [f"{k}: {v}" for k, v in self.headers.items()]
        head += ["Content-Type: application/json", f"Content-Length: {len(data)}"]
        head += ["Connection: close"] if close else []
        return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + data


_PHRASES = {408: "Request Timeout", 503: "Service Unavailable"}


def _error_type(status: int) -> str:
    return {
        401: "authentication_error",
        404: "not_found_error",
        503: "service_unavailable",
    }.get(status, "invalid_request_error" if status < 500 else "server_error")


# --- the connection level ------------------------------------------------------------------------


class GuardedProtocol(H11Protocol):
    """uvicorn's h11 protocol, with connection caps and a deadline for each request's head."""

    limits: ApiConfig = ApiConfig()  # set on the subclass `guarded_protocol` makes

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer: asyncio.TimerHandle | None = None
        refusal = self._over_cap()
        if refusal is not None:
            HTTP_REFUSALS.labels(reason="connections").inc()
            transport.write(refusal.raw())
            transport.close()
            return
        self._arm_head_timer()

    def _over_cap(self) -> ApiError | None:
        limits = self.limits
        others = [c for c in self.connections if c is not self]
        busy = {"Retry-After": "5"}
        if len(others) >= limits.max_connections:
            return ApiError(
                503, "too many connections: retry later", code="overloaded", headers=busy
            )
        ip = self.client[0] if self.client else None
        mine = sum(1 for c in others if _address(c) == ip)
        if ip is not None and mine >= limits.max_connections_per_ip:
            return ApiError(
                503,
                f"too many connections from {ip} (at most {limits.max_connections_per_ip})",
                code="overloaded",
                headers=busy,
            )
        return None

    def _arm_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.limits.head_timeout, self._head_late)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_late(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        HTTP_REFUSALS.labels(reason="head_timeout").inc()
        late = ApiError(
            408,
            f"the request's headers did not arrive within {self.limits.head_timeout:g} s",
            code="request_timeout",
        )
        self.transport.write(late.raw())
        self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE:  # the first bytes of a request's head
            self._arm_head_timer()
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the head is in (or the connection broke)
            self._disarm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)


def _address(connection: object) -> str | None:
    client = getattr(connection, "client", None)
    return str(client[0]) if client else None


def guarded_protocol(config: ApiConfig) -> type[GuardedProtocol]:
    """`GuardedProtocol` with `config`'s limits (uvicorn makes one instance per connection)."""
    return type("GuardedProtocol", (GuardedProtocol,), {"limits": config})


# --- the request level ---------------------------------------------------------------------------

OPEN_PATHS = frozenset({"/", "/chat", "/favicon.ico"})  # static pages; their data needs the key
OPEN_PREFIXES = ("/static/",)


def guard(app: ASGIApp, config: ApiConfig) -> ASGIApp:
    """ASGI middleware: the header count, the API key and the announced body size, all read
    from the request's head before any of its body is."""

    async def guarded(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        try:
            _check_head(scope, config)
        except ApiError as e:
            HTTP_REFUSALS.labels(reason=str(e.status)).inc()
            # The body, if any, stays unread: the connection cannot carry another request.
            e.headers["Connection"] = "close"
            await e.response()(scope, receive, send)
            return
        await app(scope, receive, send)

    return guarded


def _check_head(scope: Scope, config: ApiConfig) -> None:
    headers: list[tuple[bytes, bytes]] = scope["headers"]
    if len(headers) > config.max_headers:
        raise ApiError(431, f"a request may carry at most {config.max_headers} headers")
    # h11 bounds only a head that arrives in pieces; one that came whole is measured here.
    if sum(len(k) + len(v) + 4 for k, v in headers) > config.max_head_bytes:
        raise ApiError(431, f"a request's headers may take at most {config.max_head_bytes} bytes")
    path = scope["path"]
    if config.api_key is not None and not (path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)):
        given = dict(headers).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = given.partition(" ")
        ok = scheme.lower() == "bearer" and hmac.compare_digest(
            token.strip().encode(), config.api_key.encode()
        )
        if not ok:
            raise ApiError(401, "incorrect or missing API key", code="invalid_api_key")
    length = dict(headers).get(b"content-length")
    if length is not None:
        try:
            announced = int(length)
        except ValueError:
            raise ApiError(400, "bad Content-Length") from None
        if announced > config.max_body_bytes:
            raise ApiError(413, f"the body must be at most {config.max_body_bytes} bytes")


async def read_json(request: Request, config: ApiConfig) -> dict[str, Any]:
    """The request's body as a JSON object, read up to `max_body_bytes` within `read_timeout`.

    Raises:
        ApiError: 413 for a longer body, 408 for a slow one, 400 for one that is not an object.
    """

    async def read() -> bytes:
        parts, size = [], 0
        async for part in request.stream():
            size += len(part)
            if size > config.max_body_bytes:
                raise ApiError(413, f"the body must be at most {config.max_body_bytes} bytes")
            parts.append(part)
        return b"".join(parts)

    try:
        body = await asyncio.wait_for(read(), config.read_timeout)
    except TimeoutError:
        raise ApiError(408, "the request's body was too slow", code="request_timeout") from None
    except ClientDisconnect:
        raise ApiError(400, "the client went away") from None
    try:
        value = json.loads(body or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return value


# --- serving -------------------------------------------------------------------------------------


class _Server(uvicorn.Server):
    """uvicorn's server without its signal handling: `serve_app` handles SIGTERM itself (uvicorn
    re-raises a caught signal once stopped, which would end the process with -SIGTERM)."""

    def capture_signals(self):  # type: ignore[no-untyped-def]
        import contextlib

        return contextlib.nullcontext()


def open_listener(host: str, port: int) -> socket.socket:
    """A listening TCP socket on `host:port` (0: any free port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


async def serve_app(
    app: ASGIApp,
    config: ApiConfig,
    host: str,
    port: int,
    on_ready: Callable[[str, int], None],
    stop: asyncio.Event,
) -> None:
    """Serve `app` (wrapped in `guard`) on `host:port` until `stop` is set."""
    sock = open_listener(host, port)
    server = _Server(
        uvicorn.Config(
            guard(app, config),
            http=guarded_protocol(config),
            ws="none",
            lifespan="off",
            log_config=None,  # a library never configures logging; ours is set in cli
            access_log=False,
            h11_max_incomplete_event_size=config.max_head_bytes,
            timeout_keep_alive=config.keep_alive_timeout,
            timeout_graceful_shutdown=5,
            ssl_certfile=config.tls_cert,
            ssl_keyfile=config.tls_key,
            ssl_version=ssl.PROTOCOL_TLS_SERVER,
        )
    )
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                await task  # startup failed: its error
                raise RuntimeError("the HTTP server stopped before it started")
            await asyncio.sleep(0.02)
        bound = sock.getsockname()
        on_ready(bound[0], bound[1])
        waiter = asyncio.ensure_future(stop.wait())
        await asyncio.wait([waiter, task], return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
    finally:
        server.should_exit = True
        await task
        sock.close()
