"""The rules every message's fields are checked against, on encode and on decode.

Everything read off the wire is checked with `if ...: raise ProtocolError(...)`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from layerswarm.errors import ProtocolError
from layerswarm.swarm.compress import groups
from layerswarm.swarm.messages import (
    MAX_DIM,
    MAX_LAYERS,
    MAX_PREFIX_BLOCKS,
    MAX_PUNCH_ADDRESSES,
    MAX_REQUEST_ID,
    MAX_ROUTE_HOPS,
    MAX_SCALES,
    MAX_TOKENS,
    PREFIX_HASH_BYTES,
    PSK_PROOF_BYTES,
    PUSH_KEY_BYTES,
    PUSH_TOKEN_BYTES,
    RELAY_TOKEN_BYTES,
    AwaitRelayed,
    Closed,
    CloseSession,
    Collect,
    DialBack,
    DialBackReply,
    ErrorReply,
    Goodbye,
    Hello,
    HolePunch,
    HolePunchSync,
    InfoReply,
    InfoRequest,
    Message,
    OpenSession,
    Pushed,
    PushHop,
    RelayAccept,
    RelayConnect,
    Relayed,
    RelayJoined,
    Reserve,
    Reserved,
    SessionOpened,
    Step,
    StepResult,
)

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
        if node is None or type(node) is bool:
            return
        if type(node) is float:
            if not math.isfinite(node):  # a claimed speed of inf or NaN would steer routing
                raise ProtocolError(f"{path}={node} is not a finite number")
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
_ADDRESS = _str(300, min_len=3)
_PUSH_TOKEN = _bytes(PUSH_TOKEN_BYTES)
_PREFIX_HASH = _bytes(PREFIX_HASH_BYTES)


_PORT = _int(1, 65535)
_HOST_PORT = _str(64, min_len=3)
_RELAY_TOKEN = _bytes(RELAY_TOKEN_BYTES)


def _max_bytes(length: int) -> _Check:
    def check(value: object, name: str) -> None:
        if type(value) is not bytes or not 0 < len(value) <= length:
            raise ProtocolError(f"{name} must be 1..{length} bytes")

    return check


def _bool(value: object, name: str) -> None:
    if type(value) is not bool:
        raise ProtocolError(f"{name} must be a bool, got {type(value).__name__}")


def _seconds(value: object, name: str) -> None:
    if type(value) not in (int, float) or not 0 < value <= 7 * 24 * 3600:  # type: ignore[operator]
        raise ProtocolError(f"{name} must be a number of seconds in (0, 1 week], got {value!r:.40}")


def _SCALES(value: object, name: str) -> None:
    if type(value) is not bytes or len(value) > 4 * MAX_SCALES:
        raise ProtocolError(f"{name} must be at most {4 * MAX_SCALES} bytes")


def _check_route(value: object, name: str) -> None:
    if not isinstance(value, (list, tuple)):
        raise ProtocolError(f"{name} must be a list, got {type(value).__name__}")
    if len(value) > MAX_ROUTE_HOPS:
        raise ProtocolError(f"{name} has {len(value)} hops, at most {MAX_ROUTE_HOPS}")
    for i, hop in enumerate(value):
        if not isinstance(hop, (list, tuple)) or len(hop) != 3:
            raise ProtocolError(f"{name}[{i}] must be [address, session_id, token]")
        _ADDRESS(hop[0], f"{name}[{i}].address")
        if "/" not in hop[0]:
            raise ProtocolError(f"{name}[{i}].address must name the peer ID (host:port/ID)")
        _SESSION_ID(hop[1], f"{name}[{i}].session_id")
        _PUSH_TOKEN(hop[2], f"{name}[{i}].token")


def _check_punch_addresses(value: object, name: str) -> None:
    if not isinstance(value, (list, tuple)) or not 0 < len(value) <= MAX_PUNCH_ADDRESSES:
        raise ProtocolError(f"{name} must be a list of 1..{MAX_PUNCH_ADDRESSES} addresses")
    for i, address in enumerate(value):
        _HOST_PORT(address, f"{name}[{i}]")
        if ":" not in address:
            raise ProtocolError(f"{name}[{i}] must be host:port")


def _check_prefix(value: object, name: str) -> None:
    if not isinstance(value, (list, tuple)):
        raise ProtocolError(f"{name} must be a list, got {type(value).__name__}")
    if len(value) > MAX_PREFIX_BLOCKS:
        raise ProtocolError(f"{name} has {len(value)} hashes, at most {MAX_PREFIX_BLOCKS}")
    for i, link in enumerate(value):
        _PREFIX_HASH(link, f"{name}[{i}]")


def _route_from_wire(value: Any) -> tuple[PushHop, ...]:
    return tuple(PushHop(*hop) for hop in value)


@dataclass(frozen=True)
class Schema:
    name: str  # the header's "type"
    fields: tuple[tuple[str, _Check], ...]  # header fields, checked in this order
    tensor: str | None = None  # the one tensor field, carried as payload
    check: Callable[[Message], None] | None = None  # cross-field rules, on the built message
    # fields left out of the header when None, so that a peer that predates them still
    # understands every message that does not use them
    omitted_if_none: frozenset[str] = frozenset()
    # a field's value as decoded (lists, maps) turned into its type, after its check passed
    from_wire: tuple[tuple[str, Callable[[Any], Any]], ...] = ()

    @property
    def keys(self) -> frozenset[str]:
        """Every key its header has."""
        return frozenset(["type", "id", *(name for name, _ in self.fields)]) | (
            {self.tensor} if self.tensor else set()
        )


def _check_open_session(msg: Message) -> None:
    if isinstance(msg, OpenSession) and msg.span_start >= msg.span_end:
        raise ProtocolError(f"empty span [{msg.span_start}, {msg.span_end})")


def _check_scales(msg: Message) -> None:
    """int8 activations come with scales (`swarm/compress.py`), and only they have scales."""
    if not isinstance(msg, (Step, StepResult)):
        return
    int8 = msg.hidden.dtype == torch.int8
    if msg.scales is None and int8:
        raise ProtocolError("int8 hidden states need scales")
    if msg.scales is not None:
        if not int8:
            raise ProtocolError(f"scales come only with int8 hidden states, not {msg.hidden.dtype}")
        _, t, h = msg.hidden.shape
        if len(msg.scales) != 4 * t * groups(h):
            raise ProtocolError(
                f"scales have {len(msg.scales)} bytes for {t} tokens of {groups(h)} groups "
                "(4 bytes each)"
            )


def _check_info_reply(msg: Message) -> None:
    if not isinstance(msg, InfoReply):
        return
    if not msg.span_start <= msg.span_end <= msg.num_layers:
        raise ProtocolError(
            f"span [{msg.span_start}, {msg.span_end}) does not fit {msg.num_layers} layers"
        )
    if msg.cache_tokens_free > msg.cache_tokens_total:
        raise ProtocolError("cache_tokens_free exceeds cache_tokens_total")


SCHEMAS: dict[type[Message], Schema] = {
    Hello: Schema(
        "hello",
        (
            ("version", _int(0, 2**31 - 1)),
            ("peer_id", _optional(_str(128, min_len=1))),
            ("max_frame_bytes", _int(1024, 2**32 - 1)),
            ("psk_proof", _optional(_bytes(PSK_PROOF_BYTES))),
        ),
        omitted_if_none=frozenset({"psk_proof"}),
    ),
    InfoRequest: Schema("info_request", ()),
    InfoReply: Schema(
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
    OpenSession: Schema(
        "open_session",
        (
            ("session_id", _SESSION_ID),
            ("span_start", _LAYER),
            ("span_end", _LAYER),
            ("max_length", _int(1, MAX_TOKENS)),
            ("push_key", _optional(_bytes(PUSH_KEY_BYTES))),
            ("prefix", _optional(_check_prefix)),
            ("fork_of", _optional(_SESSION_ID)),
        ),
        check=_check_open_session,
        omitted_if_none=frozenset({"push_key", "prefix", "fork_of"}),
        from_wire=(("prefix", tuple),),
    ),
    SessionOpened: Schema(
        "session_opened",
        (("session_id", _SESSION_ID), ("cached_tokens", _optional(_TOKENS))),
        omitted_if_none=frozenset({"cached_tokens"}),
    ),
    Step: Schema(
        "step",
        (
            ("session_id", _SESSION_ID),
            ("start_position", _TOKENS),
            ("route", _optional(_check_route)),
            ("token", _optional(_PUSH_TOKEN)),
            ("scales", _optional(_SCALES)),
            # any int the wire carries: the peer checks it against the session (bad_position)
            ("truncate_to", _optional(_int(-MAX_TOKENS, MAX_TOKENS))),
        ),
        tensor="hidden",
        check=_check_scales,
        omitted_if_none=frozenset({"route", "token", "scales", "truncate_to"}),
        from_wire=(("route", _route_from_wire),),
    ),
    StepResult: Schema(
        "step_result",
        (("session_id", _SESSION_ID), ("scales", _optional(_SCALES))),
        tensor="hidden",
        check=_check_scales,
        omitted_if_none=frozenset({"scales"}),
    ),
    Collect: Schema("collect", (("session_id", _SESSION_ID), ("start_position", _TOKENS))),
    Pushed: Schema("pushed", (("session_id", _SESSION_ID),)),
    CloseSession: Schema("close_session", (("session_id", _SESSION_ID),)),
    Closed: Schema("closed", (("session_id", _SESSION_ID),)),
    ErrorReply: Schema("error", (("code", _str(64, min_len=1)), ("message", _str(4096)))),
    Goodbye: Schema("goodbye", (("reason", _str(1024)),)),
    DialBack: Schema("dial_back", (("port", _PORT),)),
    DialBackReply: Schema(
        "dial_back_reply",
        (
            ("reachable", _bool),
            ("observed_host", _str(64, min_len=1)),
            ("observed_port", _int(0, 65535)),
            ("reason", _str(1024)),
            ("relay_port", _int(0, 65535)),
        ),
    ),
    Reserve: Schema(
        "reserve", (("record", _optional(_max_bytes(1024))),), omitted_if_none=frozenset({"record"})
    ),
    Reserved: Schema(
        "reserved",
        (
            ("relay_port", _PORT),
            ("ttl", _seconds),
            ("max_connections", _int(1, 2**20)),
            ("max_bytes_per_s", _int(1, 2**40)),
            ("max_duration", _seconds),
        ),
    ),
    AwaitRelayed: Schema("await_relayed", ()),
    Relayed: Schema("relayed", (("token", _RELAY_TOKEN),)),
    RelayConnect: Schema("relay_connect", (("target", _str(128, min_len=1)),)),
    RelayAccept: Schema("relay_accept", (("token", _RELAY_TOKEN),)),
    RelayJoined: Schema(
        "relay_joined",
        (("observed", _optional(_HOST_PORT)),),
        omitted_if_none=frozenset({"observed"}),
    ),
    HolePunch: Schema(
        "hole_punch",
        (("addresses", _check_punch_addresses),),
        from_wire=(("addresses", tuple),),
    ),
    HolePunchSync: Schema("hole_punch_sync", (("connected", _bool),)),
}
SCHEMA_BY_NAME = {schema.name: (cls, schema, schema.keys) for cls, schema in SCHEMAS.items()}
# The hidden-state tensors are (batch=1, T, hidden): one session is one sequence.
_TENSOR_NDIM = 3


_DIM = _int(1, MAX_DIM)
REQUEST_ID = _int(0, MAX_REQUEST_ID)


def check_shape(shape: object, name: str) -> list[int]:
    if type(shape) is not list or len(shape) != _TENSOR_NDIM:
        raise ProtocolError(f"{name} shape must be a list of {_TENSOR_NDIM} ints")
    for dim in shape:
        _DIM(dim, f"{name} dimension")
    if shape[0] != 1:
        raise ProtocolError(f"{name} batch must be 1, got {shape[0]}")
    return shape


def check_length(length: int, max_frame_bytes: int) -> None:
    """Check a frame's length field (the bytes after it) before reading the frame."""
    if length > max_frame_bytes:
        raise ProtocolError(f"frame of {length} bytes exceeds the limit of {max_frame_bytes}")
    if length < 4 + 1:
        raise ProtocolError(f"frame of {length} bytes cannot hold a header")
