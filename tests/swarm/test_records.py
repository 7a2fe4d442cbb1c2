"""Signed peer records: round trips, and every way a record can be refused."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from layerswarm.errors import InvalidRecord, LayerswarmError
from layerswarm.swarm.identity import Identity, generate_identity
from layerswarm.swarm.records import (
    MAX_RECORD_BYTES,
    SIGNATURE_DOMAIN,
    PeerRecord,
    RecordFault,
    sign_record,
    stamped,
    verify_record,
)

ALICE = generate_identity()
BOB = generate_identity()
NOW = 1_800_000_000.0  # unix s: every check below runs at this time


def make_record(identity: Identity = ALICE, ttl: float = 60.0, **fields: Any) -> PeerRecord:
    record = PeerRecord(
        peer_id=identity.peer_id,
        addresses=("192.168.1.20:31337", "[fe80::1]:31337"),
        model="HuggingFaceTB/SmolLM2-135M-Instruct",
        model_hash="0123456789abcdef",
        span_start=0,
        span_end=15,
        num_layers=30,
        dtype="bfloat16",
        software_version="0.1.0",
        protocol_version=1,
        quant="int8",
        free_memory_bytes=8 * 2**30,
        tflops=12.5,
        prefill_tokens_per_s_per_layer=25_000.0,
        decode_steps_per_s_per_layer=900.0,
        cache_tokens_free=4096,
        cache_tokens_total=8192,
        load=2,
    )
    return dataclasses.replace(stamped(record, ttl, now=NOW), **fields)


def forge(values: list[Any], signer: Identity, public_key: bytes | None = None) -> bytes:
    """Sign any body with `signer`'s key, as a peer that skips `sign_record`'s checks could."""
    body = msgpack.packb(values, use_bin_type=True)
    signature = signer.sign(SIGNATURE_DOMAIN + body)
    key = signer.public_key if public_key is None else public_key
    return msgpack.packb([key, body, signature], use_bin_type=True)


def body_of(record: PeerRecord) -> list[Any]:
    values = [getattr(record, field.name) for field in dataclasses.fields(record)]
    return [list(v) if isinstance(v, tuple) else v for v in values]


def refused(data: bytes, now: float = NOW) -> str:
    with pytest.raises(InvalidRecord) as caught:
        verify_record(data, now=now)
    return caught.value.reason


def test_a_signed_record_verifies_to_itself_and_is_small() -> None:
    record = make_record()
    data = sign_record(record, ALICE)
    assert verify_record(data, now=NOW) == record
    assert len(data) < 400  # two TXT strings in mDNS, a small DHT value


def test_tampered_content_is_refused() -> None:
    data = sign_record(make_record(), ALICE)
    public_key, body, signature = msgpack.unpackb(data)
    values = msgpack.unpackb(body)
    values[5] = 30  # span_end: claim more layers than were signed
    tampered = msgpack.packb([public_key, msgpack.packb(values), signature])
    assert refused(tampered) == RecordFault.BAD_SIGNATURE


def test_tampered_signature_is_refused() -> None:
    data = bytearray(sign_record(make_record(), ALICE))
    data[-1] ^= 0x01  # the signature is the record's last field
    assert refused(bytes(data)) == RecordFault.BAD_SIGNATURE


def test_a_record_claiming_another_peers_id_is_refused() -> None:
    claims_bob = body_of(make_record(peer_id=BOB.peer_id))
    assert refused(forge(claims_bob, ALICE)) == RecordFault.KEY_MISMATCH
    # With Bob's key in place of Alice's, Alice's signature no longer matches.
    assert refused(forge(claims_bob, ALICE, public_key=BOB.public_key)) == RecordFault.BAD_SIGNATURE


def test_sign_record_refuses_to_sign_for_another_peer() -> None:
    with pytest.raises(InvalidRecord) as caught:
        sign_record(make_record(peer_id=BOB.peer_id), ALICE)
    assert caught.value.reason == RecordFault.KEY_MISMATCH


def test_an_expired_record_is_refused() -> None:
    record = make_record(ttl=60.0)
    data = sign_record(record, ALICE)
    assert verify_record(data, now=record.expires_at - 0.001) == record
    assert refused(data, now=record.expires_at) == RecordFault.EXPIRED
    assert refused(data, now=record.expires_at + 3600) == RecordFault.EXPIRED


def test_a_record_from_the_future_is_refused_beyond_the_clock_skew() -> None:
    data = sign_record(make_record(), ALICE)
    assert verify_record(data, now=NOW - 29.0, max_clock_skew=30.0).timestamp == NOW
    with pytest.raises(InvalidRecord) as caught:
        verify_record(data, now=NOW - 31.0, max_clock_skew=30.0)
    assert caught.value.reason == RecordFault.FUTURE


def test_invalid_record_is_a_layerswarm_error_that_says_why() -> None:
    error = InvalidRecord(RecordFault.EXPIRED, "gone")
    assert isinstance(error, LayerswarmError)
    assert str(error) == "expired: gone"


OUT_OF_RANGE = {
    "empty span": {"span_start": 15, "span_end": 15},
    "span past the model": {"span_end": 31},
    "no layers": {"span_start": 0, "span_end": 0, "num_layers": 0},
    "hash not hex": {"model_hash": "0123456789ABCDEF"},
    "hash too short": {"model_hash": "0123"},
    "unknown quant": {"quant": "int3"},
    "unknown dtype": {"dtype": "float8"},
    "no address": {"addresses": ()},
    "address without port": {"addresses": ("192.168.1.20",)},
    "port zero": {"addresses": ("host:0",)},
    "port too large": {"addresses": ("host:65536",)},
    "bad ipv6": {"addresses": ("[fe80::zz]:80",)},
    "space in host": {"addresses": ("my host:80",)},
    "five addresses": {"addresses": tuple(f"h{i}:80" for i in range(5))},
    "cache free above total": {"cache_tokens_free": 9000},
    "negative memory": {"free_memory_bytes": -1},
    "nan tflops": {"tflops": math.nan},
    "infinite rate": {"decode_steps_per_s_per_layer": math.inf},
    "negative rate": {"prefill_tokens_per_s_per_layer": -1.0},
    "empty model": {"model": ""},
    "control character in model": {"model": "smol\nlm"},
    "validity longer than a day": {"expires_at": NOW + 2 * 86400},
    "expiry before timestamp": {"expires_at": NOW - 1},
}


@pytest.mark.parametrize("fields", OUT_OF_RANGE.values(), ids=OUT_OF_RANGE.keys())
def test_out_of_range_fields_are_refused_at_signing_and_off_the_wire(fields: dict) -> None:
    record = make_record(**fields)
    with pytest.raises(InvalidRecord) as caught:
        sign_record(record, ALICE)
    assert caught.value.reason == RecordFault.OUT_OF_RANGE
    assert refused(forge(body_of(record), ALICE)) == RecordFault.OUT_OF_RANGE


WRONG_TYPES = {
    "addresses as a string": (1, "192.168.1.20:31337"),
    "span as a float": (4, 0.0),
    "span as a bool": (4, False),
    "tflops as an int": (12, 12),
    "model as bytes": (2, b"smollm"),
    "device as an int": (18, 0),
    "total memory as a float": (19, 1.0),
    "timestamp as a string": (20, "now"),
}


@pytest.mark.parametrize(("index", "value"), WRONG_TYPES.values(), ids=WRONG_TYPES.keys())
def test_fields_of_the_wrong_type_are_malformed(index: int, value: Any) -> None:
    values = body_of(make_record())
    values[index] = value
    assert refused(forge(values, ALICE)) == RecordFault.MALFORMED


@pytest.mark.parametrize(
    "values",
    [[], body_of(make_record())[:-1], [*body_of(make_record()), 0], {"peer_id": ALICE.peer_id}],
    ids=["empty", "a field short", "a field extra", "a map"],
)
def test_bodies_of_the_wrong_shape_are_malformed(values: Any) -> None:
    assert refused(forge(values, ALICE)) == RecordFault.MALFORMED


def test_oversized_input_is_refused_before_decoding() -> None:
    assert refused(b"\x90" * (MAX_RECORD_BYTES + 1)) == RecordFault.MALFORMED
    assert refused(bytearray(sign_record(make_record(), ALICE))) == RecordFault.MALFORMED  # type: ignore[arg-type]


# --- properties --------------------------------------------------------------------------------


@given(st.binary(max_size=2 * MAX_RECORD_BYTES))
def test_random_bytes_raise_only_invalid_record(data: bytes) -> None:
    with pytest.raises(InvalidRecord):
        verify_record(data, now=NOW)


scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
msgpack_values = st.recursive(
    scalars | st.text(max_size=20) | st.binary(max_size=70),
    lambda inner: st.lists(inner, max_size=22) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=40,
)


@given(msgpack_values, msgpack_values, msgpack_values)
def test_random_msgpack_raises_only_invalid_record(key: Any, body: Any, signature: Any) -> None:
    for data in (msgpack.packb([key, body, signature]), msgpack.packb(body)):
        with pytest.raises(InvalidRecord):
            verify_record(data, now=NOW)


@given(msgpack_values, st.integers(0, 19))
def test_any_signed_field_value_is_checked_not_trusted(value: Any, index: int) -> None:
    values = body_of(make_record())
    values[index] = value
    try:
        record = verify_record(forge(values, ALICE), now=NOW)
    except InvalidRecord:
        return
    assert dataclasses.astuple(record)[index] == (tuple(value) if index == 1 else value)


@given(st.data())
@settings(max_examples=50)
def test_a_flipped_byte_anywhere_is_refused(data: st.DataObject) -> None:
    signed = bytearray(sign_record(make_record(), ALICE))
    position = data.draw(st.integers(0, len(signed) - 1))
    signed[position] ^= data.draw(st.integers(1, 255))
    with pytest.raises(InvalidRecord):
        verify_record(bytes(signed), now=NOW)


printable = st.text(st.characters(min_codepoint=32, max_codepoint=0x2FFF), min_size=1).filter(
    str.isprintable
)
records = st.builds(
    lambda span, **kw: make_record(span_start=span[0], span_end=span[1], num_layers=span[2], **kw),
    span=st.integers(1, 2**20).flatmap(
        lambda n: st.tuples(st.integers(0, n - 1), st.integers(1, n)).filter(lambda s: s[0] < s[1])
        .map(lambda s: (*s, n))
    ),
    model=printable.filter(lambda s: len(s) <= 128),
    software_version=printable.filter(lambda s: len(s) <= 32),
    model_hash=st.text("0123456789abcdef", min_size=16, max_size=16),
    free_memory_bytes=st.integers(0, 2**63 - 1),
    tflops=st.floats(0.0, 1e6),
    load=st.integers(0, 2**31 - 1),
)  # fmt: skip


@given(records)
def test_any_valid_record_round_trips_or_is_too_large(record: PeerRecord) -> None:
    try:
        data = sign_record(record, ALICE)
    except InvalidRecord as exc:  # only a long multi-byte model name can get here
        assert "exceeds" in exc.message
        return
    assert len(data) <= MAX_RECORD_BYTES
    assert verify_record(data, now=NOW) == record
