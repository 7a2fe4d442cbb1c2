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

The announcer lives in `mdns_announce`, the browser in `mdns_browse`; this module holds their
configuration and the TXT layout.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import ifaddr
from zeroconf import (
    InterfaceChoice,
)
from zeroconf.asyncio import AsyncZeroconf

from layerswarm.errors import InvalidRecord, LayerswarmError
from layerswarm.swarm.records import (
    MAX_RECORD_BYTES,
    PeerRecord,
    RecordFault,
)

log = logging.getLogger(__name__)

SERVICE_TYPE = "_layerswarm._tcp.local."
TXT_VERSION = b"1"
CHUNK_CHARS = 250  # base64 characters per rN string: "rN=" plus these stays under 255 bytes
MAX_CHUNKS = math.ceil(4 * math.ceil(MAX_RECORD_BYTES / 3) / CHUNK_CHARS)  # the largest: 6
ESSENTIAL_BYTES = 200  # bytes: longest unsigned essential value (names are cut to fit)
TYPE_TXT = 16  # DNS record type TXT (RFC 1035)
CLASS_IN = 1  # DNS class IN


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


def parse_txt(text: bytes) -> dict[bytes, bytes | None]:
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


def new_zeroconf(config: MdnsConfig) -> AsyncZeroconf:
    return AsyncZeroconf(interfaces=resolve_interfaces(config.interfaces))
