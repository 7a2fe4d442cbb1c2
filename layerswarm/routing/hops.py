"""A hop of a session's path: a peer, the layers it runs for the session, and its session."""

from __future__ import annotations

import secrets
import uuid
from dataclasses import dataclass, field

from layerswarm.routing.paths import PeerView
from layerswarm.shards.config import Span
from layerswarm.swarm.dial import Connection
from layerswarm.swarm.messages import PUSH_KEY_BYTES


def host(address: str) -> str:
    """`host:port` of an address, without the peer ID."""
    return address.split("/")[0]


@dataclass
class ActiveHop:
    view: PeerView
    span: Span
    conn: Connection
    # This hop's own session ID: a retried open never reuses one that another hop holds.
    session_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    # The key of the tokens that let steps pushed by the hop before into this session.
    push_key: bytes = field(default_factory=lambda: secrets.token_bytes(PUSH_KEY_BYTES))
    cached: int = 0  # unit: tokens its session held when it opened (a kept prefix, a fork's)
