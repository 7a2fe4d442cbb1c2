"""What an error from a hop means: the one classifier, and the checks made on every reply.

Every path through the swarm (relay, push, checked steps, opening and closing sessions) sends
its errors here and acts on the answer:
- **failed**: the peer broke (connection lost, silence, a malformed or non-finite reply, an
  internal error). The route bans it for a while and moves; another replica may well succeed.
- **full**: the peer is alive but cannot take this now (cache or session full, busy, its own
  queue timed out, the session expired or its span moved). Move, never ban.
- **leaving**: the peer said it is stopping. Move, never ban.
- **our bug**: the peer says this client sent something malformed (a bad frame, shape,
  position or push token). Asking another peer would only repeat it: `ClientBug` is raised at
  once, with the peer's own message.
"""

from __future__ import annotations

import enum

import torch

from layerswarm.errors import LayerswarmError, PeerUnavailable, RemoteError
from layerswarm.swarm.protocol import ErrorCode


class Failure(enum.Enum):
    """What a hop's failure means for the route."""

    FAILED = "failed"  # ban the peer for a while, move
    FULL = "full"  # move, no ban; wait for room when every replica is full
    LEAVING = "leaving"  # move, no ban


# Error codes of a live peer that cannot take this session now.
FULL_CODES = frozenset(
    {
        ErrorCode.CACHE_FULL,
        ErrorCode.SESSION_FULL,
        ErrorCode.BUSY,
        ErrorCode.TIMEOUT,  # the peer gave up on its own queue: busy, not broken
        ErrorCode.UNKNOWN_SESSION,  # expired or dropped (a rebalance): rebuild it
        ErrorCode.BAD_SPAN,  # it serves other layers now (a rebalance): use another peer
    }
)
# Error codes after which another replica may well succeed, though this peer failed.
FAILED_CODES = frozenset({ErrorCode.INTERNAL})
# Error codes that say this client sent something malformed: our bug, never the peer's.
OUR_BUG_CODES = frozenset(
    {ErrorCode.PROTOCOL, ErrorCode.BAD_SHAPE, ErrorCode.BAD_POSITION, ErrorCode.FORBIDDEN}
)
# What a peer that could not hand a pushed step on says of the next hop (`swarm/push.py`):
# it could not reach it, or the next hop refused the frame it was handed.
FORWARD_FAILED_CODES = frozenset({"unreachable", ErrorCode.PROTOCOL})


class HopFailed(LayerswarmError):
    """A hop could not run a step; the route moves around it (`failure` says how)."""

    def __init__(self, peer_id: str, reason: str, failure: Failure = Failure.FAILED) -> None:
        super().__init__(reason)
        self.peer_id = peer_id
        self.failure = failure

    @property
    def fault(self) -> bool:
        """Whether the peer failed (ban it), rather than being full or leaving."""
        return self.failure is Failure.FAILED


class ClientBug(LayerswarmError):
    """A peer says this client sent something malformed: a bug here, raised at once."""


class SwarmBusy(LayerswarmError):
    """Every peer that serves some layers is full or busy; try again in a while."""


def from_code(peer_id: str, address: str, code: str, message: str) -> HopFailed:
    """The failure an error reply `code` from the peer at `address` means.

    Raises:
        ClientBug: the code says this client sent something malformed.
        RemoteError: a code that no other peer would answer differently (a swarm key refused).
    """
    reason = f"peer {address}: {code}: {message}"
    if code in FULL_CODES:
        return HopFailed(peer_id, reason, Failure.FULL)
    if code == ErrorCode.SHUTTING_DOWN:
        return HopFailed(peer_id, reason, Failure.LEAVING)
    if code in FAILED_CODES:
        return HopFailed(peer_id, reason)
    if code in OUR_BUG_CODES:
        raise ClientBug(
            f"peer {address} refused what this client sent ({code}: {message}); this is a bug "
            "in layerswarm's client: please report it with this message"
        )
    raise RemoteError(code, message)


def classify(peer_id: str, address: str, error: BaseException) -> HopFailed:
    """The failure an exception raised by a request to the peer at `address` means.

    Raises:
        ClientBug, RemoteError: as `from_code`; any other exception is raised again as it is.
    """
    if isinstance(error, HopFailed):
        return error
    if isinstance(error, RemoteError):
        return from_code(peer_id, address, error.code, error.message)
    if isinstance(error, (PeerUnavailable, TimeoutError, ConnectionError)):
        return HopFailed(peer_id, f"peer {address}: {error}")
    raise error


def from_forward(peer_id: str, address: str, code: str, message: str) -> HopFailed:
    """The failure of the hop that a pushing peer could not hand the step to."""
    if code in FORWARD_FAILED_CODES:
        return HopFailed(peer_id, f"{address} did not take a pushed step: {code}: {message}")
    return from_code(peer_id, address, code, message)


def leaving(peer_id: str) -> HopFailed:
    return HopFailed(peer_id, "the peer is leaving", Failure.LEAVING)


def reply_fault(sent: torch.Tensor, got: torch.Tensor) -> str | None:
    """What is wrong with a step's output `got` for the input `sent`; None if nothing."""
    if got.shape != sent.shape:
        return f"an output of shape {tuple(got.shape)} for an input of {tuple(sent.shape)}"
    if got.dtype != sent.dtype:
        return f"an output in {got.dtype} for an input in {sent.dtype}"
    if not bool(torch.isfinite(got).all()):
        return "non-finite values (NaN or inf)"
    return None
