"""Every Prometheus metric of layerswarm, defined once, and the recent events the dashboard shows.

Peers, `swarm-api` and any other process expose them at `/metrics` (`prometheus_client`'s text
format). Counters are defined here and only incremented elsewhere, so a new place that counts
(verification, for instance) imports them rather than defining a second one with the same name.
`prometheus_client` keeps them in its default registry, one per process.

The dashboard's live view (recent reroutes and bans with their reasons, tokens per second over
the last minutes) reads `EVENTS` and `TOKEN_RATE` below: in-process rings, not Prometheus.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import Counter, Gauge, Histogram

# unit: s. Buckets for a step: one decode step of a small span takes ~1-10 ms on a CPU, a
# prefill chunk of a large one up to seconds.
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)

# --- the client side (swarm-api, swarm-chat, layerswarm.Client) ---------------------------------
CLIENT_TOKENS = Counter(
    "layerswarm_client_tokens", "Tokens through the client, by kind", ["kind"]
)  # kind: prompt | completion
CLIENT_REPLIES = Counter("layerswarm_client_replies", "Replies finished, by reason", ["reason"])
CLIENT_REPLIES_IN_FLIGHT = Gauge("layerswarm_client_replies_in_flight", "Replies being generated")
CLIENT_TOKEN_SECONDS = Histogram(
    "layerswarm_client_token_seconds",
    "Time between two tokens of a reply (the first: time to first token)",
    buckets=STEP_BUCKETS,
)
REROUTES = Counter("layerswarm_reroutes", "Sessions moved away from a failed or full peer")
BANS = Counter("layerswarm_bans", "Peers banned by this client for failing")
VERIFICATIONS = Counter(
    "layerswarm_verifications", "Steps re-checked on another replica, by result", ["result"]
)  # result: match | mismatch | error
HTTP_REFUSALS = Counter(
    "layerswarm_api_refusals",
    "HTTP requests or connections swarm-api refused, by reason",
    ["reason"],
)

# --- the peer side -----------------------------------------------------------------------------
PEER_STEPS = Counter("layerswarm_peer_steps", "Steps of sessions run (one per request)")
PEER_TOKENS = Counter("layerswarm_peer_tokens", "Tokens run through this peer's layers")
PEER_BATCHES = Counter("layerswarm_peer_batches", "Forward passes of the compute loop")
PEER_BATCH_SIZE = Histogram(
    "layerswarm_peer_batch_sessions", "Sessions in one forward pass", buckets=BATCH_BUCKETS
)
PEER_BATCH_SECONDS = Histogram(
    "layerswarm_peer_batch_seconds", "Time of one forward pass", buckets=STEP_BUCKETS
)
PEER_STEP_SECONDS = Histogram(
    "layerswarm_peer_step_seconds",
    "Time from a step's arrival to its answer (queue included)",
    buckets=STEP_BUCKETS,
)
PEER_STEP_ERRORS = Counter("layerswarm_peer_step_errors", "Steps answered with an error")
PEER_QUEUED_TOKENS = Gauge("layerswarm_peer_queued_tokens", "Tokens of steps waiting to run")
PEER_KV_PAGES_USED = Gauge("layerswarm_peer_kv_pages_used", "KV-cache pages held by sessions")
PEER_KV_PAGES_TOTAL = Gauge("layerswarm_peer_kv_pages_total", "KV-cache pages in all")
PEER_SESSIONS = Gauge("layerswarm_peer_sessions", "Inference sessions open")


class _Scheduler(Protocol):
    on_batch: Callable[[int, int, float], None] | None

    @property
    def queued_tokens(self) -> int: ...


class _Cache(Protocol):
    num_pages: int

    @property
    def pages_free(self) -> int: ...


def watch_peer(
    scheduler: _Scheduler, cache: Callable[[], _Cache], sessions: Callable[[], int]
) -> None:
    """Count a peer's batches, and read its queue, KV pages and sessions at each scrape."""
    scheduler.on_batch = _batch_done
    PEER_QUEUED_TOKENS.set_function(_safely(lambda: scheduler.queued_tokens))
    PEER_KV_PAGES_USED.set_function(lambda: cache().num_pages - cache().pages_free)
    PEER_KV_PAGES_TOTAL.set_function(lambda: cache().num_pages)
    PEER_SESSIONS.set_function(sessions)


def _safely(read: Callable[[], int]) -> Callable[[], float]:
    """`read`, from the scrape's thread while the peer's loop changes what it reads: a read
    that meets a dict mid-change says 0 rather than failing the scrape."""

    def value() -> float:
        try:
            return float(read())
        except RuntimeError:
            return 0.0

    return value


def serve_metrics(host: str, port: int) -> int:
    """Serve this process's metrics at `http://host:port/metrics` from a thread; the port."""
    from prometheus_client import start_http_server

    server, _thread = start_http_server(port, addr=host)
    return int(server.server_port)


def _batch_done(sessions: int, tokens: int, seconds: float) -> None:
    PEER_BATCHES.inc()
    PEER_BATCH_SIZE.observe(sessions)
    PEER_BATCH_SECONDS.observe(seconds)


def step_done(tokens: int, seconds: float) -> None:
    """A session's step answered: `tokens` run, `seconds` from its arrival."""
    PEER_STEPS.inc()
    PEER_TOKENS.inc(tokens)
    PEER_STEP_SECONDS.observe(seconds)


@dataclass(frozen=True)
class Event:
    """One thing worth showing: a reroute, a ban, a peer leaving; with its reason."""

    at: float  # unix s
    kind: str  # "reroute" | "ban" | "leave" | "verify" | "info"
    text: str


class EventLog:
    """The last `size` events, safe to append from any thread."""

    def __init__(self, size: int = 50) -> None:
        self._events: deque[Event] = deque(maxlen=size)
        self._lock = threading.Lock()

    def add(self, kind: str, text: str) -> None:
        with self._lock:
            self._events.append(Event(time.time(), kind, text))

    def recent(self) -> list[Event]:
        with self._lock:
            return list(self._events)


class TokenRate:
    """Tokens generated per second, bucketed by second, over the last `window` seconds."""

    def __init__(self, window: int = 300) -> None:
        self.window = window
        self._buckets: deque[list[int]] = deque()  # [unix second, tokens]
        self._lock = threading.Lock()

    def add(self, tokens: int = 1, now: float | None = None) -> None:
        second = int(time.time() if now is None else now)
        with self._lock:
            if self._buckets and self._buckets[-1][0] == second:
                self._buckets[-1][1] += tokens
            else:
                self._buckets.append([second, tokens])
            while self._buckets and self._buckets[0][0] <= second - self.window:
                self._buckets.popleft()

    def series(self, now: float | None = None, step: int = 5) -> list[tuple[int, float]]:
        """`(unix s, tokens/s)` over the window, averaged over `step`-second buckets."""
        end = int(time.time() if now is None else now)
        start = end - self.window
        sums: dict[int, int] = {}
        with self._lock:
            for second, n in self._buckets:
                if second > start:
                    key = second - (second - start) % step
                    sums[key] = sums.get(key, 0) + n
        return [(t + step, sums.get(t, 0) / step) for t in range(start, end, step)]


EVENTS = EventLog()
TOKEN_RATE = TokenRate()


def note_event(kind: str, text: str) -> None:
    """Record an event for the dashboard, and count reroutes and bans."""
    if kind == "reroute":
        REROUTES.inc()
    elif kind == "ban":
        BANS.inc()
    EVENTS.add(kind, text)
