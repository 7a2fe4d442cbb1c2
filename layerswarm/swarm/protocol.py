"""The wire protocol: typed messages, and the frames that carry them.

A frame is

    u32 length | u32 header_length | msgpack header | zero padding | raw tensor bytes

with big-endian integers. `length` counts every byte after itself. The header is a msgpack map
`{"type": str, "id": int, <fields>...}`; a message with a tensor field names it with
`{"dtype": str, "shape": [int, ...]}`, and its raw bytes follow the header, padded with zeros so
that they start at a multiple of 8 bytes into the frame (an aligned tensor on decode). A frame
without a tensor ends with its header.

Everything read off the wire is checked here with `if ...: raise ProtocolError(...)`: decoding
any bytes raises nothing else.
"""

from __future__ import annotations

import math
import struct
from typing import Any

import msgpack
import torch

from layerswarm.errors import ProtocolError
from layerswarm.swarm.frames import FrameReader
from layerswarm.swarm.messages import (
    DTYPE_NAMES,
    DTYPES,
    MAX_DIM,
    MAX_FRAME_BYTES,
    MAX_HEADER_BYTES,
    MAX_LAYERS,
    MAX_REQUEST_ID,
    MAX_TOKENS,
    PROTOCOL_VERSION,
    PSK_PROOF_BYTES,
    REQUEST_TYPES,
    TENSOR_ALIGN,
    Closed,
    CloseSession,
    Collect,
    ErrorCode,
    ErrorReply,
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
)
from layerswarm.swarm.schema import (
    REQUEST_ID,
    SCHEMA_BY_NAME,
    SCHEMAS,
    Schema,
    check_length,
    check_shape,
)

__all__ = [  # the messages are defined in `messages`; importing them from here keeps working
    "DTYPES",
    "MAX_DIM",
    "MAX_FRAME_BYTES",
    "MAX_HEADER_BYTES",
    "MAX_LAYERS",
    "MAX_REQUEST_ID",
    "MAX_TOKENS",
    "PROTOCOL_VERSION",
    "PSK_PROOF_BYTES",
    "REQUEST_TYPES",
    "TENSOR_ALIGN",
    "CloseSession",
    "Closed",
    "Collect",
    "ErrorCode",
    "ErrorReply",
    "FrameReader",
    "Goodbye",
    "Hello",
    "InfoReply",
    "InfoRequest",
    "JsonValue",
    "Message",
    "OpenSession",
    "PushHop",
    "Pushed",
    "SessionOpened",
    "Step",
    "StepResult",
    "decode_frame",
    "encode",
]

_PREFIX = struct.Struct(">II")  # length, header_length
_LENGTH = struct.Struct(">I")

# --- encoding ------------------------------------------------------------------------------------


def encode(msg: Message, request_id: int) -> list[bytes | memoryview]:
    """Encode `msg` as one frame, in chunks to write in order without joining them.

    The tensor payload, if any, is a view of the tensor's memory (a CPU tensor is not copied;
    another device's is copied to the CPU once).

    Raises:
        ProtocolError: a field breaks the protocol's rules (the same ones `decode_frame` checks).
    """
    schema = SCHEMAS.get(type(msg))
    if schema is None:
        raise ProtocolError(f"not a protocol message: {type(msg).__name__}")
    REQUEST_ID(request_id, "request id")
    header: dict[str, object] = {"type": schema.name, "id": request_id}
    for name, check in schema.fields:
        value = getattr(msg, name)
        check(value, name)
        if value is not None or name not in schema.omitted_if_none:
            header[name] = value
    if schema.check is not None:
        schema.check(msg)
    payload: memoryview | None = None
    if schema.tensor is not None:
        tensor = getattr(msg, schema.tensor)
        if not isinstance(tensor, torch.Tensor):
            raise ProtocolError(f"{schema.tensor} must be a tensor, got {type(tensor).__name__}")
        dtype = DTYPE_NAMES.get(tensor.dtype)
        if dtype is None:
            raise ProtocolError(f"{schema.tensor} dtype {tensor.dtype} is not allowed")
        shape = list(tensor.shape)
        check_shape(shape, schema.tensor)
        header[schema.tensor] = {"dtype": dtype, "shape": shape}
        if tensor.device.type != "cpu":
            tensor = tensor.cpu()
        payload = tensor.detach().contiguous().view(-1).view(torch.uint8).numpy().data
    head = msgpack.packb(header)
    if len(head) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {len(head)} bytes exceeds {MAX_HEADER_BYTES}")
    if payload is None:
        return [_PREFIX.pack(4 + len(head), len(head)) + head]
    pad = -(_PREFIX.size + len(head)) % TENSOR_ALIGN
    length = 4 + len(head) + pad + payload.nbytes
    return [_PREFIX.pack(length, len(head)) + head + bytes(pad), payload]


# --- decoding ------------------------------------------------------------------------------------


def decode_frame(
    data: bytes | bytearray | memoryview, max_frame_bytes: int = MAX_FRAME_BYTES
) -> tuple[int, Message]:
    """Decode one whole frame, length field included.

    A decoded tensor shares memory with `data` when `data` is writable (a bytearray, as
    `FrameReader` yields): no copy. Read-only data is copied once.

    Returns:
        (request id, message)

    Raises:
        ProtocolError: for anything malformed, oversized or unknown; never anything else.
    """
    view = memoryview(data).cast("B")
    if len(view) < _PREFIX.size:
        raise ProtocolError(f"frame of {len(view)} bytes is shorter than its prefix")
    length, header_length = _PREFIX.unpack_from(view)
    check_length(length, max_frame_bytes)
    if length != len(view) - _LENGTH.size:
        raise ProtocolError(f"frame says {length} bytes after its length, has {len(view) - 4}")
    if not 1 <= header_length <= min(length - 4, MAX_HEADER_BYTES):
        raise ProtocolError(f"header length {header_length} does not fit the frame")
    header_end = _PREFIX.size + header_length
    try:
        header = msgpack.unpackb(view[_PREFIX.size : header_end], raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises many kinds: all mean a malformed header
        raise ProtocolError(f"malformed msgpack header: {exc!r}") from exc
    if type(header) is not dict:
        raise ProtocolError(f"header must be a map, got {type(header).__name__}")
    cls, schema, expected = _header_schema(header)
    if not expected - schema.omitted_if_none <= header.keys() <= expected:
        missing = sorted(expected - schema.omitted_if_none - header.keys())
        extra = sorted(repr(key) for key in header.keys() - expected)[:8]
        raise ProtocolError(f"{schema.name} header: missing {missing}, unexpected {extra}")
    request_id = header["id"]
    REQUEST_ID(request_id, "request id")
    values: dict[str, Any] = {}
    for name, check in schema.fields:
        if name in header:  # else an omitted field: its default, None
            check(header[name], name)
            values[name] = header[name]
    for name, convert in schema.from_wire:
        if values.get(name) is not None:
            values[name] = convert(values[name])
    if schema.tensor is None:
        if len(view) != header_end:
            raise ProtocolError(f"{schema.name} frame has bytes after its header")
    else:
        values[schema.tensor] = _decode_tensor(view, header_end, header[schema.tensor], schema)
    msg: Message = cls(**values)
    if schema.check is not None:
        schema.check(msg)
    return request_id, msg


def _header_schema(
    header: dict[str, object],
) -> tuple[type[Message], Schema, frozenset[str]]:
    kind = header.get("type")
    if type(kind) is not str or kind not in SCHEMA_BY_NAME:
        raise ProtocolError(f"unknown message type {kind!r:.80}")
    if kind == "hello":  # a version mismatch explains everything else that differs
        version = header.get("version")
        if type(version) is int and version != PROTOCOL_VERSION:
            raise ProtocolError(
                f"protocol version mismatch: the peer speaks version {version}, "
                f"this side speaks version {PROTOCOL_VERSION}"
            )
    return SCHEMA_BY_NAME[kind]


def _decode_tensor(view: memoryview, header_end: int, spec: object, schema: Schema) -> torch.Tensor:
    name = schema.tensor
    if type(spec) is not dict or spec.keys() != {"dtype", "shape"}:
        raise ProtocolError(f"{name} must be a map of dtype and shape")
    dtype = DTYPES.get(spec["dtype"]) if type(spec["dtype"]) is str else None
    if dtype is None:
        raise ProtocolError(f"{name} dtype {spec['dtype']!r:.40} is not allowed")
    shape = check_shape(spec["shape"], f"{name}")
    start = header_end + (-header_end % TENSOR_ALIGN)
    if start > len(view) or any(view[header_end:start]):
        raise ProtocolError(f"{name} padding is missing or not zero")
    nbytes = math.prod(shape) * dtype.itemsize
    if len(view) - start != nbytes:
        raise ProtocolError(
            f"{name} of shape {list(shape)} and dtype {spec['dtype']} needs {nbytes} bytes, "
            f"the frame carries {len(view) - start}"
        )
    payload = view[start:]
    buffer = bytearray(payload) if payload.readonly else payload
    return torch.frombuffer(buffer, dtype=torch.uint8).view(dtype).reshape(shape)
