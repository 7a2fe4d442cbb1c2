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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import msgpack
import torch

from layerswarm.errors import ProtocolError

PROTOCOL_VERSION = 1
MAX_FRAME_BYTES = 64 * 2**20  # bytes: default largest frame, after the length field
MAX_HEADER_BYTES = 64 * 2**10  # bytes: largest msgpack header
MAX_REQUEST_ID = 2**63 - 1  # ids run from 0 (connection-level messages) up to this
MAX_LAYERS = 2**20  # layers: bound on span and layer-count fields
MAX_TOKENS = 2**31 - 1  # tokens: bound on positions, lengths and cache sizes
MAX_DIM = 2**31 - 1  # elements: bound on one tensor dimension
TENSOR_ALIGN = 8  # bytes: tensor payloads start at a multiple of this into the frame
PSK_PROOF_BYTES = 32  # bytes: a Hello's proof of the swarm key (HMAC-SHA256)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
}
_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_PREFIX = struct.Struct(">II")  # length, header_length
_LENGTH = struct.Struct(">I")

JsonValue: TypeAlias = bool | int | float | str | list["JsonValue"] | dict[str, "JsonValue"] | None


class ErrorCode:
    """The codes an `ErrorReply` carries (the wire accepts any short code, for newer peers)."""

    PROTOCOL = "protocol"  # malformed frame, or a message not allowed here
    CACHE_FULL = "cache_full"  # no KV-cache room for a new session, even after waiting
    SESSION_FULL = "session_full"  # a running session cannot grow here: move it elsewhere
    BUSY = "busy"  # a limit of this client (sessions, pages) or a full queue: try later
    UNKNOWN_SESSION = "unknown_session"  # no such session, or it expired
    BAD_SPAN = "bad_span"  # the peer does not serve the asked span
    BAD_SHAPE = "bad_shape"  # tensor shape does not fit the model
    BAD_POSITION = "bad_position"  # positions do not continue the session
    TIMEOUT = "timeout"  # the peer gave up waiting for something
    SHUTTING_DOWN = "shutting_down"  # the peer is stopping
    SWARM_KEY = "swarm_key"  # the two sides are not in the same private swarm
    INTERNAL = "internal"  # anything else


@dataclass(frozen=True)
class Hello:
    """Sent by both sides when a connection opens, with request id 0."""

    version: int = PROTOCOL_VERSION
    peer_id: str | None = None  # the sender's peer ID (TLS proves it; plaintext only claims it)
    max_frame_bytes: int = MAX_FRAME_BYTES  # bytes: the largest frame the sender accepts
    # bytes: HMAC-SHA256 proof that the sender holds the private swarm's key (`transport`
    # computes it); None, and then absent from the header, outside private swarms
    psk_proof: bytes | None = None


@dataclass(frozen=True)
class InfoRequest:
    """Ask a peer what it serves and how loaded it is."""


@dataclass(frozen=True)
class InfoReply:
    peer_id: str
    model: str  # model name, e.g. "HuggingFaceTB/SmolLM2-135M"
    span_start: int  # first layer served
    span_end: int  # one past the last layer served
    num_layers: int  # layers in the whole model
    dtype: str  # compute dtype, e.g. "bfloat16"
    cache_tokens_free: int  # tokens: KV-cache room left
    cache_tokens_total: int  # tokens: KV-cache room in all
    active_sessions: int
    extra: dict[str, JsonValue] = field(default_factory=dict)  # small, free-form


@dataclass(frozen=True)
class OpenSession:
    session_id: str
    span_start: int
    span_end: int
    max_length: int  # tokens: the KV cache to reserve


@dataclass(frozen=True)
class SessionOpened:
    session_id: str


@dataclass(frozen=True, eq=False)
class Step:
    """Run the session's span on positions [start_position, start_position + T)."""

    session_id: str
    hidden: torch.Tensor  # (1, T, hidden)
    start_position: int


@dataclass(frozen=True, eq=False)
class StepResult:
    session_id: str
    hidden: torch.Tensor  # (1, T, hidden)


@dataclass(frozen=True)
class CloseSession:
    session_id: str


@dataclass(frozen=True)
class Closed:
    session_id: str


@dataclass(frozen=True)
class ErrorReply:
    code: str  # one of ErrorCode, or a newer peer's code
    message: str


@dataclass(frozen=True)
class Goodbye:
    """A peer about to stop tells its clients, with request id 0."""

    reason: str


Message: TypeAlias = (
    Hello
    | InfoRequest
    | InfoReply
    | OpenSession
    | SessionOpened
    | Step
    | StepResult
    | CloseSession
    | Closed
    | ErrorReply
    | Goodbye
)
REQUEST_TYPES: tuple[type[Message], ...] = (InfoRequest, OpenSession, Step, CloseSession)

# --- field checks ------------------------------------------------------------------------------

_Check = Callable[[object, str], None]


def _int(lo: int, hi: int) -> _Check:
    def check(value: object, name: str) -> None:
        if type(value) is not int:
            raise ProtocolError(f"{name} must be an int, got {type(value).__name__}")
        if not lo <= value <= hi:
            raise ProtocolError(f"{name}={value} is outside [{lo}, {hi}]")

    return check


def _str(max_len: int, min_len: int = 0) -> _Check:
    def check(value: object, name: str) -> None:
        if type(value) is not str:
            raise ProtocolError(f"{name} must be a str, got {type(value).__name__}")
        if not min_len <= len(value) <= max_len:
            raise ProtocolError(f"{name} has {len(value)} characters, allowed {min_len}..{max_len}")

    return check


def _bytes(length: int) -> _Check:
    def check(value: object, name: str) -> None:
        if type(value) is not bytes:
            raise ProtocolError(f"{name} must be bytes, got {type(value).__name__}")
        if len(value) != length:
            raise ProtocolError(f"{name} has {len(value)} bytes, expected {length}")

    return check


def _optional(inner: _Check) -> _Check:
    def check(value: object, name: str) -> None:
        if value is not None:
            inner(value, name)

    return check


_EXTRA_INT = _int(-(2**63), 2**64 - 1)  # what msgpack can carry
_EXTRA_STR = _str(4096)
_EXTRA_KEY = _str(64)


def _check_extra(value: object, name: str) -> None:
    budget = [1024]  # nodes left in the whole tree

    def walk(node: object, path: str, depth: int) -> None:
        budget[0] -= 1
        if budget[0] < 0 or depth > 4:
            raise ProtocolError(f"{name} is too large or too deeply nested")
        if node is None or type(node) in (bool, float):
            return
        if type(node) is int:
            _EXTRA_INT(node, path)
        elif type(node) is str:
            _EXTRA_STR(node, path)
        elif type(node) is list:
            for i, item in enumerate(node):
                walk(item, f"{path}[{i}]", depth + 1)
        elif type(node) is dict:
            for key, item in node.items():
                _EXTRA_KEY(key, f"{path} key")
                walk(item, f"{path}.{key}", depth + 1)
        else:
            raise ProtocolError(f"{path} has unsupported type {type(node).__name__}")

    if type(value) is not dict:
        raise ProtocolError(f"{name} must be a map, got {type(value).__name__}")
    walk(value, name, 0)


_SESSION_ID = _str(128, min_len=1)
_LAYER = _int(0, MAX_LAYERS)
_TOKENS = _int(0, MAX_TOKENS)


@dataclass(frozen=True)
class _Schema:
    name: str  # the header's "type"
    fields: tuple[tuple[str, _Check], ...]  # header fields, checked in this order
    tensor: str | None = None  # the one tensor field, carried as payload
    check: Callable[[Message], None] | None = None  # cross-field rules, on the built message
    # fields left out of the header when None, so that a peer that predates them still
    # understands every message that does not use them
    omitted_if_none: frozenset[str] = frozenset()

    @property
    def keys(self) -> frozenset[str]:
        """Every key its header has."""
        return frozenset(["type", "id", *(name for name, _ in self.fields)]) | (
            {self.tensor} if self.tensor else set()
        )


def _check_open_session(msg: Message) -> None:
    if isinstance(msg, OpenSession) and msg.span_start >= msg.span_end:
        raise ProtocolError(f"empty span [{msg.span_start}, {msg.span_end})")


def _check_info_reply(msg: Message) -> None:
    if not isinstance(msg, InfoReply):
        return
    if not msg.span_start <= msg.span_end <= msg.num_layers:
        raise ProtocolError(
            f"span [{msg.span_start}, {msg.span_end}) does not fit {msg.num_layers} layers"
        )
    if msg.cache_tokens_free > msg.cache_tokens_total:
        raise ProtocolError("cache_tokens_free exceeds cache_tokens_total")


_SCHEMAS: dict[type[Message], _Schema] = {
    Hello: _Schema(
        "hello",
        (
            ("version", _int(0, 2**31 - 1)),
            ("peer_id", _optional(_str(128, min_len=1))),
            ("max_frame_bytes", _int(1024, 2**32 - 1)),
            ("psk_proof", _optional(_bytes(PSK_PROOF_BYTES))),
        ),
        omitted_if_none=frozenset({"psk_proof"}),
    ),
    InfoRequest: _Schema("info_request", ()),
    InfoReply: _Schema(
        "info_reply",
        (
            ("peer_id", _str(128, min_len=1)),
            ("model", _str(256)),
            ("span_start", _LAYER),
            ("span_end", _LAYER),
            ("num_layers", _int(1, MAX_LAYERS)),
            ("dtype", _str(32)),
            ("cache_tokens_free", _TOKENS),
            ("cache_tokens_total", _TOKENS),
            ("active_sessions", _int(0, 2**31 - 1)),
            ("extra", _check_extra),
        ),
        check=_check_info_reply,
    ),
    OpenSession: _Schema(
        "open_session",
        (
            ("session_id", _SESSION_ID),
            ("span_start", _LAYER),
            ("span_end", _LAYER),
            ("max_length", _int(1, MAX_TOKENS)),
        ),
        check=_check_open_session,
    ),
    SessionOpened: _Schema("session_opened", (("session_id", _SESSION_ID),)),
    Step: _Schema(
        "step", (("session_id", _SESSION_ID), ("start_position", _TOKENS)), tensor="hidden"
    ),
    StepResult: _Schema("step_result", (("session_id", _SESSION_ID),), tensor="hidden"),
    CloseSession: _Schema("close_session", (("session_id", _SESSION_ID),)),
    Closed: _Schema("closed", (("session_id", _SESSION_ID),)),
    ErrorReply: _Schema("error", (("code", _str(64, min_len=1)), ("message", _str(4096)))),
    Goodbye: _Schema("goodbye", (("reason", _str(1024)),)),
}
_SCHEMA_BY_NAME = {schema.name: (cls, schema, schema.keys) for cls, schema in _SCHEMAS.items()}
# The hidden-state tensors are (batch=1, T, hidden): one session is one sequence.
_TENSOR_NDIM = 3


_DIM = _int(1, MAX_DIM)
_REQUEST_ID = _int(0, MAX_REQUEST_ID)


def _check_shape(shape: object, name: str) -> list[int]:
    if type(shape) is not list or len(shape) != _TENSOR_NDIM:
        raise ProtocolError(f"{name} shape must be a list of {_TENSOR_NDIM} ints")
    for dim in shape:
        _DIM(dim, f"{name} dimension")
    if shape[0] != 1:
        raise ProtocolError(f"{name} batch must be 1, got {shape[0]}")
    return shape


# --- encoding ------------------------------------------------------------------------------------


def encode(msg: Message, request_id: int) -> list[bytes | memoryview]:
    """Encode `msg` as one frame, in chunks to write in order without joining them.

    The tensor payload, if any, is a view of the tensor's memory (a CPU tensor is not copied;
    another device's is copied to the CPU once).

    Raises:
        ProtocolError: a field breaks the protocol's rules (the same ones `decode_frame` checks).
    """
    schema = _SCHEMAS.get(type(msg))
    if schema is None:
        raise ProtocolError(f"not a protocol message: {type(msg).__name__}")
    _REQUEST_ID(request_id, "request id")
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
        dtype = _DTYPE_NAMES.get(tensor.dtype)
        if dtype is None:
            raise ProtocolError(f"{schema.tensor} dtype {tensor.dtype} is not allowed")
        shape = list(tensor.shape)
        _check_shape(shape, schema.tensor)
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
    _check_length(length, max_frame_bytes)
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
    _REQUEST_ID(request_id, "request id")
    values: dict[str, Any] = {}
    for name, check in schema.fields:
        if name in header:  # else an omitted field: its default, None
            check(header[name], name)
            values[name] = header[name]
    if schema.tensor is None:
        if len(view) != header_end:
            raise ProtocolError(f"{schema.name} frame has bytes after its header")
    else:
        values[schema.tensor] = _decode_tensor(view, header_end, header[schema.tensor], schema)
    msg: Message = cls(**values)
    if schema.check is not None:
        schema.check(msg)
    return request_id, msg


def _check_length(length: int, max_frame_bytes: int) -> None:
    if length > max_frame_bytes:
        raise ProtocolError(f"frame of {length} bytes exceeds the limit of {max_frame_bytes}")
    if length < 4 + 1:
        raise ProtocolError(f"frame of {length} bytes cannot hold a header")


def _header_schema(
    header: dict[str, object],
) -> tuple[type[Message], _Schema, frozenset[str]]:
    kind = header.get("type")
    if type(kind) is not str or kind not in _SCHEMA_BY_NAME:
        raise ProtocolError(f"unknown message type {kind!r:.80}")
    if kind == "hello":  # a version mismatch explains everything else that differs
        version = header.get("version")
        if type(version) is int and version != PROTOCOL_VERSION:
            raise ProtocolError(
                f"protocol version mismatch: the peer speaks version {version}, "
                f"this side speaks version {PROTOCOL_VERSION}"
            )
    return _SCHEMA_BY_NAME[kind]


def _decode_tensor(
    view: memoryview, header_end: int, spec: object, schema: _Schema
) -> torch.Tensor:
    name = schema.tensor
    if type(spec) is not dict or spec.keys() != {"dtype", "shape"}:
        raise ProtocolError(f"{name} must be a map of dtype and shape")
    dtype = DTYPES.get(spec["dtype"]) if type(spec["dtype"]) is str else None
    if dtype is None:
        raise ProtocolError(f"{name} dtype {spec['dtype']!r:.40} is not allowed")
    shape = _check_shape(spec["shape"], f"{name}")
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


# --- incremental reading -------------------------------------------------------------------------


class FrameReader:
    """Split a byte stream into whole frames, with at most one copy of each byte.

    Small frames are cut out of a scratch buffer; a frame larger than it gets a buffer of its
    own that the socket reads into directly. Use `get_buffer`/`buffer_updated` from an
    `asyncio.BufferedProtocol`, or `feed` with bytes.
    """

    def __init__(self, max_frame_bytes: int = MAX_FRAME_BYTES, scratch_bytes: int = 2**16) -> None:
        if scratch_bytes < 64:
            raise ValueError(f"scratch_bytes={scratch_bytes} is below 64")
        self.max_frame_bytes = max_frame_bytes
        self._scratch = bytearray(scratch_bytes)
        self._start = 0  # first unconsumed byte in the scratch buffer
        self._end = 0  # one past the last received byte in the scratch buffer
        self._big: bytearray | None = None  # a large frame being received
        self._big_filled = 0

    def buffered_bytes(self) -> int:
        """Bytes received that are not yet part of a returned frame."""
        if self._big is not None:
            return self._big_filled
        return self._end - self._start

    def get_buffer(self) -> memoryview:
        """Where the next received bytes go; call `buffer_updated` with how many arrived."""
        if self._big is not None:
            return memoryview(self._big)[self._big_filled :]
        if self._start > 0:  # move a partial frame to the front to make room
            remaining = self._end - self._start
            self._scratch[:remaining] = self._scratch[self._start : self._end]
            self._start, self._end = 0, remaining
        return memoryview(self._scratch)[self._end :]

    def buffer_updated(self, nbytes: int) -> list[bytearray]:
        """Account for `nbytes` written into the last buffer; return the frames now whole.

        Raises:
            ProtocolError: a frame's length field is oversized or too small.
        """
        if self._big is not None:
            self._big_filled += nbytes
            if self._big_filled < len(self._big):
                return []
            frame, self._big = self._big, None
            return [frame]
        self._end += nbytes
        frames: list[bytearray] = []
        scratch = self._scratch
        while self._end - self._start >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(scratch, self._start)
            _check_length(length, self.max_frame_bytes)
            total = _LENGTH.size + length
            available = self._end - self._start
            if available >= total:
                frames.append(scratch[self._start : self._start + total])
                self._start += total
            elif total > len(scratch):
                self._big = bytearray(total)
                self._big[:available] = scratch[self._start : self._end]
                self._big_filled = available
                self._start = self._end = 0
                break
            else:
                break
        if self._start == self._end:
            self._start = self._end = 0
        return frames

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytearray]:
        """Add received bytes; return the frames now whole.

        Raises:
            ProtocolError: a frame's length field is oversized or too small.
        """
        source = memoryview(data).cast("B")
        frames: list[bytearray] = []
        while source:
            target = self.get_buffer()
            n = min(len(target), len(source))
            target[:n] = source[:n]
            target.release()
            source = source[n:]
            frames.extend(self.buffer_updated(n))
        return frames
