"""Tokens of pushed steps: who may hand a step into a session, and where it may go next.

With push, each peer hands its output straight to the next hop. A hop then receives steps on a
connection from another peer, not from the client that opened the session, so the connection
no longer says whose step it is. The client gives each session, when it opens it, a random
push key (`OpenSession.push_key`) that only the client and that peer know. For a pushed step
the client computes, for every hop after the first, a token:

    token = HMAC-SHA256(push key, domain | session ID | the route after that hop)

and puts the tokens in the route that the first hop receives (`Step.route`). A peer takes a
pushed step only if its token is the one its session's key makes for that session and the
route the step carries on with. So:
- a stranger cannot put a step into someone else's session: it knows no push key, and
  session IDs alone do not let a step in;
- a peer forwards only along the route its client named: a hop that altered the rest of the
  route (to send activations elsewhere) would need the next hop's key to make a token for it;
- every address carries the next hop's peer ID, and the peer that forwards dials it pinned to
  that ID (TLS proves it), so it hands the activations to no one else.
The hop before a session learns that session's token, which lets it push this same route's
steps: it is the hop whose output the session takes as input anyway.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

import msgpack

from layerswarm.swarm.messages import PushHop

_DOMAIN = b"layerswarm push step v1\n"


def push_token(push_key: bytes, session_id: str, rest: Sequence[PushHop]) -> bytes:
    """The token that lets a pushed step into `session_id`, going on along `rest`."""
    route = [[hop.address, hop.session_id] for hop in rest]
    message = _DOMAIN + msgpack.packb([session_id, route])
    return hmac.new(push_key, message, hashlib.sha256).digest()


def token_matches(push_key: bytes, session_id: str, rest: Sequence[PushHop], token: bytes) -> bool:
    """Whether `token` is the one `push_key` makes for this session and route."""
    return hmac.compare_digest(push_token(push_key, session_id, rest), token)


def forward_failure(peer_id: str, code: str, message: str) -> str:
    """The message of a FORWARD_FAILED error: the hop that failed first, then what it said."""
    return f"{peer_id} {code}: {message}"


def parse_forward_failure(message: str) -> tuple[str, str, str]:
    """(peer ID, code, message) of a FORWARD_FAILED error's message."""
    peer_id, _, rest = message.partition(" ")
    code, _, text = rest.partition(": ")
    return peer_id, code, text
