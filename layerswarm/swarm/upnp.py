"""Port mapping on the home router (`--upnp`): UPnP-IGD with the `miniupnpc` package, else
NAT-PMP (`swarm/natpmp.py`) where no IGD answers.

A peer behind NAT asks the router (found by SSDP on the LAN) to forward a public TCP port to
its listening port; the dial-back (`swarm/reachability.py`) then says whether the mapping
really works, and the peer announces `external_ip:port` only if it does. The mapping is
removed when the peer stops (a peer killed with SIGKILL leaves it behind: miniupnpc's Python
binding asks for no lease). miniupnpc is blocking C code: every call here runs in a thread
(`asyncio.to_thread`). Where no UPnP device answers, the gateway is asked over NAT-PMP (RFC
6886), whose mappings are leases: `renew` asks again past half of one.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from layerswarm.errors import LayerswarmError
from layerswarm.swarm.natpmp import (
    LIFETIME,
    NatPmpError,
    default_gateway,
    external_address,
    map_tcp,
)

log = logging.getLogger(__name__)

DESCRIPTION = "layerswarm peer"  # what the router's mapping table shows
DISCOVER_MS = 1000  # unit: ms SSDP waits for routers to answer


class PortMappingError(LayerswarmError):
    """No UPnP router answered, or it refused the mapping."""


@dataclass(frozen=True)
class PortMapping:
    """A TCP port the router forwards to this peer."""

    external_ip: str  # the router's public address
    external_port: int
    internal_host: str  # this machine's LAN address, as the router sees it
    internal_port: int

    @property
    def address(self) -> str:
        return f"{self.external_ip}:{self.external_port}"


def _open(port: int) -> tuple[Any, PortMapping]:
    import miniupnpc  # imported here: only --upnp needs it

    upnp = miniupnpc.UPnP()
    upnp.discoverdelay = DISCOVER_MS
    try:
        if upnp.discover() < 1:
            raise PortMappingError("no UPnP device answered on the LAN")
        upnp.selectigd()
        external_ip = upnp.externalipaddress()
        lan = upnp.lanaddr
        added = False
        for external in (port, 0):  # the same port first, else any the router picks
            if external:
                try:
                    added = bool(upnp.addportmapping(external, "TCP", lan, port, DESCRIPTION, ""))
                except Exception as exc:  # miniupnpc raises a bare Exception with the reason
                    log.info("router refused external port %d: %s", external, exc)
                    continue
                if added:
                    return upnp, PortMapping(external_ip, external, lan, port)
            else:
                picked = upnp.addanyportmapping(port, "TCP", lan, port, DESCRIPTION, "")
                if picked:
                    return upnp, PortMapping(external_ip, int(picked), lan, port)
    except PortMappingError:
        raise
    except Exception as exc:  # miniupnpc raises a bare Exception with the router's reason
        raise PortMappingError(f"UPnP: {exc}") from exc
    raise PortMappingError("the router refused every port mapping asked for")


def _close(upnp: Any, mapping: PortMapping) -> None:
    try:
        upnp.deleteportmapping(mapping.external_port, "TCP")
    except Exception as exc:  # gone already, or the router went away: nothing left to do
        log.info("removing the UPnP mapping %s: %s", mapping.address, exc)


class UpnpMapper:
    """Holds one port mapping (UPnP-IGD, else NAT-PMP); `close` removes it."""

    def __init__(self, natpmp_port: int = 5351) -> None:
        self.mapping: PortMapping | None = None
        self.protocol = ""  # "UPnP-IGD" or "NAT-PMP", once mapped
        self._upnp: Any = None
        self._gateway: str | None = None  # the NAT-PMP gateway, when mapped through it
        self._natpmp_port = natpmp_port
        self._renew_at = 0.0  # unit: loop s when a NAT-PMP lease is renewed

    async def open(self, port: int) -> PortMapping:
        """Map a public TCP port (the same one where the router allows) to local `port`.

        Raises:
            PortMappingError: no router answered, or it refused, over either protocol.
        """
        try:
            self._upnp, mapping = await asyncio.to_thread(_open, port)
            self.protocol = "UPnP-IGD"
        except PortMappingError as igd:
            gateway = default_gateway()
            if gateway is None:
                raise
            try:
                mapping = await self._open_natpmp(gateway, port)
            except NatPmpError as exc:
                raise PortMappingError(f"{igd}; {exc}") from exc
        self.mapping = mapping
        log.info("%s: the router forwards %s to port %d", self.protocol, mapping.address, port)
        return mapping

    async def _open_natpmp(self, gateway: str, port: int) -> PortMapping:
        external_ip, local = await external_address(gateway, self._natpmp_port)
        lease = await map_tcp(gateway, port, port, LIFETIME, self._natpmp_port)
        self._gateway, self.protocol = gateway, "NAT-PMP"
        self._renew_at = asyncio.get_running_loop().time() + lease.lifetime / 2
        return PortMapping(external_ip, lease.external_port, local, port)

    async def renew(self) -> None:
        """Renew a NAT-PMP lease past half its lifetime (UPnP-IGD mappings need nothing).

        Raises:
            PortMappingError: the gateway refused or stopped answering.
        """
        mapping, gateway = self.mapping, self._gateway
        loop = asyncio.get_running_loop()
        if mapping is None or gateway is None or loop.time() < self._renew_at:
            return
        try:
            lease = await map_tcp(
                gateway, mapping.internal_port, mapping.external_port, LIFETIME, self._natpmp_port
            )
        except NatPmpError as exc:
            raise PortMappingError(str(exc)) from exc
        self._renew_at = loop.time() + lease.lifetime / 2

    async def close(self) -> None:
        """Remove the mapping, if one is held."""
        mapping, self.mapping = self.mapping, None
        if mapping is None:
            return
        if self._gateway is not None:
            try:
                await map_tcp(self._gateway, mapping.internal_port, 0, 0, self._natpmp_port)
            except NatPmpError as exc:
                log.info("removing the NAT-PMP mapping %s: %s", mapping.address, exc)
        else:
            await asyncio.to_thread(_close, self._upnp, mapping)
        log.info("%s: removed the mapping %s", self.protocol, mapping.address)
