"""Announcing this peer's signed record over mDNS (see `mdns` for the layout and an example)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from zeroconf import NonUniqueNameException
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from layerswarm.errors import LayerswarmError
from layerswarm.swarm.identity import Identity
from layerswarm.swarm.mdns import (
    SERVICE_TYPE,
    MdnsConfig,
    encode_txt,
    new_zeroconf,
    resolve_interfaces,
    service_name,
)
from layerswarm.swarm.records import PeerRecord, sign_record, stamped


class MdnsAnnouncer:
    """Announces one peer's signed record; re-signs it on each change and before it expires."""

    def __init__(
        self,
        identity: Identity,
        config: MdnsConfig | None = None,
        zeroconf: AsyncZeroconf | None = None,
    ) -> None:
        """`zeroconf`: share one with a browser (the caller closes it); else one of our own."""
        self._identity = identity
        self._config = config or MdnsConfig()
        self._zc = zeroconf
        self._owns_zc = zeroconf is None
        self._info: AsyncServiceInfo | None = None
        self._broadcast: Awaitable[object] | None = None  # zeroconf's repeats of the last one
        self._record: PeerRecord | None = None
        self._signed_at = 0.0  # monotonic s of the last signature

    @property
    def record(self) -> PeerRecord | None:
        """The record last announced, as stamped and signed; None before `start`."""
        return self._record

    async def start(self, record: PeerRecord) -> None:
        """Register this peer's service and announce `record` (probing takes ~1.2 s).

        Raises:
            LayerswarmError: another responder holds this peer ID's name, or it timed out.
            InvalidRecord: `record` is out of range or not this identity's.
        """
        if self._info is not None:
            raise LayerswarmError("the mDNS announcer is already started")
        if self._zc is None:
            self._zc = new_zeroconf(self._config)
        info = self._sign(record)
        try:
            register = self._zc.async_register_service(info)
            self._broadcast = await asyncio.wait_for(register, self._config.register_timeout)
        except NonUniqueNameException as exc:
            raise LayerswarmError(f"another mDNS responder announces peer {info.name}") from exc
        except asyncio.TimeoutError as exc:
            raise LayerswarmError("mDNS registration timed out") from exc
        self._info = info

    async def update(self, record: PeerRecord) -> None:
        """Announce `record` now if it changed or the last signature is due for a refresh.

        Only `timestamp` and `expires_at` are ignored when comparing: the announcer sets them.
        """
        if self._info is None or self._zc is None:
            raise LayerswarmError("the mDNS announcer is not started")
        due = time.monotonic() - self._signed_at >= self._config.refresh_interval
        if not due and _unstamped(record) == _unstamped(self._record):
            return
        info = self._sign(record)
        self._cancel_broadcast()  # its repeats would carry the old TXT
        self._broadcast = await self._zc.async_update_service(info)
        self._info = info

    async def serve_refresh(self, current: Callable[[], PeerRecord]) -> None:
        """Keep the announcement fresh with `current()` until cancelled (run in a task group)."""
        while True:
            age = time.monotonic() - self._signed_at
            await asyncio.sleep(max(0.0, self._config.refresh_interval - age))
            await self.update(current())

    async def close(self) -> None:
        """Say goodbye (browsers forget this peer at once) and release the sockets."""
        zc, info = self._zc, self._info
        self._info = None
        self._cancel_broadcast()
        if zc is not None and info is not None:
            goodbye = await zc.async_unregister_service(info)
            await asyncio.wait_for(goodbye, self._config.register_timeout)
        if zc is not None and self._owns_zc:
            self._zc = None
            await zc.async_close()

    def _sign(self, record: PeerRecord) -> AsyncServiceInfo:
        # On the LAN a peer behind NAT is reached directly: its relayed addresses go last.
        relayed = [a for a in record.addresses if "/" in a]
        direct = [a for a in record.addresses if "/" not in a]
        if direct and relayed:
            record = dataclasses.replace(record, addresses=tuple(direct + relayed))
        record = stamped(record, self._config.record_ttl)
        signed = sign_record(record, self._identity)
        self._record, self._signed_at = record, time.monotonic()
        return AsyncServiceInfo(
            SERVICE_TYPE,
            service_name(record.peer_id),
            port=int(record.addresses[0].rsplit(":", 1)[1]),
            properties=encode_txt(signed, record),
            server=f"{record.peer_id}.local.",
            parsed_addresses=self._host_addresses(record),
        )

    def _host_addresses(self, record: PeerRecord) -> list[str]:
        """The A/AAAA addresses: the record's IP hosts, else the interfaces we announce on."""
        hosts: list[str] = []
        for address in record.addresses:
            try:
                ip = ipaddress.ip_address(address.rsplit(":", 1)[0].strip("[]"))
            except ValueError:
                continue  # a host name: the record carries it, DNS-SD does not need it
            if not ip.is_unspecified:
                hosts.append(str(ip))
        interfaces = resolve_interfaces(self._config.interfaces)
        return hosts or (interfaces if isinstance(interfaces, list) else [])

    def _cancel_broadcast(self) -> None:
        if isinstance(self._broadcast, asyncio.Future):
            self._broadcast.cancel()
        self._broadcast = None


def _unstamped(record: PeerRecord | None) -> PeerRecord | None:
    return None if record is None else dataclasses.replace(record, timestamp=0.0, expires_at=0.0)


@contextlib.asynccontextmanager
async def open_mdns_announcer(
    identity: Identity,
    record: PeerRecord,
    config: MdnsConfig | None = None,
    zeroconf: AsyncZeroconf | None = None,
) -> AsyncIterator[MdnsAnnouncer]:
    """A started `MdnsAnnouncer` announcing `record`, closed (goodbye sent) on exit."""
    announcer = MdnsAnnouncer(identity, config, zeroconf)
    try:
        await announcer.start(record)
        yield announcer
    finally:
        await announcer.close()
