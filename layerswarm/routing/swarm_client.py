"""The client side of a swarm: connect to peers, chain their spans, run sessions through them.

This first version takes an explicit list of peers whose spans, between them, cover every layer.
The network runs on an asyncio loop in a background thread, so the generation loop (and the
people calling it) stay synchronous.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections.abc import Coroutine, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from layerswarm.errors import LayerswarmError, NoRouteError, PeerUnavailable
from layerswarm.routing.generate import Generator, Pipeline
from layerswarm.routing.text import ChatTokenizer
from layerswarm.shards.config import ModelConfig, Span
from layerswarm.shards.weights import load_client_head, model_fingerprint
from layerswarm.swarm.identity import Identity, generate_identity
from layerswarm.swarm.protocol import (
    CloseSession,
    InfoReply,
    InfoRequest,
    OpenSession,
    Step,
    StepResult,
)
from layerswarm.swarm.transport import (
    Connection,
    TransportConfig,
    new_event_loop,
    open_connection,
    parse_address,
)

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class ClientConfig:
    """How a client talks to peers."""

    connect_timeout: float = 5.0  # unit: s to reach a peer and prove who it is
    step_timeout: float = 60.0  # unit: s to wait for one hop's step
    request_timeout: float = 10.0  # unit: s for small requests (info, open, close)
    insecure_plaintext: bool = False  # no TLS; trusted LANs and measurements only


@dataclass(frozen=True)
class Hop:
    """One stage of a path: a peer and the layers it runs for us."""

    peer: Connection
    span: Span


class BackgroundLoop:
    """An asyncio (uvloop where installed) event loop on a daemon thread."""

    def __init__(self) -> None:
        self.loop = new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="layerswarm-net", daemon=True
        )
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except BaseException:
            future.cancel()
            raise

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)


def choose_chain(infos: Sequence[InfoReply], num_layers: int) -> list[tuple[int, Span]]:
    """Pick peers (by index) whose spans tile `[0, num_layers)`, longest reach first.

    Raises:
        NoRouteError: some layers are served by none of the peers.
    """
    chain: list[tuple[int, Span]] = []
    at = 0
    while at < num_layers:
        best = max(
            (i for i, p in enumerate(infos) if p.span_start <= at < p.span_end),
            key=lambda i: infos[i].span_end,
            default=None,
        )
        if best is None:
            served = {n for p in infos for n in range(p.span_start, p.span_end)}
            raise NoRouteError([n for n in range(num_layers) if n not in served])
        chain.append((best, Span(at, infos[best].span_end)))
        at = infos[best].span_end
    return chain


class SwarmClient:
    """Connections to a fixed set of peers, and pipelines through them."""

    def __init__(
        self,
        model_dir: Path,
        addresses: Sequence[str],
        config: ClientConfig | None = None,
        identity: Identity | None = None,
    ) -> None:
        self.config = config or ClientConfig()
        self.model_config = ModelConfig.from_file(model_dir)
        self.fingerprint = model_fingerprint(model_dir)
        self.identity = identity or generate_identity()
        self.addresses = [parse_address(a) for a in addresses]
        self.net = BackgroundLoop()
        self.hops: list[Hop] = []
        try:
            self.hops = self.net.run(self._connect())
        except BaseException:
            self.net.stop()
            raise

    async def _connect(self) -> list[Hop]:
        tconf = TransportConfig(
            connect_timeout=self.config.connect_timeout,
            handshake_timeout=self.config.connect_timeout,
            request_timeout=self.config.request_timeout,
            insecure_plaintext=self.config.insecure_plaintext,
        )
        conns = await asyncio.gather(
            *(open_connection(a, self.identity, tconf) for a in self.addresses)
        )
        infos: list[InfoReply] = []
        for conn in conns:
            info = await conn.request(InfoRequest())
            assert isinstance(info, InfoReply)
            self._check_model(conn, info)
            infos.append(info)
        return [
            Hop(conns[i], span) for i, span in choose_chain(infos, self.model_config.num_layers)
        ]

    def _check_model(self, conn: Connection, info: InfoReply) -> None:
        theirs = info.model.rpartition("@")[2]
        if theirs != self.fingerprint or info.num_layers != self.model_config.num_layers:
            raise LayerswarmError(
                f"peer {conn.peer_id} at {conn.address} serves another model ({info.model}); "
                f"this client has {self.fingerprint}: start both with the same --model"
            )

    def route(self) -> list[tuple[str, Span]]:
        return [(str(h.peer.address), h.span) for h in self.hops]

    def open_pipeline(self, max_length: int) -> RemotePipeline:
        pipeline = RemotePipeline(self, max_length)
        self.net.run(pipeline.open())
        return pipeline

    def close(self) -> None:
        """Close every connection, then the network thread."""
        try:
            self.net.run(self._close_all(), timeout=self.config.request_timeout)
        finally:
            self.net.stop()

    async def _close_all(self) -> None:
        for hop in self.hops:
            hop.peer.close()
        await asyncio.gather(*(hop.peer.wait_closed() for hop in self.hops))


class RemotePipeline:
    """One session across the hops of a path: the KV cache of each span stays on its peer."""

    def __init__(self, client: SwarmClient, max_length: int) -> None:
        self.client = client
        self.max_length = max_length
        self.session_id = uuid.uuid4().hex
        self.opened: list[Hop] = []

    async def open(self) -> None:
        for hop in self.client.hops:
            await hop.peer.request(
                OpenSession(self.session_id, hop.span.start, hop.span.end, self.max_length)
            )
            self.opened.append(hop)

    def forward(self, hidden: torch.Tensor, start: int) -> torch.Tensor:
        return self.client.net.run(self._forward(hidden, start))

    async def _forward(self, hidden: torch.Tensor, start: int) -> torch.Tensor:
        for hop in self.client.hops:
            reply = await hop.peer.request(
                Step(self.session_id, hidden, start), self.client.config.step_timeout
            )
            assert isinstance(reply, StepResult)
            hidden = reply.hidden
        return hidden

    def close(self) -> None:
        try:
            self.client.net.run(self._close(), timeout=self.client.config.request_timeout)
        except (LayerswarmError, TimeoutError) as e:
            log.debug("closing session %s: %s", self.session_id, e)

    async def _close(self) -> None:
        for hop in self.opened:
            if not hop.peer.closed:
                try:
                    await hop.peer.request(CloseSession(self.session_id))
                except (PeerUnavailable, LayerswarmError) as e:
                    log.debug("close on %s: %s", hop.peer.address, e)
        self.opened.clear()


def open_swarm_generator(
    model_dir: Path,
    peers: Sequence[str],
    insecure_plaintext: bool = False,
    dtype: torch.dtype = torch.float32,
) -> Generator:
    """A generator whose layers run on `peers` (addresses `host:port[/PEERID]`)."""
    client = SwarmClient(model_dir, peers, ClientConfig(insecure_plaintext=insecure_plaintext))
    head = load_client_head(model_dir, dtype)

    def open_pipeline(max_length: int) -> Pipeline:
        return client.open_pipeline(max_length)

    gen = Generator(head, ChatTokenizer(model_dir), open_pipeline)
    gen.client = client  # type: ignore[attr-defined]  # keeps it alive; for /route
    return gen
