"""A hop of a session's path, and how its failures are told apart (see `session`)."""

from __future__ import annotations

import secrets
import uuid
from dataclasses import dataclass, field

from layerswarm.errors import LayerswarmError
from layerswarm.routing.paths import PeerView
from layerswarm.shards.config import Span
from layerswarm.swarm.dial import Connection
from layerswarm.swarm.messages import PUSH_KEY_BYTES
from layerswarm.swarm.protocol import ErrorCode

# Errors that say the peer is alive but cannot take this session now: move it, never ban.
NOT_A_FAULT = {
    ErrorCode.CACHE_FULL,
    ErrorCode.SESSION_FULL,
    ErrorCode.BUSY,
    ErrorCode.SHUTTING_DOWN,
    ErrorCode.TIMEOUT,  # the peer gave up on its own queue: busy, not broken
    ErrorCode.UNKNOWN_SESSION,  # expired or dropped (a rebalance): rebuild it
}
FIRST_PAUSE = 0.05  # unit: s before asking full peers again; doubles up to 1 s
# Errors after which another replica may well succeed, though this peer failed.
FAULTS = {ErrorCode.INTERNAL}


class SwarmBusy(LayerswarmError):
    """Every peer that serves some layers is full or busy; try again in a while."""


def host(address: str) -> str:
    """`host:port` of an address, without the peer ID."""
    return address.split("/")[0]


class HopFailed(LayerswarmError):
    """A hop could not run a step; the session reroutes around it.

    `fault`: the peer failed (ban it); False: it is only full or busy (avoid it, no ban).
    """

    def __init__(self, peer_id: str, reason: str, fault: bool = True) -> None:
        super().__init__(reason)
        self.peer_id = peer_id
        self.fault = fault


@dataclass
class ActiveHop:
    view: PeerView
    span: Span
    conn: Connection
    # This hop's own session ID: a retried open never reuses one that another hop holds.
    session_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    # The key of the tokens that let steps pushed by the hop before into this session.
    push_key: bytes = field(default_factory=lambda: secrets.token_bytes(PUSH_KEY_BYTES))
