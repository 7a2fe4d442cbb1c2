"""Request handling on a peer: decode each request, check it, answer it or name what is wrong."""

from __future__ import annotations

import logging

from layerswarm.errors import RemoteError
from layerswarm.peer.config import PeerConfig
from layerswarm.peer.fault_injection import FaultInjector
from layerswarm.peer.forward import Activations, PushSteps
from layerswarm.peer.sessions import Session, SessionTable
from layerswarm.shards.config import DTYPES, Span
from layerswarm.swarm.compress import compress_int8, decompress_int8
from layerswarm.swarm.listen import ConnectionInfo
from layerswarm.swarm.protocol import (
    Closed,
    CloseSession,
    Collect,
    ErrorCode,
    InfoReply,
    InfoRequest,
    JsonValue,
    Message,
    OpenSession,
    SessionOpened,
    Step,
    StepResult,
)

log = logging.getLogger(__name__)


def owner(conn: ConnectionInfo) -> str:
    """Whose sessions these are: one client connection (its proven peer ID and its socket).

    Sessions die with their connection, so a client that vanished leaves no cache behind; a
    client that reconnects replays its inputs into new sessions, as after any failure.
    """
    return f"{conn.peer_id}@{conn.host}:{conn.port}"


def client(conn: ConnectionInfo) -> str:
    """Who the client is, across its connections (its peer ID): per-client limits count this."""
    return conn.peer_id


class RequestHandler:
    """Answers the requests of every connection to one peer."""

    def __init__(
        self, config: PeerConfig, table: SessionTable, peer_id: str, model_id: str
    ) -> None:
        self.config = config
        self.model_id = model_id  # "name@fingerprint": clients check the fingerprint
        self.table = table
        self.peer_id = peer_id
        self.stopping = False
        self.extra: dict[str, JsonValue] = {}  # measured speed, memory, quantization
        # tests only (`--test-fault-injector`): a peer that lies on purpose
        self.faults = FaultInjector(config.test_faults) if config.test_faults else None
        self.push: PushSteps | None = None  # steps handed on to the next hop; None: refused

    async def __call__(self, conn: ConnectionInfo, msg: Message) -> Message:
        if self.stopping and not isinstance(msg, (InfoRequest, CloseSession)):
            raise RemoteError(ErrorCode.SHUTTING_DOWN, "this peer is shutting down")
        if isinstance(msg, InfoRequest):
            return self.faults.info(self.info()) if self.faults else self.info()
        if isinstance(msg, OpenSession):
            return await self._open(conn, msg)
        if isinstance(msg, Step):
            if msg.route is not None or msg.token is not None:
                push = self._push()
                return await push.step(push.session(self.table, owner(conn), msg), msg, self._run)
            session = self.table.get(owner(conn), msg.session_id)
            out, scales = await self._run(session, msg)
            return StepResult(msg.session_id, out, scales)
        if isinstance(msg, Collect):
            session = self.table.get(owner(conn), msg.session_id)
            out, scales = await self._push().collect(session, msg.start_position)
            return StepResult(msg.session_id, out, scales)
        if isinstance(msg, CloseSession):
            self.table.close(owner(conn), msg.session_id)
            return Closed(msg.session_id)
        raise RemoteError(ErrorCode.PROTOCOL, f"{type(msg).__name__} is not a request")

    async def _run(self, session: Session, msg: Step) -> Activations:
        """Run one step of a session, sent by its client or pushed by the hop before.

        Returns:
            The output as it goes on the wire: int8 with scales when the input came so.
        """
        hidden = msg.hidden
        if msg.scales is not None:
            hidden = decompress_int8(hidden, msg.scales, DTYPES[self.config.dtype])
        out = await self.table.step(
            session,
            hidden,
            msg.start_position,
            self.config.step_timeout,
            truncate_to=msg.truncate_to,  # a speculative step's rollback, pushed steps' too
        )
        if self.faults is not None:
            out = self.faults.step(out)
        return compress_int8(out) if msg.scales is not None else (out, None)

    def _push_load(self) -> dict[str, JsonValue]:
        return {} if self.push is None else {"pushed_steps": self.push.handed_steps}

    def _push(self) -> PushSteps:
        if self.push is None:
            raise RemoteError(ErrorCode.PROTOCOL, "this peer does not take pushed steps")
        return self.push

    def disconnected(self, conn: ConnectionInfo) -> None:
        """Free the sessions of a connection that closed."""
        self.table.close_owner(owner(conn))

    async def _open(self, conn: ConnectionInfo, msg: OpenSession) -> SessionOpened:
        if not 0 < msg.max_length <= self.config.max_session_length:
            raise RemoteError(
                ErrorCode.BAD_POSITION,
                f"max_length must be in 1..{self.config.max_session_length}, got {msg.max_length}",
            )
        try:
            layers = Span(msg.span_start, msg.span_end)
        except ValueError as e:
            raise RemoteError(ErrorCode.BAD_SPAN, str(e)) from None
        session = await self.table.open(
            owner(conn),
            client(conn),
            msg.session_id,
            layers,
            msg.max_length,
            prefix=msg.prefix or (),
            fork_of=msg.fork_of,
        )
        session.push_key = msg.push_key
        log.debug("opened session %s for %s on layers %s", msg.session_id, conn.peer_id, layers)
        return SessionOpened(msg.session_id, cached_tokens=session.cache.length)

    def info(self) -> InfoReply:
        span = self.table.model.span
        cache = self.table.cache
        return InfoReply(
            peer_id=self.peer_id,
            model=self.model_id,
            span_start=span.start,
            span_end=span.end,
            num_layers=self.table.model.config.num_layers,
            dtype=self.config.dtype,
            cache_tokens_free=self.table.tokens_free,
            cache_tokens_total=cache.tokens_total,
            active_sessions=len(self.table.sessions),
            extra={**self.extra, **self.table.load(), **self._push_load()},
        )
