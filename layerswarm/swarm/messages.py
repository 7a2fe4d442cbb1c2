"""The messages of the wire protocol, and the limits every frame keeps.

`protocol` encodes and decodes them as frames; `schema` holds the rules each field is checked
against.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, TypeAlias

import torch

PROTOCOL_VERSION = 1
MAX_FRAME_BYTES = 64 * 2**20  # bytes: default largest frame, after the length field
MAX_HEADER_BYTES = 64 * 2**10  # bytes: largest msgpack header
MAX_REQUEST_ID = 2**63 - 1  # ids run from 0 (connection-level messages) up to this
MAX_LAYERS = 2**20  # layers: bound on span and layer-count fields
MAX_TOKENS = 2**31 - 1  # tokens: bound on positions, lengths and cache sizes
MAX_DIM = 2**31 - 1  # elements: bound on one tensor dimension
TENSOR_ALIGN = 8  # bytes: tensor payloads start at a multiple of this into the frame
PSK_PROOF_BYTES = 32  # bytes: a Hello's proof of the swarm key (HMAC-SHA256)
PUSH_KEY_BYTES = 32  # bytes: a session's push key, shared by its client and its peer only
PUSH_TOKEN_BYTES = 32  # bytes: a pushed step's token (HMAC-SHA256, see `swarm/push.py`)
MAX_ROUTE_HOPS = 64  # hops: the longest route a step may carry
MAX_SCALES = 8192  # scales a compressed step may carry (4 bytes each, in the header)
RELAY_TOKEN_BYTES = 16  # bytes: names one relayed connection between a relay and its target
PREFIX_BLOCK_TOKENS = 16  # tokens a prefix hash covers (`OpenSession.prefix`): a KV page's
PREFIX_HASH_BYTES = 16  # bytes: one link of a prefix's hash chain
MAX_PREFIX_BLOCKS = 2048  # hashes an open may carry: 32,768 tokens, 36 KiB of header
MAX_PUNCH_ADDRESSES = 4  # addresses a hole punch's `HolePunch` may name

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int8": torch.int8,  # compressed activations, with `scales` (`swarm/compress.py`)
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}

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
    FORBIDDEN = "forbidden"  # a pushed step's token does not match its session and route
    # a peer could not hand a pushed step to the next hop; the message starts with that hop's
    # peer ID, then the code and message of what went wrong there (`swarm/push.py`)
    FORWARD_FAILED = "forward_failed"
    NO_RESERVATION = "no_reservation"  # a relay holds no reservation for the asked peer
    RESOURCE_LIMIT = "resource_limit"  # a relay at one of its limits (`swarm/relay.py`)
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
    # PUSH_KEY_BYTES: the secret that tokens of steps pushed into this session are made with
    # (by the client, which gives each token to the hop before this one); None: no pushes
    push_key: bytes | None = None
    # PREFIX_HASH_BYTES each: the hash chain of the session's first blocks of
    # PREFIX_BLOCK_TOKENS tokens (`routing/prefix.py`); a peer that keeps pages of that prefix
    # (for this client and these layers) starts the session with them. None: no reuse
    prefix: tuple[bytes, ...] | None = None
    # A session of this connection to fork: the new one holds what it holds, its pages shared
    # copy-on-write (`n` choices of one prompt cost one prefill). None: a new session
    fork_of: str | None = None


@dataclass(frozen=True)
class SessionOpened:
    session_id: str
    # unit: tokens the session already holds (a cached prefix, or a fork's parent's); the
    # client's first step starts there. None: an older peer's reply, read as 0
    cached_tokens: int | None = None


class PushHop(NamedTuple):
    """A later hop of a pushed step (on the wire, a list of its three fields)."""

    address: str  # host:port/PEERID: the pushing peer dials it and checks the peer ID
    session_id: str  # the session the client opened there
    token: bytes  # PUSH_TOKEN_BYTES: lets this step into that session, on this route only


@dataclass(frozen=True, eq=False)
class Step:
    """Run the session's span on positions [start_position, start_position + T).

    With `route`, the peer then hands its output to `route[0]` as the same step (every field
    kept but the session, the route and the token), and so on down the route (push).

    With `truncate_to`, the session first forgets every position from there on (a speculative
    step's rejected drafts) and gives back the KV pages that held only those; the step then
    starts at `truncate_to`. A peer answers `bad_position` to a value that is negative, past
    what the session holds, or not the step's start.
    """

    session_id: str
    hidden: torch.Tensor  # (1, T, hidden)
    start_position: int
    route: tuple[PushHop, ...] | None = None  # the hops after this one; None: reply with it
    # PUSH_TOKEN_BYTES: set on a step pushed by the hop before (it then comes from another
    # peer's connection, not the client's); None: the session's own client sends it
    token: bytes | None = None
    # `hidden` is int8 with these fp32 scales, one a token and group of channels
    # (`swarm/compress.py`); the peer then sends its output so too. None: plain floats
    scales: bytes | None = None
    truncate_to: int | None = None  # unit: tokens the session keeps; None: keep them all


@dataclass(frozen=True, eq=False)
class StepResult:
    session_id: str
    hidden: torch.Tensor  # (1, T, hidden)
    scales: bytes | None = None  # as `Step.scales`


@dataclass(frozen=True)
class Collect:
    """Ask for this hop's output of the pushed step at `start_position` (a `StepResult`)."""

    session_id: str
    start_position: int


@dataclass(frozen=True)
class Pushed:
    """A pushed step ran here and every hop after this one took it."""

    session_id: str


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


@dataclass(frozen=True)
class DialBack:
    """Ask a peer to dial this side back, on a fresh connection, at `port` of the IP address
    it sees this connection come from (`swarm/reachability.py`)."""

    port: int  # the TCP port this side listens on, and plans to announce


@dataclass(frozen=True)
class DialBackReply:
    reachable: bool  # whether a fresh connection to observed_host:port proved this side's ID
    observed_host: str  # the IP address this side's connection came from, as the answerer sees it
    observed_port: int  # that connection's source port (a NAT's mapping of it)
    reason: str  # why not reachable ("" when reachable)
    relay_port: int = 0  # the answerer serves as a relay on this TCP port; 0: it does not


@dataclass(frozen=True)
class Reserve:
    """Ask a relay to hold (or renew) a reservation for this side's peer ID.

    With `record`, the relay also carries this side's signed peer record (in the DHT, beside its
    own: readers cannot dial a peer behind NAT to fetch it; `swarm/relay.py`).
    """

    record: bytes | None = None  # a signed PeerRecord of this side, at most 1024 bytes


@dataclass(frozen=True)
class Reserved:
    relay_port: int  # where dialers reach this side through the relay
    ttl: float  # unit: s the reservation holds unless renewed
    max_connections: int  # relayed connections at once
    max_bytes_per_s: int  # bytes/s: each relayed connection, each way
    max_duration: float  # unit: s each relayed connection may stay open


@dataclass(frozen=True)
class AwaitRelayed:
    """A reservation holder waits for the next dialer; the relay answers with `Relayed`."""


@dataclass(frozen=True)
class Relayed:
    """A dialer waits at the relay: accept it with a `RelayAccept` carrying this token."""

    token: bytes  # RELAY_TOKEN_BYTES


@dataclass(frozen=True)
class RelayConnect:
    """A dialer's first frame at a relay's port: join me to `target`."""

    target: str  # the peer ID of a reservation holder


@dataclass(frozen=True)
class RelayAccept:
    """A reservation holder's first frame at its relay's port: join me to this dialer."""

    token: bytes  # RELAY_TOKEN_BYTES, from `Relayed`


@dataclass(frozen=True)
class RelayJoined:
    """The relay's answer to `RelayConnect`/`RelayAccept`: from here on, bytes pass through."""

    observed: str | None = None  # host:port this leg came from, as the relay saw it (a NAT's)


@dataclass(frozen=True)
class HolePunch:
    """DCUtR's Connect, both ways over a relayed connection: the dialer's observed addresses
    (request), then the target's (reply); `swarm/punch.py`."""

    addresses: tuple[str, ...]  # host:port, the sender as relays saw it, best first


@dataclass(frozen=True)
class HolePunchSync:
    """DCUtR's Sync: the target opens TCP to the dialer's addresses at once (the dialer half a
    round trip later); its reply says whether that connected."""

    connected: bool = False  # in the reply: the target's simultaneous open connected


Message: TypeAlias = (
    Hello
    | InfoRequest
    | InfoReply
    | OpenSession
    | SessionOpened
    | Step
    | StepResult
    | Collect
    | Pushed
    | CloseSession
    | Closed
    | ErrorReply
    | Goodbye
    | DialBack
    | DialBackReply
    | Reserve
    | Reserved
    | AwaitRelayed
    | Relayed
    | RelayConnect
    | RelayAccept
    | RelayJoined
    | HolePunch
    | HolePunchSync
)
REQUEST_TYPES: tuple[type[Message], ...] = (
    InfoRequest,
    OpenSession,
    Step,
    Collect,
    CloseSession,
    DialBack,
    Reserve,
    AwaitRelayed,
    HolePunch,
    HolePunchSync,
)
