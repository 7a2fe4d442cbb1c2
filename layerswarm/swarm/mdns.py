"""LAN discovery over mDNS: announce this peer's signed record, and browse the other peers'.

Each peer registers one DNS-SD service of type `_layerswarm._tcp.local.` named by its peer ID
(`<peer ID>._layerswarm._tcp.local.`); its SRV port is the data-plane port. Its TXT record holds

    txtvers=1               the layout's version (RFC 6763, 6.7)
    id=<peer ID>            essentials for people and tools such as avahi-browse; unsigned,
    model=<model name>      so a browser never trusts them: it reads the signed record
    hash=<model hash>
    span=<start>:<end>      half-open, like a Python slice
    addr=<host:port>,...    as many data-plane addresses as fit 200 bytes
    r0=... r1=...           the signed record (`records.sign_record`), base64, 250 characters each

Every TXT string stays under DNS's 255-byte limit. A typical record (SmolLM2, one address) is
~330 bytes signed, so r0 and r1, and the whole TXT record ~600 bytes: one packet.

A browser keeps only records that verify (`records.verify_record`), that are announced under
their own peer ID's name, and that are newer than the one it holds; it drops a record when its
service goes away or when it expires, so a peer that died without a goodbye disappears after
at most `MdnsConfig.record_ttl` seconds. The announcer stamps and re-signs the record itself.

    # a peer
    async with open_mdns_announcer(identity, record, config) as announcer:
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(announcer.serve_refresh(current_record))  # keeps it fresh
            ...
            await announcer.update(record)  # span, memory or load changed: re-announce now

    # a client
    async with open_mdns_browser(config) as browser:
        records = await browser.wait_for(lambda rs: covers(rs), timeout=5.0)

Everything runs on the caller's asyncio loop (zeroconf's `AsyncZeroconf`), no threads. Measured
between two network namespaces joined by a veth pair: registration takes ~1.2 s of probing; an
update is in the browser's view 1-5 ms after `update()` begins (median ~2 ms).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import ipaddress
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

import ifaddr
from zeroconf import (
    InterfaceChoice,
    NonUniqueNameException,
    ServiceStateChange,
    Zeroconf,
    current_time_millis,
)
from zeroconf._dns import DNSText  # not re-exported by zeroconf, stable since 0.32
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from layerswarm.errors import InvalidRecord, LayerswarmError
from layerswarm.swarm.identity import Identity
from layerswarm.swarm.records import (
    MAX_RECORD_BYTES,
    PeerRecord,
    RecordFault,
    sign_record,
    stamped,
    verify_record,
)

log = logging.getLogger(__name__)

SERVICE_TYPE = "_layerswarm._tcp.local."
TXT_VERSION = b"1"
CHUNK_CHARS = 250  # base64 characters per rN string: "rN=" plus these stays under 255 bytes
MAX_CHUNKS = math.ceil(4 * math.ceil(MAX_RECORD_BYTES / 3) / CHUNK_CHARS)  # the largest: 6
ESSENTIAL_BYTES = 200  # bytes: longest unsigned essential value (names are cut to fit)
MAX_PEERS = 4096  # records a browser holds at most (each costs ~1 KB)
MAX_REJECTED = 256  # services whose rejection reasons a browser remembers
_TYPE_TXT = 16  # DNS record type TXT (RFC 1035)
_CLASS_IN = 1  # DNS class IN


@dataclass(frozen=True)
class MdnsConfig:
    """How a peer announces itself, and a client browses, on the LAN."""

    # which interfaces: every one, or these IP addresses or interface names ("eth0")
    interfaces: InterfaceChoice | tuple[str, ...] = InterfaceChoice.All
    record_ttl: float = 60.0  # s: each signed record is valid this long after signing
    refresh_interval: float = 20.0  # s: re-sign and re-announce an unchanged record this often
    register_timeout: float = 10.0  # s: give up registering (probing takes ~1.2 s)
    resolve_timeout: float = 3.0  # s: wait for a service's TXT when an event came without it
    max_clock_skew: float = 30.0  # s: how far ahead of ours another peer's clock may run


def service_name(peer_id: str) -> str:
    """The mDNS service instance name a peer announces itself under."""
    return f"{peer_id}.{SERVICE_TYPE}"


def encode_txt(signed: bytes, record: PeerRecord) -> dict[bytes, bytes]:
    """The TXT properties announcing `record`, signed as `signed` (see the module docstring)."""
    text = base64.b64encode(signed)
    chunks = [text[i : i + CHUNK_CHARS] for i in range(0, len(text), CHUNK_CHARS)]
    addresses = b""
    for address in record.addresses:  # as many as fit, best first
        joined = addresses + b"," + address.encode() if addresses else address.encode()
        if len(joined) > ESSENTIAL_BYTES:
            break
        addresses = joined
    properties = {
        b"txtvers": TXT_VERSION,
        b"id": record.peer_id.encode(),
        b"model": _cut(record.model),
        b"hash": record.model_hash.encode(),
        b"span": f"{record.span_start}:{record.span_end}".encode(),
        b"addr": addresses,
    }
    properties.update({f"r{i}".encode(): chunk for i, chunk in enumerate(chunks)})
    return properties


def decode_txt(properties: Mapping[bytes, bytes | None]) -> bytes:
    """The signed record that TXT `properties` carry (not yet verified).

    Raises:
        InvalidRecord: no record, or its chunks are missing, too many or not base64.
    """
    chunks: list[bytes] = []
    for i in range(MAX_CHUNKS + 1):
        chunk = properties.get(f"r{i}".encode())
        if chunk is None:
            break
        chunks.append(chunk)
    if not chunks or len(chunks) > MAX_CHUNKS:
        raise InvalidRecord(RecordFault.MALFORMED, f"TXT holds {len(chunks)} record chunks")
    try:
        return base64.b64decode(b"".join(chunks), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidRecord(RecordFault.MALFORMED, f"TXT record chunks: {exc}") from exc


def resolve_interfaces(interfaces: InterfaceChoice | Sequence[str]) -> InterfaceChoice | list[str]:
    """What zeroconf takes for `interfaces`: interface names become their IPv4 addresses.

    Raises:
        LayerswarmError: a name that is no interface with an IPv4 address, or an empty list.
    """
    if isinstance(interfaces, InterfaceChoice):
        return interfaces
    out: list[str] = []
    for item in interfaces:
        try:
            out.append(str(ipaddress.ip_address(item)))
            continue
        except ValueError:
            pass
        ips = [
            str(ip.ip)
            for adapter in ifaddr.get_adapters()
            if item in (adapter.name, adapter.nice_name)
            for ip in adapter.ips
            if ip.is_IPv4
        ]
        if not ips:
            raise LayerswarmError(f"no network interface {item!r} with an IPv4 address")
        out.extend(ips)
    if not out:
        raise LayerswarmError("no mDNS interface given")
    return out


def _cut(value: str) -> bytes:
    return value.encode()[:ESSENTIAL_BYTES].decode(errors="ignore").encode()


def _parse_txt(text: bytes) -> dict[bytes, bytes | None]:
    """TXT record data as properties; the first of repeated keys wins (RFC 6763, 6.4)."""
    properties: dict[bytes, bytes | None] = {}
    i = 0
    while i < len(text):
        item = text[i + 1 : i + 1 + text[i]]
        i += 1 + text[i]
        key, sep, value = item.partition(b"=")
        if key and key.lower() not in properties:
            properties[key.lower()] = value if sep else None
    return properties


def _new_zeroconf(config: MdnsConfig) -> AsyncZeroconf:
    return AsyncZeroconf(interfaces=resolve_interfaces(config.interfaces))


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
            self._zc = _new_zeroconf(self._config)
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


class MdnsBrowser:
    """The verified records of the peers announcing on the LAN, kept current as they change."""

    def __init__(
        self,
        config: MdnsConfig | None = None,
        zeroconf: AsyncZeroconf | None = None,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        """`on_change()` runs on the loop after each change of `records()` or `rejected()`."""
        self._config = config or MdnsConfig()
        self._zc = zeroconf
        self._owns_zc = zeroconf is None
        self._on_change = on_change
        self._browser: AsyncServiceBrowser | None = None
        self._records: dict[str, PeerRecord] = {}  # service name -> its newest valid record
        self._rejected: dict[str, str] = {}  # service name -> why its record was refused
        self._resolving: dict[str, asyncio.Task[None]] = {}  # owned here, cancelled on close
        self._expiry: asyncio.TimerHandle | None = None
        self._changed = asyncio.Event()  # replaced on every change: waiters hold the old one

    async def start(self) -> None:
        """Start browsing: records arrive as peers answer (within ~0.1 s on a quiet LAN)."""
        if self._browser is not None:
            raise LayerswarmError("the mDNS browser is already started")
        if self._zc is None:
            self._zc = _new_zeroconf(self._config)
        self._browser = AsyncServiceBrowser(
            self._zc.zeroconf, SERVICE_TYPE, handlers=[self._on_service]
        )

    async def close(self) -> None:
        """Stop browsing and release the sockets."""
        browser, self._browser = self._browser, None
        if browser is not None:
            await browser.async_cancel()
        tasks = list(self._resolving.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._expiry is not None:
            self._expiry.cancel()
        if self._zc is not None and self._owns_zc:
            zc, self._zc = self._zc, None
            await zc.async_close()

    def records(self, model_hash: str | None = None) -> list[PeerRecord]:
        """The valid records now, sorted by peer ID; only those of `model_hash` if given."""
        now = time.time()
        return sorted(
            (
                r
                for r in self._records.values()
                if r.expires_at > now and model_hash in (None, r.model_hash)
            ),
            key=lambda r: r.peer_id,
        )

    def rejected(self) -> dict[str, str]:
        """Services whose last record was refused, and why (for diagnostics: clocks, forgeries)."""
        return dict(self._rejected)

    async def wait_for(
        self, predicate: Callable[[list[PeerRecord]], bool], timeout: float
    ) -> list[PeerRecord]:
        """Wait until `predicate(self.records())` holds; returns those records.

        Raises:
            TimeoutError: it did not hold within `timeout` seconds.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate(records := self.records()):
            changed = self._changed
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"mDNS view did not reach the wanted state in {timeout} s")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(changed.wait(), remaining)
        return records

    # --- zeroconf events, on the loop ------------------------------------------------------

    def _on_service(
        self,
        zeroconf: Zeroconf,
        service_type: str,
        name: str,
        state_change: ServiceStateChange,
    ) -> None:
        try:
            if state_change is ServiceStateChange.Removed:
                self._forget(name)
            elif texts := self._cached_texts(name):
                self._consider(name, texts)
            elif name not in self._resolving:
                task = asyncio.get_running_loop().create_task(self._resolve(name))
                self._resolving[name] = task
        except Exception:  # never raise into zeroconf's packet handling
            log.exception("mDNS: handling %s of %s failed", state_change, name)

    async def _resolve(self, name: str) -> None:
        """Ask for a service's TXT record when an event came without it."""
        try:
            if self._zc is None:
                return
            info = AsyncServiceInfo(SERVICE_TYPE, name)
            await info.async_request(self._zc.zeroconf, self._config.resolve_timeout * 1000)
            texts = self._cached_texts(name) or ([info.text] if info.text else [])
            if texts:
                self._consider(name, texts)
            else:
                self._reject(name, f"no TXT record within {self._config.resolve_timeout} s")
        except Exception:  # a bug here must not end discovery: log it, keep browsing
            log.exception("mDNS: resolving %s failed", name)
        finally:
            if self._resolving.get(name) is asyncio.current_task():
                del self._resolving[name]

    def _cached_texts(self, name: str) -> list[bytes]:
        """Every live TXT record zeroconf holds for `name` (an update can leave two for ~1 s)."""
        if self._zc is None:
            return []
        now = current_time_millis()
        cached = self._zc.zeroconf.cache.async_all_by_details(name, _TYPE_TXT, _CLASS_IN)
        return [r.text for r in cached if isinstance(r, DNSText) and not r.is_expired(now)]

    def _consider(self, name: str, texts: list[bytes]) -> None:
        """Keep the newest record among `texts` that verifies, if newer than the one held."""
        best: PeerRecord | None = None
        fault: InvalidRecord | None = None
        for text in texts:
            try:
                record = verify_record(
                    decode_txt(_parse_txt(text)), max_clock_skew=self._config.max_clock_skew
                )
                if service_name(record.peer_id) != name:
                    raise InvalidRecord(
                        RecordFault.KEY_MISMATCH, f"record of {record.peer_id} announced as {name}"
                    )
            except InvalidRecord as exc:
                fault = exc
                continue
            if best is None or record.timestamp > best.timestamp:
                best = record
        held = self._records.get(name)
        if best is None:
            self._reject(name, str(fault))
        elif held is not None and best.timestamp < held.timestamp:
            log.debug("mDNS: ignoring an older record of %s", name)
        elif held is None and len(self._records) >= MAX_PEERS:
            self._reject(name, f"already holding the records of {MAX_PEERS} peers")
        elif best != held:
            self._records[name] = best
            self._rejected.pop(name, None)
            self._schedule_expiry()
            self._notify()

    def _reject(self, name: str, reason: str) -> None:
        log.info("mDNS: ignoring %s: %s", name, reason)
        self._rejected.pop(name, None)
        self._rejected[name] = reason
        while len(self._rejected) > MAX_REJECTED:
            del self._rejected[next(iter(self._rejected))]
        self._notify()

    def _forget(self, name: str) -> None:
        task = self._resolving.pop(name, None)
        if task is not None:
            task.cancel()
        held = self._records.pop(name, None)
        self._rejected.pop(name, None)
        if held is not None:
            self._schedule_expiry()
            self._notify()

    def _schedule_expiry(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        if self._records:
            delay = min(r.expires_at for r in self._records.values()) - time.time()
            self._expiry = asyncio.get_running_loop().call_later(max(0.0, delay), self._expire)

    def _expire(self) -> None:
        now = time.time()
        expired = [name for name, r in self._records.items() if r.expires_at <= now]
        for name in expired:
            del self._records[name]
            self._reject(name, f"{RecordFault.EXPIRED}: its peer stopped refreshing it")
        self._schedule_expiry()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()
        if self._on_change is not None:
            self._on_change()


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


@contextlib.asynccontextmanager
async def open_mdns_browser(
    config: MdnsConfig | None = None,
    zeroconf: AsyncZeroconf | None = None,
    on_change: Callable[[], None] | None = None,
) -> AsyncIterator[MdnsBrowser]:
    """A started `MdnsBrowser`, closed on exit."""
    browser = MdnsBrowser(config, zeroconf, on_change)
    try:
        await browser.start()
        yield browser
    finally:
        await browser.close()
