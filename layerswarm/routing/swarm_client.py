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
from pathlib import Path
from typing import TypeVar

import torch
from zeroconf import InterfaceChoice

from layerswarm.errors import LayerswarmError, PeerUnavailable, ProtocolError
from layerswarm.routing.client_config import ClientConfig as ClientConfig
from layerswarm.routing.generate import Generator, Pipeline
from layerswarm.routing.hop_calls import HopCalls
from layerswarm.routing.loop import BackgroundLoop
from layerswarm.routing.paths import BanList, PeerView
from layerswarm.routing.peer_book import PeerBook
from layerswarm.routing.peer_link import PeerLink, link_key, open_link, record_addresses
from layerswarm.routing.pipeline import Prefix
from layerswarm.routing.session import RemoteSession
from layerswarm.routing.text import ChatTokenizer
from layerswarm.routing.trust import TrustLedger
from layerswarm.routing.verify_local import LocalSpans
from layerswarm.shards.config import ModelConfig
from layerswarm.shards.quantize import pack_linears
from layerswarm.shards.weights import load_client_head, model_fingerprint
from layerswarm.swarm.dial import Connection
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
from layerswarm.swarm.transport import TransportConfig, parse_address

log = logging.getLogger(__name__)
T = TypeVar("T")


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
        # bans, trust, measured speed and norm bounds, shared by every session
        self.book = PeerBook(self.config.ban_seconds, self.config.max_ban_seconds)
        self.calls = HopCalls(self.config, self.book.stats)
        self.verify_counts = {"match": 0, "mismatch": 0, "error": 0}  # checks, by result
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
        self.model_dir = model_dir
        # this client's own computation of spans, to check peers on (verify_locally)
        self.local = LocalSpans(model_dir, self.net) if self.config.verify_locally else None
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
        """Add a link to each discovered peer not known yet (its first address, its peer ID),
        refresh known links' other addresses from their records, and drop discovered links
        whose record is gone and that are not connected."""
        records = merged(self.sources, self.fingerprint)
        current = {r.peer_id for r in records}
        self.links = [
            link
            for link in self.links
            if not link.discovered or link.live or link.address.peer_id in current
        ]
        by_id = {
            link.address.peer_id or (link.conn and link.conn.peer_id): link for link in self.links
        }
        known: set[object] = {link.key for link in self.links} | set(by_id)
        for record in records:
            addresses = record_addresses(record)
            if record.peer_id in by_id:
                if by_id[record.peer_id].discovered and addresses:
                    by_id[record.peer_id].addresses = addresses
                continue
            if not addresses or link_key(addresses[0]) in known:
                continue
            link = PeerLink(addresses[0], discovered=True, addresses=addresses)
            self.links.append(link)
            by_id[record.peer_id] = link
            known |= {record.peer_id, link.key}

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
        skipped = [link for link in self.links if link.skipped]
        if any(link.live for link in self.links):
            for link in self.links:  # the others serve: say which peers are left out, and why
                if link.skipped and link.skipped != link.told:
                    log.warning("skipping %s", link.skipped)
                link.told = link.skipped
        else:
            if skipped:  # say why the peers that answered cannot be used
                more = f" (and {len(skipped) - 1} more peers skipped)" if len(skipped) > 1 else ""
                first = skipped[0].skipped_error
                raise _same_kind(first, f"{skipped[0].skipped}{more}") from first
            raise PeerUnavailable(
                "none of the peers answered: " + ", ".join(str(link.address) for link in self.links)
            )

    async def _refresh(self, link: PeerLink) -> None:
        """Dial a link if needed and read what it serves; a bad peer is skipped, never raised:
        one peer that lies or breaks the protocol must not break discovery for the others."""
        try:
            if not link.live:
                if link.conn is not None:  # a leaving peer's connection: replaced, so closed
                    link.conn.close()
                link.leaving = False
                link.conn = await open_link(link, self.identity, self.transport, self._goodbye)
                self.book.back(link.conn.peer_id)  # it is back: usable again
            conn = link.conn
            if conn is None:
                return
            t0 = time.perf_counter()
            info = await conn.request(InfoRequest())
            link.rtt = time.perf_counter() - t0
            if not isinstance(info, InfoReply):
                raise ProtocolError(f"it answered Info with {type(info).__name__}")
            self._check_model(conn, info)
            link.info, link.skipped, link.skipped_error = info, None, None
        except (PeerUnavailable, OSError) as e:
            log.debug("peer at %s is unreachable: %s", link.address, e)
            link.conn = None
        except LayerswarmError as e:  # a protocol breach, an error reply, another model
            link.skipped = str(e) if str(e).startswith("peer ") else f"peer at {link.address}: {e}"
            link.skipped_error = e
            log.debug("skipping peer at %s: %s", link.address, e)
            if link.conn is not None:
                link.conn.close()
            link.conn = None

    async def add_peers(self, addresses: Sequence[str]) -> None:
        """Add peers by address (`host:port[/PEERID]`) and read what they serve."""
        known = {str(link.address) for link in self.links}
        for text in addresses:
            if text not in known:
                self.links.append(PeerLink(parse_address(text)))
        await asyncio.gather(*(self._refresh(link) for link in self.links if not link.live))

    def _goodbye(self, conn: Connection, reason: str) -> None:
        for link in self.links:
            if link.conn is conn:
                link.leaving = True
        self.book.ban(conn.peer_id, f"it is leaving ({reason})")
        self.on_event(f"peer {short(conn.peer_id)} is leaving ({reason})")

    def _check_model(self, conn: Connection, info: InfoReply) -> None:
        theirs = info.model.rpartition("@")[2]
        if theirs != self.fingerprint or info.num_layers != self.model_config.num_layers:
            raise LayerswarmError(
                f"peer {conn.peer_id} at {conn.address} serves another model ({info.model}); "
                f"this client has {self.fingerprint}: start both with the same --model"
            )

    def views(self) -> list[PeerView]:
        """The live peers, as the path chooser sees them; liars are left out for good."""
        liars = self.book.trust.liars
        live = [link for link in self.links if link.live and link.info is not None]
        stats = self.book.stats
        return [link.view(stats) for link in live if link.conn and link.conn.peer_id not in liars]

    def liars_note(self, layers: list[int]) -> str:
        """Why some of `layers` lack a peer, when peers that served them were caught lying."""
        caught = self.book.trust.liars
        serving = {
            link.conn.peer_id
            for link in self.links
            if link.info is not None and link.conn is not None and link.conn.peer_id in caught
            if any(link.info.span_start <= layer < link.info.span_end for layer in layers)
        }
        n = len(serving)
        return f"{n} peer{'s' * (n > 1)} serving them banned for lying" if n else ""

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

    @property
    def bans(self) -> BanList:
        return self.book.bans

    @property
    def trust(self) -> TrustLedger:
        return self.book.trust

    async def open_pipeline(self, max_length: int, prefix: Prefix | None = None) -> Pipeline:
        """A session across the swarm with room for `max_length` tokens (on `net`'s loop),
        on the KV pages peers keep for `prefix`'s first tokens where they do."""
        session = RemoteSession(self, max_length)
        await session.open(prefix)
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
        if self.local is not None:
            await self.local.aclose()
        conns = [link.conn for link in self.links if link.conn is not None]
        for conn in conns:
            conn.close()
        await asyncio.gather(*(conn.wait_closed() for conn in conns))


def _same_kind(error: LayerswarmError | None, message: str) -> LayerswarmError:
    """`message` as an error of `error`'s class where it takes a message alone (callers tell
    a `SwarmKeyMismatch` or a `ProtocolError` apart), else as a `LayerswarmError`."""
    try:
        return type(error)(message) if error is not None else LayerswarmError(message)
    except TypeError:  # a class that takes more than a message
        return LayerswarmError(message)


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
    device: torch.device | str = "cpu",
) -> Generator:
    """A generator whose layers run on `peers` (addresses `host:port[/PEERID]`), and on the
    peers that `config` discovers (mDNS, DHT through `config.bootstrap`); the embedding and
    the head run on `device`."""
    config = config or ClientConfig(insecure_plaintext=insecure_plaintext)
    client = SwarmClient(model_dir, peers, config, on_event=on_event)
    head = pack_linears(load_client_head(model_dir, dtype).to(device))
    gen = Generator(head, ChatTokenizer(model_dir), client.open_pipeline, client.net)
    gen.client = client  # type: ignore[attr-defined]  # keeps it alive; for /route
    return gen
