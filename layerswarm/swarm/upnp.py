"""Port mapping on the home router over UPnP-IGD (`--upnp`), with the `miniupnpc` package.

A peer behind NAT asks the router (found by SSDP on the LAN) to forward a public TCP port to
its listening port; the dial-back (`swarm/reachability.py`) then says whether the mapping
really works, and the peer announces `external_ip:port` only if it does. The mapping is
removed when the peer stops (a peer killed with SIGKILL leaves it behind: miniupnpc's Python
binding asks for no lease). miniupnpc is blocking C code: every call here runs in a thread
(`asyncio.to_thread`). NAT-PMP/PCP are not spoken here (miniupnpc speaks UPnP-IGD only).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from layerswarm.errors import LayerswarmError

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
    """Holds one port mapping; `close` removes it."""

    def __init__(self) -> None:
        self.mapping: PortMapping | None = None
        self._upnp: Any = None

    async def open(self, port: int) -> PortMapping:
        """Map a public TCP port (the same one where the router allows) to local `port`.

        Raises:
            PortMappingError: no router answered, or it refused.
        """
        self._upnp, mapping = await asyncio.to_thread(_open, port)
        self.mapping = mapping
        log.info("UPnP: the router forwards %s to port %d", mapping.address, port)
        return mapping

    async def close(self) -> None:
        """Remove the mapping, if one is held."""
        mapping, self.mapping = self.mapping, None
        if mapping is not None:
            await asyncio.to_thread(_close, self._upnp, mapping)
            log.info("UPnP: removed the mapping %s", mapping.address)
