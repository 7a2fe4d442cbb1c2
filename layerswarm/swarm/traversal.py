"""Crossing home routers: learn whether this peer is reachable, then serve as a relay or hold
reservations on relays, and say which addresses to announce.

At start a peer asks a few others (`NatConfig.reach_peers`, and peers it heard of) to dial it
back (`swarm/reachability.py`). Dialed back: it is `public`, announces the address they saw
first, and serves as a relay with `relay` `auto` or `on`. Not dialed back: it is behind NAT, and
keeps reservations on up to `max_relays` of the relays among those it asked, announcing
`host:port/RELAYID/p2p-circuit` addresses first (`relayed`); a lost relay is replaced in the
background. With `upnp`, a port mapping comes first (`swarm/upnp.py`), and the dial-back then
says whether the router honoured it. A dialer that reached this peer through a relay may punch
a direct connection to it: `Traversal.punch` answers its side (`swarm/punch.py`).

Why relays are on by default (`auto`) on public peers: a swarm of home peers needs some, only
public peers can be relays, and the limits (`RelayConfig`) bound what one costs; Petals runs
libp2p's auto-relay on its servers for the same reason. `off` opts out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from layerswarm.errors import ConfigError, LayerswarmError
from layerswarm.swarm.identity import Identity
from layerswarm.swarm.listen import Handler, Server
from layerswarm.swarm.messages import JsonValue
from layerswarm.swarm.punch import HolePunchService
from layerswarm.swarm.reachability import (
    PRIVATE,
    PUBLIC,
    RELAYED,
    UNKNOWN,
    DialBackService,
    Reachability,
    ask_dial_back,
)
from layerswarm.swarm.relay import NAT_GROUP, Relay, RelayConfig
from layerswarm.swarm.reservation import Reservation
from layerswarm.swarm.services import SwarmServices
from layerswarm.swarm.transport import Address, TransportConfig, parse_address
from layerswarm.swarm.upnp import PortMappingError, UpnpMapper

log = logging.getLogger(__name__)

NAT = NAT_GROUP  # the flags' group
RELAY_CHOICES = ("auto", "on", "off")


def _opt(help: str, **more: object) -> dict[str, object]:
    return {"help": help, "group": NAT, **more}


@dataclass(frozen=True)
class NatConfig:
    """How a peer finds out whether it is reachable, and what it does about it."""

    # host:port/PEERID of peers to ask for a dial-back, beside the peers heard of at start
    reach_peers: tuple[str, ...] = field(
        default=(),
        metadata=_opt(
            "ask this peer (host:port/PEERID, a data-plane address) to dial this one back, to "
            "learn whether it is reachable (repeat for more; peers heard of are asked too)",
            flag="--reach-peer",
            metavar="ADDRESS",
        ),
    )
    # auto: serve as a relay when dialed back; on: always; off: never
    relay: str = field(
        default="auto",
        metadata=_opt(
            "serve as a relay for peers behind NAT: auto (the default) when others can dial "
            "this peer, on, or off",
            choices=RELAY_CHOICES,
        ),
    )
    relay_port: int = field(
        default=0,
        metadata=_opt("TCP port of the relay; 0 (the default) picks a free one", metavar="N"),
    )
    # host:port/PEERID of relays to reserve on when behind NAT, beside those found
    relays: tuple[str, ...] = field(
        default=(),
        metadata=_opt(
            "when behind NAT, reserve a slot on this relay (host:port/PEERID; repeat for more)",
            flag="--reserve-on",
            metavar="ADDRESS",
        ),
    )
    max_relays: int = 2  # reservations held at once, behind NAT
    max_asked: int = 4  # peers asked for a dial-back at once
    dial_back_timeout: float = 10.0  # unit: s for one whole dial-back request
    retry_interval: float = 5.0  # unit: s between attempts to replace a lost reservation
    upnp: bool = field(
        default=False,
        metadata=_opt(
            "ask the router for a port mapping over UPnP-IGD, else NAT-PMP (removed when "
            "the peer stops)"
        ),
    )
    limits: RelayConfig = field(default_factory=RelayConfig)  # a relay's limits

    def __post_init__(self) -> None:
        if self.relay not in RELAY_CHOICES:
            raise ConfigError("relay", f"one of {', '.join(RELAY_CHOICES)}, not {self.relay}")
        for name in ("reach_peers", "relays"):
            for text in getattr(self, name):
                try:
                    pinned = parse_address(text).peer_id is not None
                except ValueError as e:
                    raise ConfigError(name, str(e)) from None
                if not pinned:
                    raise ConfigError(name, f"{text}: name the peer ID, host:port/PEERID")
        for name in ("max_relays", "max_asked"):
            if getattr(self, name) < 1:
                raise ConfigError(name, "must be at least 1")


class Traversal:
    """One peer's reachability, its relay (when public) and its reservations (when not)."""

    def __init__(
        self, config: NatConfig, identity: Identity, transport: TransportConfig, relay_host: str
    ) -> None:
        self.config = config
        self.status = UNKNOWN  # PUBLIC, RELAYED, PRIVATE (behind NAT, no relay yet) or UNKNOWN
        self.reachability: Reachability | None = None
        self.relay: Relay | None = None  # this peer's relay, when it serves as one
        self.reservations: dict[str, Reservation] = {}  # relay peer ID -> held reservation
        self.local: tuple[str, ...] = ()  # the addresses the peer listens at
        self.mapped: str | None = None  # host:port a UPnP mapping gave, if any
        self.mapped_by = ""  # the protocol that mapped it: UPnP-IGD or NAT-PMP
        self._upnp = UpnpMapper() if config.upnp else None
        self._identity = identity
        self._transport = transport
        self._relay_host = relay_host
        self._dial_back = DialBackService(identity, transport, config.dial_back_timeout)
        self.punch = HolePunchService(transport)  # answers dialers that reached it relayed
        self._services: SwarmServices | None = None
        self._server: Server | None = None
        self._candidates: Callable[[], Sequence[Address]] = list
        self._holding: dict[str, asyncio.Task[None]] = {}  # relay peer ID -> its `_hold`, owned
        # this peer's signed record, for relays to carry, and how often to renew it (s)
        self.signed_record: Callable[[], bytes | None] = lambda: None
        self.record_interval = 20.0

    def handler(self, inner: Handler) -> SwarmServices:
        """The handler to serve with: the swarm's requests here, the rest to `inner`."""
        self._services = SwarmServices(inner, self._dial_back, self.punch)
        self._services.nat_summary = self.summary
        return self._services

    @property
    def addresses(self) -> tuple[str, ...]:
        """What to announce, best first: the public address, or relayed ones, then local ones."""
        first: list[str] = []
        if self.reachability is not None and self.reachability.public_address:
            first.append(self.reachability.public_address)
        first += [r.address for r in self.reservations.values() if r.address]
        rest = [a for a in self.local if a not in first]
        return tuple([*first, *rest][:4])

    def carried(self) -> list[bytes]:
        """The records this peer's relay carries for its reservation holders."""
        return self.relay.carried() if self.relay is not None else []

    def summary(self) -> dict[str, JsonValue]:
        """For the peer's info reply (fresh at each) and `swarm-peer status`."""
        info: dict[str, JsonValue] = {"reachability": self.status}
        if self.reachability is not None and self.reachability.observed_host:
            info["observed_host"] = self.reachability.observed_host
        if self.relay is not None:
            stats = self.relay.stats
            info["relay"] = {
                "port": self.relay.port,
                "reservations": len(self.relay._reservations),
                "circuits": stats.circuits,
                "refused": stats.refused,
                "bytes_relayed": stats.bytes_relayed,
            }
        if self.reservations:
            info["relays"] = [r.address or "" for r in self.reservations.values()]
        punches = self.punch.stats
        if punches.punched or punches.failed:
            info["punched"], info["punch_failed"] = punches.punched, punches.failed
        if self.mapped:
            info["upnp"], info["mapped_by"] = self.mapped, self.mapped_by
        return info

    async def start(
        self,
        server: Server,
        local: Sequence[str],
        port: int,
        candidates: Callable[[], Sequence[Address]],
    ) -> None:
        """Ask for dial-backs at `port`, then open the relay or reserve on relays.

        Args:
            server: the peer's listening server (relayed dialers are served there).
            local: the addresses the peer listens at (announced after the others).
            port: the port to announce: the listening one, or a UPnP mapping's.
            candidates: the data-plane addresses of peers heard of so far, pinned.
        """
        self._server, self.local, self._candidates = server, tuple(local), candidates
        self.punch.server = server
        if self._upnp is not None:
            try:
                port = (await self._upnp.open(port)).external_port
                self.mapped = self._upnp.mapping.address if self._upnp.mapping else None
                self.mapped_by = self._upnp.protocol
            except PortMappingError as exc:
                log.warning("no UPnP port mapping: %s", exc)
        await self.check(port)
        # Behind a UPnP mapping only the data-plane port is forwarded: no relay port to offer.
        public = self.status == PUBLIC and self.mapped is None
        if self.config.relay == "on" or (self.config.relay == "auto" and public):
            await self._open_relay()
        if self.status != PUBLIC:
            await self._reserve_once()

    async def check(self, port: int) -> Reachability:
        """Ask the configured peers and those heard of to dial back at `port`."""
        asked = self._asked()
        if not asked:
            log.info("no peer to ask for a dial-back: reachability unknown")
            return Reachability(UNKNOWN, None, None, ())
        found = await ask_dial_back(
            asked, self._identity, port, self._transport, self.config.dial_back_timeout
        )
        self.reachability = found
        self.status = found.status
        log.info("reachability: %s (seen as %s)", found.status, found.observed_host or "?")
        return found

    def _asked(self) -> list[Address]:
        peers = [parse_address(a) for a in self.config.reach_peers]
        seen = {p.peer_id for p in peers} | {self._identity.peer_id}
        for candidate in self._candidates():
            if candidate.peer_id not in seen and candidate.relay is None:
                seen.add(candidate.peer_id)
                peers.append(candidate)
        return peers[: max(self.config.max_asked, len(self.config.reach_peers))]

    async def _open_relay(self) -> None:
        relay = Relay(self.config.limits)
        await relay.open(self._relay_host, self.config.relay_port)
        self.relay = relay
        if self._services is not None:
            self._services.serve_relay(relay)
        log.info("serving as a relay on port %d", relay.port)

    def _relay_choices(self) -> list[Address]:
        found = self.reachability.relays if self.reachability is not None else []
        chosen = [parse_address(a) for a in self.config.relays] + found
        unique: dict[str, Address] = {}
        for a in chosen:
            if a.peer_id and a.peer_id not in unique and a.peer_id not in self.reservations:
                unique[a.peer_id] = a
        return list(unique.values())

    async def _reserve_once(self) -> None:
        """Start reservations up to max_relays; wait (a little) until the first is held."""
        if self._server is None:
            return
        started: list[asyncio.Event] = []
        for relay in self._relay_choices()[: self.config.max_relays - len(self.reservations)]:
            held = asyncio.Event()
            reservation = Reservation(
                relay,
                self._identity,
                self._transport,
                self._server,
                self.signed_record,
                self.record_interval,
            )
            assert relay.peer_id is not None  # _relay_choices keeps pinned ones only
            self.reservations[relay.peer_id] = reservation
            self._holding[relay.peer_id] = asyncio.create_task(self._hold(reservation, held))
            started.append(held)
        if started:
            waits = [asyncio.create_task(e.wait()) for e in started]
            timeout = self._transport.connect_timeout + self._transport.request_timeout
            _, pending = await asyncio.wait(waits, timeout=timeout, return_when="FIRST_COMPLETED")
            for task in pending:
                task.cancel()
        if any(r.address for r in self.reservations.values()):
            self.status = RELAYED

    async def _hold(self, reservation: Reservation, held: asyncio.Event) -> None:
        try:
            await reservation.serve(held)
        except (LayerswarmError, OSError) as exc:
            log.warning("lost the reservation on relay %s: %s", reservation.relay, exc)
        except Exception:  # a bug here must not go unseen, nor stop the peer serving
            log.exception("holding the reservation on relay %s failed", reservation.relay)
        finally:
            assert reservation.relay.peer_id is not None
            self.reservations.pop(reservation.relay.peer_id, None)
            self._holding.pop(reservation.relay.peer_id, None)
            if not any(r.address for r in self.reservations.values()) and self.status == RELAYED:
                self.status = PRIVATE

    async def serve(self) -> None:
        """Behind NAT, keep `max_relays` reservations up until cancelled (asking for dial-backs
        again when no relay is left to try)."""
        try:
            while True:
                await asyncio.sleep(self.config.retry_interval)
                await self._renew_mapping()
                if self.status not in (PRIVATE, RELAYED):
                    continue  # public needs no relay; unknown has no peer that answered
                if len(self.reservations) >= self.config.max_relays:
                    continue
                if not self.reservations and not self._relay_choices() and self.local:
                    await self.check(int(self.local[0].rpartition(":")[2]))  # relays anew
                if self.status != PUBLIC:
                    await self._reserve_once()
        finally:
            await self.aclose()

    async def _renew_mapping(self) -> None:
        if self._upnp is None:
            return
        try:
            await self._upnp.renew()
        except PortMappingError as exc:
            log.warning("could not renew the port mapping %s: %s", self.mapped, exc)

    async def aclose(self) -> None:
        """Drop every reservation, close the relay, and remove the UPnP mapping."""
        if self._upnp is not None:
            await self._upnp.close()
        for task in list(self._holding.values()):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._holding.clear()
        self.reservations.clear()
        if self.relay is not None:
            if self._services is not None:
                self._services.serve_relay(None)
            self.relay.close()
            await self.relay.wait_closed()
            self.relay = None
