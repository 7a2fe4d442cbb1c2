"""Peer records: what a peer says it serves, signed with its key so any reader can check it.

A `PeerRecord` names the peer, its data-plane addresses, the model and span it serves, and a
few measured numbers. `sign_record(record, identity)` turns it into compact bytes that fit a
DHT value and, split into a few strings, an mDNS TXT record; `verify_record(data)` turns such
bytes back into a record, or raises `InvalidRecord` whose `reason` is one of `RecordFault`.

The bytes are a msgpack array `[public key, body, signature]`:

- `public key`: the signer's raw 32-byte Ed25519 key; the record's peer ID must be its ID.
- `body`: msgpack of the record's fields as one array, in the order `PeerRecord` declares them.
- `signature`: Ed25519 over `SIGNATURE_DOMAIN + body`, checked on the body bytes exactly as
  received, so a reader never needs to re-encode anything.

A record with SmolLM2's name, one address and every field set takes ~330 bytes. Records carry
their own validity window (`timestamp`, `expires_at`): a reader drops a record once it expires,
even if the transport that carried it still holds it, so a peer re-signs its record before then.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

import msgpack

from layerswarm.errors import InvalidRecord
from layerswarm.swarm.identity import (
    PUBLIC_KEY_BYTES,
    SIGNATURE_BYTES,
    Identity,
    peer_id_from_public_key,
    verify_signature,
)

SIGNATURE_DOMAIN = b"layerswarm-record-v1"  # signed before the body: no other signature matches
MAX_RECORD_BYTES = 1024  # bytes: largest signed record accepted (a DHT value, ~6 TXT strings)
MAX_RECORD_TTL = 24 * 3600.0  # s: longest validity window, expires_at - timestamp
MAX_ADDRESSES = 4  # data-plane addresses in one record
# characters in one address: a relayed one, `host:port/RELAYID/p2p-circuit`, takes ~90
MAX_ADDRESS_CHARS = 128
MAX_LAYERS = 2**20  # layers: bound on span fields (as in the wire protocol)
MAX_TOKENS = 2**31 - 1  # tokens: bound on cache sizes (as in the wire protocol)
MAX_RATE = 1e15  # bound on measured rates (TFLOPS, tokens or steps per second per layer)
DTYPES = ("float32", "float16", "bfloat16")
QUANTS = ("none", "int8", "int4")


class RecordFault:
    """The reasons an `InvalidRecord` gives."""

    MALFORMED = "malformed"  # not a record's bytes at all, or a field of the wrong type
    BAD_SIGNATURE = "bad_signature"  # the signature does not match the key and body
    KEY_MISMATCH = "key_mismatch"  # signed by one key, claiming another key's peer ID
    EXPIRED = "expired"  # expires_at has passed
    FUTURE = "future"  # stamped later than now plus the allowed clock skew
    OUT_OF_RANGE = "out_of_range"  # a field's value is not allowed (span, sizes, names...)


@dataclass(frozen=True)
class PeerRecord:
    """What one peer serves and how fast, as it claims it (the router trusts its own measures)."""

    peer_id: str  # base58 libp2p peer ID of the signer, "12D3KooW..."
    addresses: tuple[str, ...]  # data-plane addresses, "host:port" or "[v6]:port", best first
    model: str  # model name, e.g. "HuggingFaceTB/SmolLM2-135M-Instruct"
    model_hash: str  # 16 lowercase hex: the weights' fingerprint; peers of two hashes never mix
    span_start: int  # first layer served
    span_end: int  # one past the last layer served (half-open span)
    num_layers: int  # layers in the whole model
    dtype: str  # compute dtype: one of DTYPES
    software_version: str  # the peer's layerswarm version, e.g. "0.1.0"
    protocol_version: int  # the wire protocol version the peer speaks
    quant: str = "none"  # weight quantization: one of QUANTS
    # bytes: this peer's share of its device's free memory (VRAM on a GPU; peers sharing a GPU
    # each announce an equal part), room for more layers or cache
    free_memory_bytes: int = 0
    tflops: float = 0.0  # TFLOPS: measured matmul throughput of the compute device
    prefill_tokens_per_s_per_layer: float = 0.0  # tokens/s: measured prefill speed of one layer
    decode_steps_per_s_per_layer: float = 0.0  # steps/s: measured one-token steps of one layer
    cache_tokens_free: int = 0  # tokens: KV-cache room left
    cache_tokens_total: int = 0  # tokens: KV-cache room in all
    load: int = 0  # sessions: inference sessions open on this peer now (not a utilisation)
    device: str = "cpu"  # where the span runs: "cpu", or the GPU's name ("NVIDIA L4")
    total_memory_bytes: int = 0  # bytes: this peer's share of its device's memory (VRAM on a GPU)
    timestamp: float = 0.0  # unix s: when the record was signed
    expires_at: float = 0.0  # unix s: readers drop the record from then on


BUNDLE_TAG = "layerswarm-records-v1"  # a bundle's first element: several signed records in one


def bundle(signed: list[bytes]) -> bytes:
    """Several signed records as one value (a relay carries its reservation holders' records
    beside its own in the DHT); each is still checked on its own by `unbundle`'s caller."""
    packed: bytes = msgpack.packb([BUNDLE_TAG, signed], use_bin_type=True)
    return packed


def unbundle(data: bytes, max_records: int = 16) -> list[bytes]:
    """The signed records in `data`: those of a bundle, or `data` itself (not checked here)."""
    if not data.startswith(b"\x92"):  # a bundle is a msgpack array of two; a record of three
        return [data]
    try:
        tag, items = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception:  # msgpack raises many kinds: then it is no bundle
        return [data]
    if tag != BUNDLE_TAG or type(items) is not list:
        return [data]
    return [item for item in items[:max_records] if type(item) is bytes]


def stamped(record: PeerRecord, ttl: float, now: float | None = None) -> PeerRecord:
    """`record` stamped as signed now and valid for `ttl` seconds (what a signer does first)."""
    now = time.time() if now is None else now
    return dataclasses.replace(record, timestamp=now, expires_at=now + ttl)


def sign_record(record: PeerRecord, identity: Identity) -> bytes:
    """Sign `record` with `identity`'s key; returns the bytes to publish.

    Args:
        record: the record, stamped (`stamped`) and with `record.peer_id == identity.peer_id`.
        identity: the peer's identity.

    Returns:
        at most MAX_RECORD_BYTES bytes, which `verify_record` accepts until `expires_at`.

    Raises:
        InvalidRecord: a field is out of range (the checks `verify_record` makes, time aside),
            the record names another peer, or it does not fit MAX_RECORD_BYTES.
    """
    if record.peer_id != identity.peer_id:
        raise InvalidRecord(
            RecordFault.KEY_MISMATCH, f"record of {record.peer_id} signed by {identity.peer_id}"
        )
    values = [_wire_value(name, getattr(record, name)) for name, _ in _FIELDS]
    _check_fields(values)
    _check_between_fields(record)
    body = msgpack.packb(values, use_bin_type=True)
    signature = identity.sign(SIGNATURE_DOMAIN + body)
    data: bytes = msgpack.packb([identity.public_key, body, signature], use_bin_type=True)
    if len(data) > MAX_RECORD_BYTES:
        raise InvalidRecord(
            RecordFault.OUT_OF_RANGE, f"record of {len(data)} bytes exceeds {MAX_RECORD_BYTES}"
        )
    return data


def verify_record(
    data: bytes, now: float | None = None, max_clock_skew: float = 30.0
) -> PeerRecord:
    """Check signed record bytes and return the record they carry.

    Args:
        data: what `sign_record` returned, from any source.
        now: unix s to check the validity window against; the current time by default.
        max_clock_skew: s: how far in the future a record's timestamp may lie (clocks differ).

    Returns:
        the record, signed by the key its peer ID names, in range and valid at `now`.

    Raises:
        InvalidRecord: for anything else, with `reason` one of RecordFault; never another error.
    """
    public_key, body, signature = _split(data)
    if not verify_signature(public_key, SIGNATURE_DOMAIN + body, signature):
        raise InvalidRecord(RecordFault.BAD_SIGNATURE, "the signature does not match the record")
    try:
        values = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises many kinds: all mean malformed bytes
        raise InvalidRecord(RecordFault.MALFORMED, f"unreadable record body: {exc!r:.200}") from exc
    if type(values) is not list or len(values) != len(_FIELDS):
        raise InvalidRecord(RecordFault.MALFORMED, f"record body must be {len(_FIELDS)} fields")
    _check_fields(values)
    fields = {name: value for (name, _), value in zip(_FIELDS, values, strict=True)}
    fields["addresses"] = tuple(fields["addresses"])
    record = PeerRecord(**fields)
    _check_between_fields(record)
    if peer_id_from_public_key(public_key) != record.peer_id:
        raise InvalidRecord(
            RecordFault.KEY_MISMATCH,
            f"record claims peer {record.peer_id:.60} but is signed by another key",
        )
    now = time.time() if now is None else now
    if now >= record.expires_at:
        raise InvalidRecord(
            RecordFault.EXPIRED,
            f"record of {record.peer_id} expired {now - record.expires_at:.1f} s ago",
        )
    if record.timestamp > now + max_clock_skew:
        raise InvalidRecord(
            RecordFault.FUTURE,
            f"record of {record.peer_id} is stamped {record.timestamp - now:.1f} s in the future "
            f"(clock skew allowed: {max_clock_skew} s)",
        )
    return record


def _split(data: bytes) -> tuple[bytes, bytes, bytes]:
    if type(data) is not bytes:
        raise InvalidRecord(
            RecordFault.MALFORMED, f"record must be bytes, got {type(data).__name__}"
        )
    if len(data) > MAX_RECORD_BYTES:
        raise InvalidRecord(RecordFault.MALFORMED, f"record of {len(data)} bytes is too large")
    try:
        outer = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises many kinds: all mean malformed bytes
        raise InvalidRecord(RecordFault.MALFORMED, f"unreadable record: {exc!r:.200}") from exc
    if type(outer) is not list or len(outer) != 3 or any(type(x) is not bytes for x in outer):
        raise InvalidRecord(RecordFault.MALFORMED, "record must be [public key, body, signature]")
    public_key, body, signature = outer
    if len(public_key) != PUBLIC_KEY_BYTES or len(signature) != SIGNATURE_BYTES:
        raise InvalidRecord(RecordFault.MALFORMED, "public key or signature has the wrong length")
    return public_key, body, signature


# --- field checks ------------------------------------------------------------------------------

_Check = Callable[[object, str], None]
_HOST = re.compile(r"[A-Za-z0-9.-]{1,253}")
_PORT = re.compile(r"[0-9]{1,5}")
_MODEL_HASH = re.compile(r"[0-9a-f]{16}")
_PEER_ID_CHARS = re.compile(r"[1-9A-HJ-NP-Za-km-z]{32,64}")  # base58


def _int(lo: int, hi: int) -> _Check:
    def check(value: object, name: str) -> None:
        if type(value) is not int:
            raise InvalidRecord(
                RecordFault.MALFORMED, f"{name} must be an int, got {type(value).__name__}"
            )
        if not lo <= value <= hi:
            raise InvalidRecord(RecordFault.OUT_OF_RANGE, f"{name}={value} is outside [{lo}, {hi}]")

    return check


def _float(lo: float, hi: float) -> _Check:
    def check(value: object, name: str) -> None:
        if type(value) is not float:
            raise InvalidRecord(
                RecordFault.MALFORMED, f"{name} must be a float, got {type(value).__name__}"
            )
        if not (math.isfinite(value) and lo <= value <= hi):
            raise InvalidRecord(RecordFault.OUT_OF_RANGE, f"{name}={value} is outside [{lo}, {hi}]")

    return check


def _str(max_len: int, pattern: re.Pattern[str] | None = None) -> _Check:
    def check(value: object, name: str) -> None:
        if type(value) is not str:
            raise InvalidRecord(
                RecordFault.MALFORMED, f"{name} must be a str, got {type(value).__name__}"
            )
        if not 1 <= len(value) <= max_len or not value.isprintable():
            raise InvalidRecord(
                RecordFault.OUT_OF_RANGE, f"{name} must be 1..{max_len} printable characters"
            )
        if pattern is not None and not pattern.fullmatch(value):
            raise InvalidRecord(RecordFault.OUT_OF_RANGE, f"{name}={value!r:.80} is not allowed")

    return check


def _one_of(allowed: tuple[str, ...]) -> _Check:
    def check(value: object, name: str) -> None:
        if type(value) is not str:
            raise InvalidRecord(
                RecordFault.MALFORMED, f"{name} must be a str, got {type(value).__name__}"
            )
        if value not in allowed:
            raise InvalidRecord(
                RecordFault.OUT_OF_RANGE, f"{name}={value!r:.40} is not one of {allowed}"
            )

    return check


def _check_addresses(value: object, name: str) -> None:
    if type(value) is not list:
        raise InvalidRecord(
            RecordFault.MALFORMED, f"{name} must be a list, got {type(value).__name__}"
        )
    if not 1 <= len(value) <= MAX_ADDRESSES:
        raise InvalidRecord(
            RecordFault.OUT_OF_RANGE, f"{name} must hold 1..{MAX_ADDRESSES} addresses"
        )
    for address in value:
        _str(MAX_ADDRESS_CHARS)(address, name)
        if not _is_host_port(address) and not _is_relayed(address):
            raise InvalidRecord(
                RecordFault.OUT_OF_RANGE,
                f"address {address!r:.80} is not host:port nor host:port/RELAYID/p2p-circuit",
            )


def _is_relayed(address: str) -> bool:
    """`host:port/RELAYID/p2p-circuit`: reached through that relay (`swarm/relay.py`)."""
    hostport, _, rest = address.partition("/")
    relay, _, circuit = rest.partition("/")
    return (
        circuit == "p2p-circuit"
        and _is_host_port(hostport)
        and _PEER_ID_CHARS.fullmatch(relay) is not None
    )


def _is_host_port(address: str) -> bool:
    if address.startswith("["):
        host, sep, port = address[1:].partition("]:")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return False
    else:
        host, sep, port = address.rpartition(":")
        if not _HOST.fullmatch(host):
            return False
    return bool(sep) and _PORT.fullmatch(port) is not None and 1 <= int(port) <= 65535


_FIELDS: tuple[tuple[str, _Check], ...] = (
    ("peer_id", _str(128)),
    ("addresses", _check_addresses),
    ("model", _str(128)),
    ("model_hash", _str(16, _MODEL_HASH)),
    ("span_start", _int(0, MAX_LAYERS)),
    ("span_end", _int(1, MAX_LAYERS)),
    ("num_layers", _int(1, MAX_LAYERS)),
    ("dtype", _one_of(DTYPES)),
    ("software_version", _str(32)),
    ("protocol_version", _int(0, 2**31 - 1)),
    ("quant", _one_of(QUANTS)),
    ("free_memory_bytes", _int(0, 2**63 - 1)),
    ("tflops", _float(0.0, MAX_RATE)),
    ("prefill_tokens_per_s_per_layer", _float(0.0, MAX_RATE)),
    ("decode_steps_per_s_per_layer", _float(0.0, MAX_RATE)),
    ("cache_tokens_free", _int(0, MAX_TOKENS)),
    ("cache_tokens_total", _int(0, MAX_TOKENS)),
    ("load", _int(0, 2**31 - 1)),
    ("device", _str(64)),
    ("total_memory_bytes", _int(0, 2**63 - 1)),
    ("timestamp", _float(0.0, 2.0**40)),
    ("expires_at", _float(0.0, 2.0**40)),
)
# The body's order is PeerRecord's field order (a module-load check, not a wire check).
assert [name for name, _ in _FIELDS] == [f.name for f in dataclasses.fields(PeerRecord)]
_FLOAT_FIELDS = frozenset(f.name for f in dataclasses.fields(PeerRecord) if f.type == "float")


def _wire_value(name: str, value: object) -> object:
    """The body's form of a field: a list for a tuple, a float for an int in a float field."""
    if isinstance(value, tuple):
        return list(value)
    if name in _FLOAT_FIELDS and type(value) is int:
        return float(value)
    return value


def _check_fields(values: list[object]) -> None:
    """Check each field on its own; `values` in `_FIELDS` order."""
    for (name, check), value in zip(_FIELDS, values, strict=True):
        check(value, name)


def _check_between_fields(record: PeerRecord) -> None:
    """Check the rules that tie fields together, once each field passed on its own."""
    start, end, layers = record.span_start, record.span_end, record.num_layers
    if not start < end <= layers:
        raise InvalidRecord(
            RecordFault.OUT_OF_RANGE, f"span [{start}, {end}) does not fit {layers} layers"
        )
    if record.cache_tokens_free > record.cache_tokens_total:
        raise InvalidRecord(
            RecordFault.OUT_OF_RANGE, "cache_tokens_free exceeds cache_tokens_total"
        )
    stamp, expiry = record.timestamp, record.expires_at
    if not stamp < expiry <= stamp + MAX_RECORD_TTL:
        raise InvalidRecord(
            RecordFault.OUT_OF_RANGE,
            f"validity window [{stamp}, {expiry}) is empty or longer than {MAX_RECORD_TTL} s",
        )
