"""The client side of a swarm: connections to peers, what is known of them, and bans.

The network runs on an asyncio loop in a background thread, so the generation loop (and the
people calling it) stay synchronous. Sessions across peers live in `routing.session`.

Peers come from three places: addresses given, mDNS on the LAN, and the DHT (a node of the
client's own, joined through `ClientConfig.bootstrap`). Discovered peers are dialled pinned to
the peer ID their signed record names, and forgotten once the record is gone and they are not
connected.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import torch
from zeroconf import InterfaceChoice

from layerswarm.errors import LayerswarmError, PeerUnavailable, ProtocolError
from layerswarm.kernels.cpu_linear import pack_linears
from layerswarm.routing.generate import Generator, Pipeline
from layerswarm.routing.loop import BackgroundLoop
from layerswarm.routing.paths import BanList, PeerView
from layerswarm.routing.text import ChatTokenizer
from layerswarm.shards.config import ModelConfig, Span
from layerswarm.shards.weights import load_client_head, model_fingerprint
from layerswarm.swarm.dial import Connection, open_connection
from layerswarm.swarm.discovery import (
    DhtLookup,
    RecordSource,
    dht_key,
    merged,
    wait_for_coverage,
)
from layerswarm.swarm.identity import Identity, generate_identity
from layerswarm.swarm.mdns import MdnsConfig
from layerswarm.swarm.mdns_browse import MdnsBrowser
from layerswarm.swarm.protocol import InfoReply, InfoRequest
from layerswarm.swarm.transport import Address, TransportConfig, parse_address

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
    max_ban_seconds: float = 60.0  # unit: s, the longest ban (a peer may come back)
    probe_timeout: float = 3.0  # unit: s for a slow step's peer to say it is still busy
    max_step_wait: float = 600.0  # unit: s a busy peer may take for one step, probes answered
    busy_wait_timeout: float = 30.0  # unit: s to wait for room when every replica is full
    replay_chunk_tokens: int = 4096  # unit: tokens per step when replaying into a new hop
    insecure_plaintext: bool = False  # no TLS; trusted LANs and measurements only
    mdns_interfaces: tuple[str, ...] | None = None  # browse mDNS here (() = every one); None: off
    refresh_interval: float = 5.0  # unit: s; a new session first re-reads the swarm if older
    discovery_timeout: float = 5.0  # unit: s to wait for discovered peers to cover every layer
    bootstrap: tuple[str, ...] = ()  # DHT members' multiaddrs to find peers through; (): no DHT
    # 32 bytes: a private swarm's key (its DHT and its peers admit only holders); None: open
    swarm_key: bytes | None = field(default=None, repr=False)


@dataclass
class PeerLink:
    """One peer the client was told about, and what it learned of it."""

    address: Address
    conn: Connection | None = None
    info: InfoReply | None = None
    rtt: float = 0.0  # unit: s, the info round trip measured here
    leaving: bool = False  # the peer said Goodbye
    discovered: bool = False  # from a record (mDNS, DHT), not from the caller

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
        self.bans = BanList(self.config.ban_seconds, self.config.max_ban_seconds)
        self.rng = random.Random()
        self.on_event = on_event or (lambda text: log.info("%s", text))
        self.transport = TransportConfig(
            connect_timeout=self.config.connect_timeout,
            handshake_timeout=self.config.connect_timeout,
            request_timeout=self.config.request_timeout,
            insecure_plaintext=self.config.insecure_plaintext,
            swarm_key=self.config.swarm_key,
        )
        self.sources: list[RecordSource] = []
        self.lookups: list[DhtLookup] = []  # sources to refresh before reading (DHT queries)
        self.closers: list[Callable[[], Awaitable[None]]] = []
        self.last_refresh = 0.0  # unit: monotonic s of the last refresh
        self._refreshing: asyncio.Lock | None = None  # one refresh at a time (made on `net`)
        self.net = BackgroundLoop()
        try:
            self.net.run(self._start_discovery())
            self.net.run(self.refresh())
        except BaseException:
            try:
                self.close()  # what discovery started (the DHT node's thread) stops too
            except Exception as e:  # the first error is the one to tell
                log.debug("closing after a failed start: %r", e)
            raise

    async def _start_discovery(self) -> None:
        """Start mDNS and the DHT, as configured; wait (a while) for peers covering every layer."""
        if self.config.mdns_interfaces is not None:
            await self._start_mdns()
        if self.config.bootstrap:
            await self._start_dht()
        if self.sources:
            await wait_for_coverage(
                self.sources,
                self._refresh_lookups,
                self.fingerprint,
                self.model_config.num_layers,
                self.config.discovery_timeout,
            )

    async def _start_mdns(self) -> None:
        """Browse the LAN for this model's peers."""
        interfaces = self.config.mdns_interfaces or InterfaceChoice.All
        browser = MdnsBrowser(MdnsConfig(interfaces=interfaces))
        await browser.start()
        self.closers.append(browser.close)
        self.sources.append(browser)

    async def _start_dht(self) -> None:
        """Join the DHT through the bootstrap peers, to read this model's records there.

        Raises:
            PeerUnavailable: no bootstrap peer could be reached, or none let this node in.
        """
        from layerswarm.swarm.dht import DhtConfig, DhtNode, local_ip_towards  # loads libp2p

        bootstrap = list(self.config.bootstrap)
        try:
            node = await DhtNode.start(
                self.identity,
                local_ip_towards(bootstrap[0]),  # loopback for a bootstrap on this machine
                0,
                bootstrap,
                self.config.swarm_key,
                DhtConfig(connect_timeout=self.config.connect_timeout),
            )
        except PeerUnavailable as e:
            raise PeerUnavailable(
                f"cannot join the DHT through {', '.join(bootstrap)}: {e} (in a private swarm, "
                "its members refuse a node without its swarm key, or with another one)"
            ) from e
        self.closers.append(node.close)
        key = dht_key(self.fingerprint)
        lookup = DhtLookup(lambda: node.get_records(key))
        self.lookups.append(lookup)
        self.sources.append(lookup)

    async def _refresh_lookups(self) -> None:
        for lookup in self.lookups:
            try:
                await lookup.refresh()
            except (TimeoutError, LayerswarmError) as e:  # go on with what is known
                log.warning("reading the DHT failed: %r", e)

    def _adopt_discovered(self) -> None:
        """Add a link to each discovered peer not known yet (its first address, its peer ID);
        drop discovered links whose record is gone and that are not connected."""
        records = merged(self.sources, self.fingerprint)
        current = {r.peer_id for r in records}
        self.links = [
            link
            for link in self.links
            if not link.discovered or link.live or link.address.peer_id in current
        ]
        known: set[object] = {(link.address.host, link.address.port) for link in self.links}
        known |= {link.address.peer_id or (link.conn and link.conn.peer_id) for link in self.links}
        for record in records:
            try:
                address = parse_address(f"{record.addresses[0]}/{record.peer_id}")
            except ValueError:  # a host name with characters we do not dial
                continue
            if record.peer_id in known or (address.host, address.port) in known:
                continue
            self.links.append(PeerLink(address, discovered=True))
            known |= {record.peer_id, (address.host, address.port)}

    async def refresh(self) -> None:
        """Dial every peer not connected now (discovered ones too) and ask each what it serves.

        Many sessions failing over at once share one refresh: a call that waited for another
        one to finish returns at once, as the swarm was just read.
        """
        asked = time.monotonic()
        if self._refreshing is None:
            self._refreshing = asyncio.Lock()
        async with self._refreshing:
            if self.last_refresh >= asked:
                return
            await self._refresh_all()

    async def _refresh_all(self) -> None:
        self.last_refresh = time.monotonic()
        await self._refresh_lookups()
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
                if link.conn is not None:  # a leaving peer's connection: replaced, so closed
                    link.conn.close()
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
        except ProtocolError as e:
            if not link.discovered:
                raise  # a peer the caller named: say why it cannot be used
            log.warning("skipping discovered peer at %s: %s", link.address, e)
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

    async def open_pipeline(self, max_length: int) -> Pipeline:
        """A session across the swarm with room for `max_length` tokens (on `net`'s loop)."""
        from layerswarm.routing.session import RemoteSession

        session = RemoteSession(self, max_length)
        await session.open()
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
    """A generator whose layers run on `peers` (addresses `host:port[/PEERID]`), and on the
    peers that `config` discovers (mDNS, DHT through `config.bootstrap`)."""
    config = config or ClientConfig(insecure_plaintext=insecure_plaintext)
    client = SwarmClient(model_dir, peers, config, on_event=on_event)
    head = pack_linears(load_client_head(model_dir, dtype))
    gen = Generator(head, ChatTokenizer(model_dir), client.open_pipeline, client.net)
    gen.client = client  # type: ignore[attr-defined]  # keeps it alive; for /route
    return gen
