"""The web dashboard: static pages (no build step) fed by one JSON endpoint, `/dashboard/state`.

`swarm-api` serves it at `/` beside the OpenAI API, reading the swarm as its client sees it
(live connections, bans, the replies in flight); `swarm-peer status --serve PORT` serves it
without an API, reading the peers' signed records. The pages are public, their data is not:
with an API key, the page asks for it once and sends it as a Bearer token (`api_server.guard`).
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from layerswarm.cli.status import reach as record_reach
from layerswarm.metrics import EVENTS, TOKEN_RATE, note_event
from layerswarm.routing.generate import Generator, Pipeline
from layerswarm.routing.pipeline import Prefix, cached_tokens, fork_pipeline
from layerswarm.swarm.records import PeerRecord

STATIC = Path(__file__).with_name("static")
SHORT_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


class SwarmSource(Protocol):
    """What the dashboard reads: the model, and a row per peer (see `peer_row`)."""

    model: str
    num_layers: int

    async def peers(self) -> list[dict[str, Any]]: ...


def peer_row(
    peer_id: str,
    address: str,
    span: tuple[int, int],
    *,
    state: str = "live",
    device: str = "",
    dtype: str = "",
    quant: str = "none",
    memory_free: int = 0,
    memory_total: int = 0,
    steps_per_s_per_layer: float = 0.0,
    cache_free: int = 0,
    cache_total: int = 0,
    load: float = 0,
    queued_tokens: int = 0,
    reach: str = "",
) -> dict[str, Any]:
    """One peer as the page shows it; `state`: live | banned | leaving | down; `reach`:
    direct | relayed | punched (direct after a hole punch), "?" when unknown."""
    kind = SHORT_DTYPES.get(dtype, dtype) + ("" if quant in ("none", "") else f"/{quant}")
    return {
        "peer_id": peer_id,
        "short_id": "…" + peer_id[-8:],
        "address": address,
        "span": list(span),
        "state": state,
        "device": device or "?",
        "dtype": kind,
        "memory_free": memory_free,
        "memory_total": memory_total,
        "steps_per_s_per_layer": round(steps_per_s_per_layer, 2),
        "cache_free": cache_free,
        "cache_total": cache_total,
        "load": load,
        "queued_tokens": queued_tokens,
        "reach": reach or "?",
    }


def coverage(rows: Sequence[dict[str, Any]], num_layers: int) -> dict[str, Any]:
    """Replicas per layer over the usable peers, and the unserved spans `[start, end)`."""
    counts = [0] * num_layers
    for row in rows:
        if row["state"] == "live":
            for layer in range(max(0, row["span"][0]), min(row["span"][1], num_layers)):
                counts[layer] += 1
    gaps: list[list[int]] = []
    for layer, count in enumerate(counts):
        if count == 0:
            if gaps and gaps[-1][1] == layer:
                gaps[-1][1] = layer + 1
            else:
                gaps.append([layer, layer + 1])
    return {"counts": counts, "gaps": gaps}


# --- replies in flight ---------------------------------------------------------------------------


@dataclass
class Flight:
    id: int
    pipeline: Pipeline
    started: float = field(default_factory=time.time)
    steps: int = 0  # forward passes through the route so far


class InFlight:
    """Wraps a generator's `open_pipeline` to know each reply's route while it runs."""

    def __init__(self, gen: Generator) -> None:
        self._open = gen.open_pipeline
        self._flights: dict[int, Flight] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        gen.open_pipeline = self.open_pipeline

    async def open_pipeline(self, max_length: int, prefix: Prefix | None = None) -> Pipeline:
        pipeline = await self._open(max_length, prefix)
        return self.track(pipeline)

    def track(self, pipeline: Pipeline) -> Pipeline:
        flight = Flight(next(self._ids), pipeline)
        with self._lock:
            self._flights[flight.id] = flight
        return _Tracked(pipeline, flight, self)

    def done(self, flight: Flight) -> None:
        with self._lock:
            self._flights.pop(flight.id, None)

    def routes(self) -> list[dict[str, Any]]:
        with self._lock:
            flights = list(self._flights.values())
        now = time.time()
        out = []
        for f in flights:
            route = getattr(f.pipeline, "route", None)  # a swarm session's; local: none
            hops = [{"address": a, "span": [s.start, s.end]} for a, s in route or []]
            out.append({"id": f.id, "hops": hops, "steps": f.steps, "age_s": now - f.started})
        return out


class _Tracked:
    """A pipeline that counts its steps and leaves `InFlight` when closed."""

    def __init__(self, inner: Pipeline, flight: Flight, flights: InFlight) -> None:
        self.inner, self.flight, self.flights = inner, flight, flights

    @property
    def route(self) -> object:
        return getattr(self.inner, "route", None)

    @property
    def cached(self) -> int:
        return cached_tokens(self.inner)

    async def afork(self) -> Pipeline:
        child = await fork_pipeline(self.inner)
        if child is None:
            raise NotImplementedError("this pipeline cannot fork")
        return self.flights.track(child)

    async def aforward(self, hidden: Any, start: int) -> Any:
        out = await self.inner.aforward(hidden, start)
        self.flight.steps += 1
        return out

    async def aclose(self) -> None:
        self.flights.done(self.flight)
        await self.inner.aclose()


# --- what the swarm looks like -------------------------------------------------------------------


class ClientSource:
    """The swarm as `swarm-api`'s client sees it: its links, their answers, its bans."""

    REFRESH_S = 2.0  # unit: s between two refreshes the page triggers

    def __init__(self, gen: Generator, model: str) -> None:
        self.gen = gen
        self.model = model
        self.num_layers = gen.head.config.num_layers
        self.client = getattr(gen.open_pipeline, "__self__", None)  # a SwarmClient, or None
        self._last = 0.0

    async def peers(self) -> list[dict[str, Any]]:
        client = self.client
        if client is None or not hasattr(client, "links"):  # --local: every layer here
            return [peer_row("local", "this process", (0, self.num_layers), device="local")]
        if time.monotonic() - self._last > self.REFRESH_S:
            self._last = time.monotonic()
            try:
                await client.net.call(client.refresh())
            except Exception as e:  # none answers: the page says so through their states
                note_event("info", f"refreshing the swarm failed: {e}")
        banned = client.book.banned()  # failed (for a while), or caught lying
        return [_link_row(link, banned) for link in client.links]


def _link_row(link: Any, banned: set[str]) -> dict[str, Any]:
    info, conn = link.info, link.conn
    if info is None:
        return peer_row("?", str(link.address), (0, 0), state="down")
    peer_id = conn.peer_id if conn is not None else str(link.address).rpartition("/")[2]
    state = "down" if conn is None or conn.closed else "leaving" if link.leaving else "live"
    state = "banned" if state == "live" and peer_id in banned else state
    extra = info.extra
    spl = _num(extra.get("decode_s_per_layer"))
    return peer_row(
        peer_id,
        str(link.address).partition("/")[0],
        (info.span_start, info.span_end),
        state=state,
        device=str(extra.get("device", "")),
        dtype=info.dtype,
        quant=str(extra.get("quant", "none")),
        memory_free=int(_num(extra.get("free_memory_bytes"))),
        memory_total=int(_num(extra.get("memory_total_bytes"))),
        steps_per_s_per_layer=1.0 / spl if spl > 0 else 0.0,
        cache_free=info.cache_tokens_free,
        cache_total=info.cache_tokens_total,
        load=info.active_sessions,
        queued_tokens=int(_num(extra.get("queued_tokens"))),
        reach=str(getattr(link, "reach", "")),
    )


def _num(value: object) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and value == value
    return float(value) if ok and abs(float(value)) < 1e18 else 0.0  # type: ignore[arg-type]


class RecordSource:
    """The swarm as its signed records say (`swarm-peer status --serve`), re-read every call."""

    def __init__(
        self, read: Callable[[], Awaitable[list[PeerRecord]]], model: str, num_layers: int
    ) -> None:
        self.read = read
        self.model = model
        self.num_layers = num_layers
        self._seen: dict[str, PeerRecord] = {}

    async def peers(self) -> list[dict[str, Any]]:
        records = await self.read()
        fresh = {r.peer_id: r for r in records}
        for r in records:
            self.num_layers = max(self.num_layers, r.num_layers)
        rows = [_record_row(r, "live") for r in fresh.values()]
        # A peer seen before and gone now is shown as down (its layers as a gap), not dropped.
        rows += [_record_row(r, "down") for p, r in self._seen.items() if p not in fresh]
        self._seen.update(fresh)
        return sorted(rows, key=lambda row: (row["span"], row["peer_id"]))


def _record_row(r: PeerRecord, state: str) -> dict[str, Any]:
    return peer_row(
        r.peer_id,
        r.addresses[0] if r.addresses else "",
        (r.span_start, r.span_end),
        state=state,
        device=f"{r.tflops:.2f} TFLOPS",
        dtype=r.dtype,
        quant=r.quant,
        memory_free=r.free_memory_bytes,
        steps_per_s_per_layer=r.decode_steps_per_s_per_layer,
        cache_free=r.cache_tokens_free,
        cache_total=r.cache_tokens_total,
        load=r.load,
        reach=record_reach(r),
    )


# --- the routes ----------------------------------------------------------------------------------


def dashboard_routes(source: SwarmSource, flights: InFlight | None = None) -> list[BaseRoute]:
    """`/` (the swarm), `/chat`, `/static/*`, `/dashboard/state` and `/metrics`."""

    async def state(request: Request) -> Response:
        rows = await source.peers()
        return JSONResponse(
            {
                "model": source.model,
                "num_layers": source.num_layers,
                "time": time.time(),
                "peers": rows,
                "coverage": coverage(rows, source.num_layers),
                "routes": flights.routes() if flights is not None else [],
                "events": [e.__dict__ for e in reversed(EVENTS.recent())],
                "tokens_per_s": TOKEN_RATE.series(),
                "chat": flights is not None,  # an OpenAI endpoint to chat with
            }
        )

    async def metrics(request: Request) -> Response:
        data = await asyncio.to_thread(generate_latest)
        return Response(data, media_type=CONTENT_TYPE_LATEST)

    def page(name: str) -> Callable[[Request], Awaitable[Response]]:
        async def serve(request: Request) -> Response:
            return FileResponse(STATIC / name, headers={"Cache-Control": "no-cache"})

        return serve

    async def favicon(request: Request) -> Response:
        return RedirectResponse("/static/favicon.svg")

    return [
        Route("/", page("index.html"), methods=["GET"]),
        Route("/chat", page("chat.html"), methods=["GET"]),
        Route("/favicon.ico", favicon, methods=["GET"]),
        Route("/dashboard/state", state, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
