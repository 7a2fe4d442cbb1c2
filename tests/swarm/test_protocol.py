"""Wire protocol: every message round-trips, and no input decodes to anything but ProtocolError."""

import contextlib
import dataclasses
import os
import struct
from typing import Any

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from layerswarm.errors import ProtocolError
from layerswarm.swarm import protocol
from layerswarm.swarm import schema as schema_module
from layerswarm.swarm.compress import compress_int8, decompress_int8
from layerswarm.swarm.protocol import (
    DTYPES,
    MAX_REQUEST_ID,
    PROTOCOL_VERSION,
    Closed,
    CloseSession,
    Collect,
    ErrorReply,
    FrameReader,
    Goodbye,
    Hello,
    InfoReply,
    InfoRequest,
    JsonValue,
    Message,
    OpenSession,
    Pushed,
    PushHop,
    SessionOpened,
    Step,
    StepResult,
    decode_frame,
    encode,
)

# LAYERSWARM_FUZZ_EXAMPLES=20000 fuzzes harder on demand.
FUZZ = settings(
    max_examples=int(os.environ.get("LAYERSWARM_FUZZ_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def frame(msg: Message, request_id: int = 7) -> bytes:
    return b"".join(bytes(chunk) for chunk in encode(msg, request_id))


def raw_frame(header: Any, payload: bytes = b"", pad_byte: int = 0) -> bytes:
    """A frame built by hand, padded as the protocol says when there is a payload."""
    head: bytes = msgpack.packb(header)
    pad = -(8 + len(head)) % 8 if payload else 0
    body = head + bytes([pad_byte] * pad) + payload
    return struct.pack(">II", 4 + len(body), len(head)) + body


def assert_same(a: Message, b: Message) -> None:
    assert type(a) is type(b)
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, torch.Tensor):
            assert isinstance(y, torch.Tensor)
            assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)
        else:
            assert x == y


def tensor(dtype: torch.dtype, tokens: int = 3, hidden: int = 5, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return torch.randn(1, tokens, hidden, generator=g).to(dtype)
    return torch.randint(-(2**31), 2**31 - 1, (1, tokens, hidden), generator=g, dtype=dtype)


FLOATS_AND_INTS = [d for d in DTYPES.values() if d != torch.int8]  # int8 comes with scales
EXAMPLES: list[Message] = [
    Hello(),
    Hello(PROTOCOL_VERSION, "12D3KooWabc", 2**20),
    InfoRequest(),
    InfoReply("12D3KooWabc", "smollm2-135m", 0, 15, 30, "bfloat16", 100, 4096, 3, {"tflops": 1.5}),
    InfoReply("p", "", 0, 0, 1, "", 0, 0, 0, {"a": [1, "x", None, True, {"b": -(2**63)}]}),
    OpenSession("s" * 128, 3, 7, 2048),
    OpenSession("s", 3, 7, 2048, push_key=bytes(range(32))),
    Step("s", tensor(torch.bfloat16), 4, route=(), token=b"t" * 32),
    Step(
        "s", tensor(torch.float32), 4, route=(PushHop("127.0.0.1:9/12D3KooWabc", "x", b"k" * 32),)
    ),
    Collect("s", 12),
    Pushed("s"),
    SessionOpened("s"),
    CloseSession("s"),
    Closed("s"),
    ErrorReply("cache_full", "no room for 2048 tokens"),
    ErrorReply("newer_code", ""),
    Goodbye("restarting"),
    *(Step("s", tensor(dtype), 12) for dtype in FLOATS_AND_INTS),
    *(StepResult("s", tensor(dtype, tokens=1)) for dtype in FLOATS_AND_INTS),
    Step("s", torch.ones(1, 3, 5, dtype=torch.int8), 12, scales=b"\0" * 12),
    StepResult("s", torch.ones(1, 2, 5, dtype=torch.int8), scales=b"\1" * 8),
    Step("s", tensor(torch.float32), 7, truncate_to=7),
]


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips(msg: Message) -> None:
    request_id, decoded = decode_frame(frame(msg, 99))
    assert request_id == 99
    assert_same(msg, decoded)


def test_bf16_tensor_round_trips_bit_exactly() -> None:
    x = torch.tensor([[[1.0, -2.5, 3.140625, float("inf")]]], dtype=torch.bfloat16)
    _, decoded = decode_frame(frame(Step("s", x, 0)))
    assert isinstance(decoded, Step)
    assert decoded.hidden.dtype == torch.bfloat16
    assert decoded.hidden.view(torch.int16).tolist() == x.view(torch.int16).tolist()


def test_strided_and_grad_tensors_are_sent_as_their_values() -> None:
    base = torch.randn(1, 6, 4, requires_grad=True)
    strided = base.transpose(1, 2)[:, ::2]  # (1, 2, 6), not contiguous
    _, decoded = decode_frame(frame(StepResult("s", strided)))
    assert isinstance(decoded, StepResult)
    assert torch.equal(decoded.hidden, strided.detach())


def test_tensor_payload_starts_aligned_and_is_not_copied_from_a_bytearray() -> None:
    data = bytearray(frame(Step("s", torch.ones(1, 2, 3), 0)))
    _, decoded = decode_frame(data)
    assert isinstance(decoded, Step)
    data[-4:] = struct.pack("<f", 7.0)  # the last float32 of the payload
    assert decoded.hidden[0, -1, -1].item() == 7.0
    assert (len(data) - decoded.hidden.numel() * 4) % protocol.TENSOR_ALIGN == 0


def test_schema_table_matches_the_message_dataclasses() -> None:
    for cls, schema in schema_module.SCHEMAS.items():
        names = {f.name for f in dataclasses.fields(cls)}
        carried = {name for name, _ in schema.fields} | ({schema.tensor} - {None})
        assert names == carried, cls


def test_version_mismatch_names_both_versions() -> None:
    data = raw_frame({"type": "hello", "id": 0, "version": 99, "future_field": 1})
    with pytest.raises(ProtocolError, match=r"version 99.*version 1"):
        decode_frame(data)


STEP = {"type": "step", "id": 1, "session_id": "s", "start_position": 0}
F32_1x2x2 = {"dtype": "float32", "shape": [1, 2, 2]}

BAD_FRAMES = {
    "empty": b"",
    "short prefix": b"\x00\x00\x00",
    "length larger than data": struct.pack(">II", 100, 2) + b"\x80",
    "length smaller than data": struct.pack(">II", 5, 1) + b"\x80\x80",
    "header longer than frame": struct.pack(">II", 6, 9) + b"\x80\x80",
    "zero header length": struct.pack(">II", 4, 0),
    "header not msgpack": struct.pack(">II", 5, 1) + b"\xc1",
    "header not a map": raw_frame([1, 2, 3]),
    "unknown type": raw_frame({"type": "launch", "id": 1}),
    "type not a str": raw_frame({"type": 5, "id": 1}),
    "missing id": raw_frame({"type": "info_request"}),
    "negative id": raw_frame({"type": "info_request", "id": -1}),
    "huge id": raw_frame({"type": "info_request", "id": MAX_REQUEST_ID + 1}),
    "bool id": raw_frame({"type": "info_request", "id": True}),
    "extra field": raw_frame({"type": "info_request", "id": 1, "x": 1}),
    "missing field": raw_frame({"type": "closed", "id": 1}),
    "bytes for str": raw_frame({"type": "closed", "id": 1, "session_id": b"s"}),
    "empty session": raw_frame({"type": "closed", "id": 1, "session_id": ""}),
    "long session": raw_frame({"type": "closed", "id": 1, "session_id": "s" * 129}),
    "float for int": raw_frame({**STEP, "start_position": 1.0, "hidden": F32_1x2x2}, bytes(16)),
    "empty span": raw_frame(
        {
            "type": "open_session",
            "id": 1,
            "session_id": "s",
            "span_start": 3,
            "span_end": 3,
            "max_length": 8,
        }
    ),
    "bytes after header": raw_frame({"type": "closed", "id": 1, "session_id": "s"}, b"\x00"),
    "no tensor": raw_frame(STEP),
    "bad dtype": raw_frame({**STEP, "hidden": {"dtype": "float64", "shape": [1, 2, 2]}}, bytes(32)),
    "2-D shape": raw_frame({**STEP, "hidden": {"dtype": "float32", "shape": [2, 2]}}, bytes(16)),
    "batch 2": raw_frame({**STEP, "hidden": {"dtype": "float32", "shape": [2, 1, 2]}}, bytes(16)),
    "zero dim": raw_frame({**STEP, "hidden": {"dtype": "float32", "shape": [1, 0, 2]}}, b""),
    "payload too short": raw_frame({**STEP, "hidden": F32_1x2x2}, bytes(15)),
    "payload too long": raw_frame({**STEP, "hidden": F32_1x2x2}, bytes(17)),
    "nonzero padding": raw_frame({**STEP, "hidden": F32_1x2x2}, bytes(16), pad_byte=1),
    "tensor spec extra key": raw_frame({**STEP, "hidden": {**F32_1x2x2, "x": 1}}, bytes(16)),
    "extra not a map": raw_frame(
        {
            "type": "info_reply",
            "id": 1,
            "peer_id": "p",
            "model": "m",
            "span_start": 0,
            "span_end": 1,
            "num_layers": 1,
            "dtype": "f",
            "cache_tokens_free": 0,
            "cache_tokens_total": 0,
            "active_sessions": 0,
            "extra": [1],
        }
    ),
    "free above total": raw_frame(
        {
            "type": "info_reply",
            "id": 1,
            "peer_id": "p",
            "model": "m",
            "span_start": 0,
            "span_end": 1,
            "num_layers": 1,
            "dtype": "f",
            "cache_tokens_free": 2,
            "cache_tokens_total": 1,
            "active_sessions": 0,
            "extra": {},
        }
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_FRAMES))
def test_malformed_frames_raise_protocol_error(case: str) -> None:
    with pytest.raises(ProtocolError):
        decode_frame(BAD_FRAMES[case])


def test_frames_over_the_limit_are_refused() -> None:
    data = frame(Step("s", torch.zeros(1, 64, 64), 0))
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        decode_frame(data, max_frame_bytes=1024)
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        FrameReader(max_frame_bytes=1024).feed(data[:4])  # refused before the body arrives


@pytest.mark.parametrize(
    "msg",
    [
        Step("s", torch.zeros(2, 1, 4), 0),
        Step("s", torch.zeros(1, 4), 0),
        Step("s", torch.zeros(1, 1, 4, dtype=torch.float64), 0),
        Step("", torch.zeros(1, 1, 4), 0),
        OpenSession("s", 5, 2, 10),
        Hello(version=-1),
        ErrorReply("x" * 65, ""),
        InfoReply("p", "m", 0, 1, 1, "f", 0, 0, 0, {"k": object()}),  # type: ignore[dict-item]
    ],
)
def test_invalid_messages_are_refused_when_encoding(msg: Message) -> None:
    with pytest.raises(ProtocolError):
        encode(msg, 1)


def test_frame_reader_splits_a_stream_cut_anywhere() -> None:
    messages = [*EXAMPLES, StepResult("big", torch.randn(1, 100, 100))]  # one frame > scratch
    stream = b"".join(frame(m, i) for i, m in enumerate(messages))
    for cut in (1, 3, 7, 1000, len(stream)):
        reader = FrameReader(scratch_bytes=4096)
        frames = []
        for start in range(0, len(stream), cut):
            frames += reader.feed(stream[start : start + cut])
        assert reader.buffered_bytes() == 0
        assert len(frames) == len(messages)
        for i, (data, msg) in enumerate(zip(frames, messages, strict=True)):
            request_id, decoded = decode_frame(data)
            assert request_id == i
            assert_same(msg, decoded)


# --- property-based ----------------------------------------------------------------------------

short_text = st.text(max_size=40)
session_ids = st.text(min_size=1, max_size=128)
ints63 = st.integers(0, 2**31 - 1)
scalars: st.SearchStrategy[JsonValue] = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    short_text,
    st.floats(allow_nan=False, allow_infinity=False),  # a peer refuses non-finite floats
)
extras: st.SearchStrategy[dict[str, JsonValue]] = st.dictionaries(
    st.text(max_size=64),
    scalars | st.lists(scalars, max_size=4) | st.dictionaries(short_text, scalars, max_size=3),
    max_size=5,
)


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    dtype = draw(st.sampled_from(FLOATS_AND_INTS))
    return tensor(dtype, draw(st.integers(1, 6)), draw(st.integers(1, 9)), draw(ints63))


@st.composite
def info_replies(draw: st.DrawFn) -> InfoReply:
    num_layers = draw(st.integers(1, 200))
    end = draw(st.integers(0, num_layers))
    total = draw(ints63)
    return InfoReply(
        draw(st.text(min_size=1, max_size=128)),
        draw(st.text(max_size=256)),
        draw(st.integers(0, end)),
        end,
        num_layers,
        draw(st.text(max_size=32)),
        draw(st.integers(0, total)),
        total,
        draw(ints63),
        draw(extras),
    )


messages = st.one_of(
    st.builds(
        Hello, st.just(PROTOCOL_VERSION), st.none() | session_ids, st.integers(1024, 2**32 - 1)
    ),
    st.just(InfoRequest()),
    info_replies(),
    st.builds(OpenSession, session_ids, st.just(0), st.integers(1, 100), st.integers(1, 2**20)),
    st.builds(SessionOpened, session_ids),
    st.builds(Step, session_ids, tensors(), ints63),
    st.builds(StepResult, session_ids, tensors()),
    st.builds(CloseSession, session_ids),
    st.builds(Closed, session_ids),
    st.builds(ErrorReply, st.text(min_size=1, max_size=64), st.text(max_size=4096)),
    st.builds(Goodbye, st.text(max_size=1024)),
)


@FUZZ
@given(msg=messages, request_id=st.integers(0, MAX_REQUEST_ID))
def test_random_messages_round_trip(msg: Message, request_id: int) -> None:
    got_id, decoded = decode_frame(frame(msg, request_id))
    assert got_id == request_id
    assert_same(msg, decoded)


def decodes_or_raises_protocol_error(data: bytes | bytearray) -> None:
    with contextlib.suppress(ProtocolError):
        decode_frame(data)


@FUZZ
@given(data=st.binary(max_size=300))
def test_random_bytes_raise_only_protocol_error(data: bytes) -> None:
    decodes_or_raises_protocol_error(data)
    with_length = struct.pack(">I", len(data)) + data
    decodes_or_raises_protocol_error(with_length)


@FUZZ
@given(msg=messages, data=st.data())
def test_truncated_frames_raise_protocol_error(msg: Message, data: st.DataObject) -> None:
    whole = frame(msg)
    cut = data.draw(st.integers(0, len(whole) - 1))
    with pytest.raises(ProtocolError):
        decode_frame(whole[:cut])


@FUZZ
@given(msg=messages, data=st.data())
def test_bit_flips_decode_or_raise_protocol_error(msg: Message, data: st.DataObject) -> None:
    damaged = bytearray(frame(msg))
    for _ in range(data.draw(st.integers(1, 4))):
        bit = data.draw(st.integers(0, len(damaged) * 8 - 1))
        damaged[bit // 8] ^= 1 << (bit % 8)
    decodes_or_raises_protocol_error(damaged)


header_values = st.recursive(
    scalars | st.binary(max_size=8) | st.sampled_from(["float32", "bfloat16", "step", "hello"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(short_text, inner, max_size=4),
    max_leaves=12,
)
header_keys = (
    st.sampled_from(
        [
            "type",
            "id",
            "session_id",
            "hidden",
            "start_position",
            "version",
            "peer_id",
            "extra",
            "max_frame_bytes",
            "span_start",
            "span_end",
            "code",
            "message",
            "dtype",
            "shape",
        ]
    )
    | short_text
)


@FUZZ
@given(
    kind=st.sampled_from([s.name for s in schema_module.SCHEMAS.values()]),
    header=st.dictionaries(header_keys, header_values, max_size=12),
    payload=st.binary(max_size=64),
)
def test_random_headers_raise_only_protocol_error(
    kind: str, header: dict[str, Any], payload: bytes
) -> None:
    header = {**header, "type": kind}
    decodes_or_raises_protocol_error(raw_frame(header, payload))


@FUZZ
@given(chunks=st.lists(st.binary(min_size=1, max_size=64), max_size=20))
def test_frame_reader_raises_only_protocol_error(chunks: list[bytes]) -> None:
    reader = FrameReader(max_frame_bytes=2**16, scratch_bytes=128)
    try:
        for chunk in chunks:
            for data in reader.feed(chunk):
                decodes_or_raises_protocol_error(data)
    except ProtocolError:
        pass


# --- Hello's optional swarm-key proof ------------------------------------------------------------

HELLO = {
    "type": "hello",
    "id": 0,
    "version": PROTOCOL_VERSION,
    "peer_id": "p",
    "max_frame_bytes": 2048,
}


def test_hello_without_a_proof_leaves_the_field_out_so_older_peers_still_read_it() -> None:
    data = frame(Hello(PROTOCOL_VERSION, "p", 2048), 0)
    assert data == raw_frame(HELLO)
    assert decode_frame(data) == (0, Hello(PROTOCOL_VERSION, "p", 2048))


def test_hello_with_a_proof_round_trips() -> None:
    hello = Hello(PROTOCOL_VERSION, "p", 2048, bytes(range(32)))
    assert decode_frame(frame(hello, 0)) == (0, hello)
    assert decode_frame(raw_frame({**HELLO, "psk_proof": bytes(range(32))}))[1] == hello


@pytest.mark.parametrize(
    "proof", [b"", bytes(31), bytes(33), "a" * 32, 7, [0] * 32], ids=lambda v: repr(v)[:12]
)
def test_a_proof_of_the_wrong_size_or_type_is_refused(proof: object) -> None:
    with pytest.raises(ProtocolError, match="psk_proof"):
        decode_frame(raw_frame({**HELLO, "psk_proof": proof}))
    with pytest.raises(ProtocolError, match="psk_proof"):
        encode(Hello(PROTOCOL_VERSION, "p", 2048, proof), 0)  # type: ignore[arg-type]


def test_a_step_without_truncation_leaves_the_field_out_so_older_peers_still_read_it() -> None:
    x = torch.ones(1, 1, 4)
    assert b"truncate_to" not in frame(Step("s", x, 3))
    assert b"truncate_to" in frame(Step("s", x, 3, truncate_to=3))
    for bad in ("3", 1.5, 2**40):
        with pytest.raises(ProtocolError, match="truncate_to"):
            encode(Step("s", x, 3, truncate_to=bad), 0)  # type: ignore[arg-type]


BAD_ROUTES = {
    "not a list": 5,
    "a hop of two fields": [["127.0.0.1:9/ID", "s"]],
    "an address without the peer ID": [["127.0.0.1:9", "s", b"k" * 32]],
    "a short token": [["127.0.0.1:9/ID", "s", b"k" * 31]],
    "too many hops": [["127.0.0.1:9/ID", "s", b"k" * 32]] * 65,
}


@pytest.mark.parametrize("case", sorted(BAD_ROUTES))
def test_a_bad_route_is_a_protocol_error(case: str) -> None:
    header = {"type": "step", "id": 1, "session_id": "s", "start_position": 0}
    header |= {"route": BAD_ROUTES[case], "hidden": {"dtype": "float32", "shape": [1, 1, 1]}}
    with pytest.raises(ProtocolError, match="route"):
        decode_frame(raw_frame(header, b"\0" * 4))


BAD_SCALES = {
    "int8 without scales": (torch.int8, None),
    "scales with floats": (torch.float32, b"\0" * 8),
    "one scale short": (torch.int8, b"\0" * 4),
}


@pytest.mark.parametrize("case", sorted(BAD_SCALES))
def test_int8_hidden_states_come_with_one_scale_a_token(case: str) -> None:
    dtype, scales = BAD_SCALES[case]
    header = {"type": "step", "id": 1, "session_id": "s", "start_position": 0}
    header["hidden"] = {
        "dtype": {torch.int8: "int8", torch.float32: "float32"}[dtype],
        "shape": [1, 2, 4],
    }
    if scales is not None:
        header["scales"] = scales
    with pytest.raises(ProtocolError, match="scales"):
        decode_frame(raw_frame(header, b"\0" * (8 * dtype.itemsize)))


def test_int8_compression_keeps_each_group_within_half_a_step() -> None:
    x = torch.randn(1, 5, 128) * torch.tensor([1.0, 10.0, 0.1, 100.0, 1e-3])[None, :, None]
    x[0, 0, 3] = 1000.0  # an outlier costs precision to its own group only
    q, scales = compress_int8(x)
    back = decompress_int8(q, scales, torch.float32)
    groups = x.reshape(1, 5, 2, 64)
    step = (groups.abs().amax(dim=-1, keepdim=True) / 127).expand_as(groups).reshape(1, 5, 128)
    assert q.dtype == torch.int8 and len(scales) == 5 * 2 * 4
    assert ((back - x).abs() <= step / 2 + 1e-6).all()
    assert (back[0, 0, 64:] - x[0, 0, 64:]).abs().max() < 0.05
