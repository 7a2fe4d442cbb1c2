"""The client side of a swarm: connections to peers, what is known of them, and bans.

The network runs on an asyncio loop in a background thread, so the generation loop (and the
people calling it) stay synchronous. Sessions across peers live in `routing.session`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from zeroconf import InterfaceChoice

from layerswarm.errors import LayerswarmError, PeerUnavailable
from layerswarm.kernels.cpu_linear import pack_linears
from layerswarm.routing.generate import Generator, Pipeline
from layerswarm.routing.paths import BanList, PeerView
from layerswarm.routing.text import ChatTokenizer
from layerswarm.shards.config import ModelConfig, Span
from layerswarm.shards.weights import load_client_head, model_fingerprint
from layerswarm.swarm.discovery import RecordSource, merged, wait_for_coverage
from layerswarm.swarm.identity import Identity, generate_identity
from layerswarm.swarm.mdns import MdnsBrowser, MdnsConfig
from layerswarm.swarm.protocol import InfoReply, InfoRequest
from layerswarm.swarm.transport import (
    Address,
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
    """How a client talks to peers and reacts when they fail."""

    connect_timeout: float = 3.0  # unit: s to reach a peer and prove who it is
    request_timeout: float = 10.0  # unit: s for small requests (info, open, close)
    step_timeout_floor: float = 1.0  # unit: s every step may take, whatever the peer's speed
    step_timeout_factor: float = 20.0  # unit: times a step's expected duration before giving up
    max_reroutes: int = 8  # unit: reroutes per step before the step fails
    ban_seconds: float = 5.0  # unit: s of a failed peer's first ban; doubles on each new failure
    insecure_plaintext: bool = False  # no TLS; trusted LANs and measurements only
    mdns_interfaces: tuple[str, ...] | None = None  # browse mDNS here (() = every one); None: off
    discovery_timeout: float = 5.0  # unit: s to wait for discovered peers to cover every layer


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


@dataclass
class PeerLink:
    """One peer the client was told about, and what it learned of it."""

    address: Address
    conn: Connection | None = None
    info: InfoReply | None = None
    rtt: float = 0.0  # unit: s, the info round trip measured here
    leaving: bool = False  # the peer said Goodbye

    @property
    def live(self) -> bool:
        return self.conn is not None and not self.conn.closed and not self.leaving

    def view(self) -> PeerView:
        assert self.info is not None and self.conn is not None  # only called on live links
        extra = self.info.extra
        spl = extra.get("decode_s_per_layer")
        return PeerView(
            peer_id=self.conn.peer_id,
            address=str(self.address),
            span=Span(self.info.span_start, self.info.span_end),
            seconds_per_layer=float(spl) if isinstance(spl, (int, float)) and spl > 0 else 0.01,
            load=float(self.info.active_sessions),
            rtt=self.rtt,
        )


class SwarmClient:
    """Connections to a set of peers, refreshed as they come and go, and bans for failures."""

    def __init__(
        self,
        model_dir: Path,
        addresses: Sequence[str],
        config: ClientConfig | None = None,
        identity: Identity | None = None,
        on_event: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config or ClientConfig()
        self.model_config = ModelConfig.from_file(model_dir)
        self.fingerprint = model_fingerprint(model_dir)
        self.identity = identity or generate_identity()
        self.links = [PeerLink(parse_address(a)) for a in addresses]
        self.bans = BanList(base_seconds=self.config.ban_seconds)
        self.rng = random.Random()
        self.on_event = on_event or (lambda text: log.info("%s", text))
        self.transport = TransportConfig(
            connect_timeout=self.config.connect_timeout,
            handshake_timeout=self.config.connect_timeout,
            request_timeout=self.config.request_timeout,
            insecure_plaintext=self.config.insecure_plaintext,
        )
        self.sources: list[RecordSource] = []
        self.closers: list[Callable[[], Awaitable[None]]] = []
        self.net = BackgroundLoop()
        try:
            if self.config.mdns_interfaces is not None:
                self.net.run(self._start_mdns())
            self.net.run(self.refresh())
        except BaseException:
            self.net.stop()
            raise

    async def _start_mdns(self) -> None:
        """Browse the LAN for this model's peers; wait (a while) for them to cover every layer."""
        interfaces = self.config.mdns_interfaces or InterfaceChoice.All
        browser = MdnsBrowser(MdnsConfig(interfaces=interfaces))
        await browser.start()
        self.closers.append(browser.close)
        self.sources.append(browser)
        await wait_for_coverage(
            self.sources,
            None,
            self.fingerprint,
            self.model_config.num_layers,
            self.config.discovery_timeout,
        )

    def _adopt_discovered(self) -> None:
        """Add a link to each discovered peer not known yet (its first address, its peer ID)."""
        known: set[object] = {(link.address.host, link.address.port) for link in self.links}
        known |= {link.address.peer_id or (link.conn and link.conn.peer_id) for link in self.links}
        for record in merged(self.sources, self.fingerprint):
            try:
                address = parse_address(f"{record.addresses[0]}/{record.peer_id}")
            except ValueError:  # a host name with characters we do not dial
                continue
            if record.peer_id in known or (address.host, address.port) in known:
                continue
            self.links.append(PeerLink(address))
            known |= {record.peer_id, (address.host, address.port)}

    async def refresh(self) -> None:
        """Dial every peer not connected now (discovered ones too) and ask each what it serves."""
        self._adopt_discovered()
        if not self.links:
            raise PeerUnavailable(
                f"no peer of this model ({self.fingerprint}) was found by discovery "
                f"within {self.config.discovery_timeout:g} s"
            )
        await asyncio.gather(*(self._refresh(link) for link in self.links))
        if not any(link.live for link in self.links):
            raise PeerUnavailable(
                "none of the peers answered: " + ", ".join(str(link.address) for link in self.links)
            )

    async def _refresh(self, link: PeerLink) -> None:
        try:
            if not link.live:
                link.leaving = False
                link.conn = await open_connection(
                    link.address, self.identity, self.transport, on_goodbye=self._goodbye
                )
                self.bans.lift(link.conn.peer_id)  # it is back: usable again
            assert link.conn is not None
            t0 = time.perf_counter()
            info = await link.conn.request(InfoRequest())
            link.rtt = time.perf_counter() - t0
            assert isinstance(info, InfoReply)
            self._check_model(link.conn, info)
            link.info = info
        except (PeerUnavailable, OSError) as e:
            log.debug("peer at %s is unreachable: %s", link.address, e)
            link.conn = None

    def _goodbye(self, conn: Connection, reason: str) -> None:
        for link in self.links:
            if link.conn is conn:
                link.leaving = True
        self.bans.ban(conn.peer_id)
        self.on_event(f"peer {short(conn.peer_id)} is leaving ({reason})")

    def _check_model(self, conn: Connection, info: InfoReply) -> None:
        theirs = info.model.rpartition("@")[2]
        if theirs != self.fingerprint or info.num_layers != self.model_config.num_layers:
            raise LayerswarmError(
                f"peer {conn.peer_id} at {conn.address} serves another model ({info.model}); "
                f"this client has {self.fingerprint}: start both with the same --model"
            )

    def views(self) -> list[PeerView]:
        """The live peers, as the path chooser sees them."""
        return [link.view() for link in self.links if link.live and link.info is not None]

    def connection(self, peer_id: str) -> Connection:
        for link in self.links:
            if link.live and link.conn is not None and link.conn.peer_id == peer_id:
                return link.conn
        raise PeerUnavailable(f"peer {short(peer_id)} is not connected")

    def is_leaving(self, peer_id: str) -> bool:
        return any(
            link.conn is not None and link.conn.peer_id == peer_id and not link.live
            for link in self.links
        )

    def open_pipeline(self, max_length: int) -> Pipeline:
        from layerswarm.routing.session import RemoteSession

        session = RemoteSession(self, max_length)
        self.net.run(session.open())
        return session

    def close(self) -> None:
        """Close every connection, then the network thread."""
        try:
            self.net.run(self._close_all(), timeout=self.config.request_timeout)
        finally:
            self.net.stop()

    async def _close_all(self) -> None:
        for close in self.closers:
            await close()
        conns = [link.conn for link in self.links if link.conn is not None]
        for conn in conns:
            conn.close()
        await asyncio.gather(*(conn.wait_closed() for conn in conns))


def short(peer_id: str) -> str:
    """A peer ID shortened for people: its last 8 characters."""
    return "…" + peer_id[-8:]


def open_swarm_generator(
    model_dir: Path,
    peers: Sequence[str],
    insecure_plaintext: bool = False,
    dtype: torch.dtype = torch.float32,
    config: ClientConfig | None = None,
    on_event: Callable[[str], None] | None = None,
) -> Generator:
    """A generator whose layers run on `peers` (addresses `host:port[/PEERID]`)."""
    config = config or ClientConfig(insecure_plaintext=insecure_plaintext)
    client = SwarmClient(model_dir, peers, config, on_event=on_event)
    head = pack_linears(load_client_head(model_dir, dtype))
    gen = Generator(head, ChatTokenizer(model_dir), client.open_pipeline)
    gen.client = client  # type: ignore[attr-defined]  # keeps it alive; for /route
    return gen
