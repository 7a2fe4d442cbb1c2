"""Push with real peer processes: peers hand activations to the next hop, and nobody else's."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import torch

from layerswarm.devtools.linkemu import LinkConfig, LinkProxy
from layerswarm.errors import PeerUnavailable, RemoteError
from layerswarm.peer.launch import LocalSwarm, PeerProcess, start_peer, start_peers
from layerswarm.routing.generate import Generator
from layerswarm.routing.local import open_local_generator
from layerswarm.routing.loop import BackgroundLoop
from layerswarm.routing.push import push_route
from layerswarm.routing.sampling import SamplingConfig
from layerswarm.routing.session import RemoteSession
from layerswarm.routing.swarm_client import ClientConfig, SwarmClient, open_swarm_generator
from layerswarm.shards.config import Span
from layerswarm.swarm.dial import Connection, open_connection
from layerswarm.swarm.identity import generate_identity
from layerswarm.swarm.protocol import (
    Collect,
    ErrorCode,
    InfoReply,
    InfoRequest,
    OpenSession,
    Pushed,
    PushHop,
    Step,
    StepResult,
)
from layerswarm.swarm.push import push_token
from layerswarm.swarm.transport import new_event_loop, parse_address

HIDDEN = 64
# Three hops, with a replica of the middle one to reroute to.
SPANS = [Span(0, 1), Span(1, 3), Span(1, 3), Span(3, 4)]
GREEDY = SamplingConfig(max_new_tokens=40, temperature=0.0)
PROMPT = [{"role": "user", "content": "hello 12 hello 12 hell"}]


@pytest.fixture(scope="module")
def swarm(tiny_chat_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSwarm]:
    with start_peers(tiny_chat_dir, SPANS, tmp_path_factory.mktemp("push")) as swarm:
        yield swarm


# No steps checked on replicas: a checked step goes hop by hop, and these tests count the
# pushed ones (verification itself is tested in test_trust.py).
UNCHECKED: dict[str, float] = {"verify_fraction": 0.0, "verify_first_steps": 0}


def greedy(gen: Generator) -> list[int]:
    gen.tokenizer.eos_ids = frozenset()  # random weights: decode every token asked for
    return list(gen.tokens(gen.tokenizer.encode_chat(PROMPT), GREEDY))


@pytest.fixture(scope="module")
def reference(tiny_chat_dir: Path) -> list[int]:
    return greedy(open_local_generator(tiny_chat_dir))


def pushed_steps(swarm: LocalSwarm) -> int:
    async def ask(peer: PeerProcess) -> int:
        conn = await open_connection(parse_address(peer.address), generate_identity())
        async with conn:
            info = await conn.request(InfoRequest())
        assert isinstance(info, InfoReply)
        count = info.extra["pushed_steps"]
        assert isinstance(count, int)
        return count

    async def ask_all() -> int:
        return sum(await asyncio.gather(*(ask(p) for p in swarm.peers)))

    return run(ask_all)


def run(fn: Callable[[], Awaitable[int | None]]) -> int | None:
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(asyncio.wait_for(fn(), 60))  # type: ignore[arg-type]


def test_push_gives_the_local_engines_greedy_tokens(
    tiny_chat_dir: Path, swarm: LocalSwarm, reference: list[int]
) -> None:
    assert ClientConfig().push  # the default
    before = pushed_steps(swarm)
    # No checks on replicas: a checked step goes hop by hop, and this counts pushed ones.
    gen = open_swarm_generator(tiny_chat_dir, swarm.addresses, config=ClientConfig(**UNCHECKED))
    assert greedy(gen) == reference
    # Every step went through 2 peers that were handed it by the hop before.
    assert pushed_steps(swarm) - before >= 2 * len(reference)
    relay = open_swarm_generator(tiny_chat_dir, swarm.addresses, config=ClientConfig(push=False))
    before = pushed_steps(swarm)
    assert greedy(relay) == reference
    assert pushed_steps(swarm) == before


def test_a_prompt_flows_down_the_hops_in_chunks_with_the_same_tokens(
    tiny_chat_dir: Path, swarm: LocalSwarm, reference: list[int]
) -> None:
    flowing = ClientConfig(prefill_chunk_tokens=4, **UNCHECKED)
    gen = open_swarm_generator(tiny_chat_dir, swarm.addresses, config=flowing)
    prompt = len(gen.tokenizer.encode_chat(PROMPT))
    before = pushed_steps(swarm)
    assert greedy(gen) == reference
    chunks = -(-prompt // 4)
    assert pushed_steps(swarm) - before == 2 * (chunks + len(reference) - 1)


def test_an_int8_prefill_sends_fewer_bytes_over_every_link(
    tiny_chat_dir: Path, swarm: LocalSwarm
) -> None:
    """A link emulator in front of each peer counts the bytes a prefill sends to it: int8
    with a scale per token against float32. (int8 is not exact, so no tokens are compared.)"""
    net = BackgroundLoop()
    peers = [swarm.peers[i] for i in (0, 1, 3)]
    proxies = [net.run(LinkProxy("127.0.0.1", p.port, LinkConfig()).start()) for p in peers]
    addresses = [f"127.0.0.1:{x.port}/{p.peer_id}" for x, p in zip(proxies, peers, strict=True)]
    text = [{"role": "user", "content": "hello 12 " * 25}]
    one_token = SamplingConfig(max_new_tokens=1, temperature=0.0)
    try:
        sent = {}
        for compression in (None, "int8"):
            before = [x.bytes_up for x in proxies]
            config = ClientConfig(
                prefill_compression=compression, prefill_chunk_tokens=64, **UNCHECKED
            )
            gen = open_swarm_generator(tiny_chat_dir, addresses, config=config)
            prompt = gen.tokenizer.encode_chat(text)
            assert len(list(gen.tokens(prompt, one_token))) == 1
            gen.client.close()  # type: ignore[attr-defined]
            sent[compression] = [x.bytes_up - b for x, b in zip(proxies, before, strict=True)]
        floats = len(prompt) * HIDDEN * 4
        assert all(n > floats for n in sent[None])  # each hop got the whole prompt's floats
        assert all(n < floats / 2 for n in sent["int8"]), (sent, floats)
    finally:
        for proxy in proxies:
            proxy.close()
            net.run(proxy.wait_closed())
        net.stop()


# --- who may push what, where -------------------------------------------------------------------


def peer_at(swarm: LocalSwarm, index: int) -> PeerProcess:
    return swarm.peers[index]


async def connect(peer: PeerProcess) -> Connection:
    return await open_connection(parse_address(peer.address), generate_identity())


async def open_hop(conn: Connection, sid: str, span: Span, key: bytes | None) -> None:
    await conn.request(OpenSession(sid, span.start, span.end, 32, key))


async def expect_error(request: Awaitable[object], code: str) -> RemoteError:
    with pytest.raises(RemoteError) as e:
        await request
    assert e.value.code == code, e.value
    return e.value


def test_a_stranger_cannot_push_into_someone_elses_session(swarm: LocalSwarm) -> None:
    async def go() -> None:
        middle = peer_at(swarm, 1)
        async with await connect(middle) as owner, await connect(middle) as stranger:
            key = os.urandom(32)
            await open_hop(owner, "victim", SPANS[1], key)
            x = torch.randn(1, 1, HIDDEN)
            # No token: not the stranger's session. A made-up token: refused.
            await expect_error(stranger.request(Step("victim", x, 0, route=())), "unknown_session")
            forged = Step("victim", x, 0, route=(), token=os.urandom(32))
            await expect_error(stranger.request(forged), ErrorCode.FORBIDDEN)
            # With the token the client made, the step is let in (it is the hop before's right).
            good = Step("victim", x, 0, route=(), token=push_token(key, "victim", []))
            assert isinstance(await stranger.request(good), Pushed)
            out = await owner.request(Collect("victim", 0))
            assert isinstance(out, StepResult) and out.hidden.shape == x.shape

    run(go)


def test_a_peer_forwards_only_along_its_clients_route(swarm: LocalSwarm) -> None:
    """The middle hop's client granted it [last hop]; a step that would send its output to
    another peer (the replica, which holds a session of the client's too) is refused there,
    and the step never reaches that peer."""

    async def go() -> None:
        _, middle, replica, last = swarm.peers
        conns = [await connect(p) for p in swarm.peers]
        try:
            keys = {sid: os.urandom(32) for sid in ("a", "b", "c", "d")}
            for conn, sid, span in zip(conns, keys, SPANS, strict=True):
                await open_hop(conn, sid, span, keys[sid])
            to_last = PushHop(last.address, "d", push_token(keys["d"], "d", []))
            to_replica = PushHop(replica.address, "c", push_token(keys["c"], "c", []))
            # The client granted the middle hop the route [last]; token made for that route.
            granted = push_token(keys["b"], "b", [to_last])
            x = torch.randn(1, 1, HIDDEN)
            hijacked = Step("b", x, 0, route=(to_replica,), token=granted)
            async with await connect(middle) as hop_before:
                await expect_error(hop_before.request(hijacked), ErrorCode.FORBIDDEN)
            # Through the first hop, as a pushed route whose rest was altered: refused too,
            # and the first hop says which hop refused.
            altered = (PushHop(middle.address, "b", granted), to_replica)
            e = await expect_error(
                conns[0].request(Step("a", x, 0, route=altered)), ErrorCode.FORWARD_FAILED
            )
            assert e.message.startswith(middle.peer_id) and "forbidden" in e.message
            with pytest.raises(PeerUnavailable, match="no reply"):  # nothing reached it
                await conns[2].request(Collect("c", 0), timeout=1.0)
        finally:
            for conn in conns:
                conn.close()
            await asyncio.gather(*(conn.wait_closed() for conn in conns))

    run(go)


def test_a_peer_checks_the_next_hops_peer_id(swarm: LocalSwarm) -> None:
    async def go() -> None:
        first, middle = peer_at(swarm, 0), peer_at(swarm, 1)
        async with await connect(first) as a, await connect(middle) as b:
            await open_hop(a, "a", SPANS[0], None)
            key = os.urandom(32)
            await open_hop(b, "b", SPANS[1], key)
            impostor = f"127.0.0.1:{middle.port}/{peer_at(swarm, 3).peer_id}"
            route = (PushHop(impostor, "b", push_token(key, "b", [])),)
            e = await expect_error(
                a.request(Step("a", torch.randn(1, 1, HIDDEN), 0, route=route)),
                ErrorCode.FORWARD_FAILED,
            )
            assert "unreachable" in e.message and middle.peer_id in e.message

    run(go)


BAD_PUSHES = {
    "a collect of an unknown session": (Collect("nope", 0), "unknown_session"),
    "a route whose address does not parse": (
        Step("s", torch.zeros(1, 1, HIDDEN), 0, route=(PushHop("nohost/ID", "x", b"k" * 32),)),
        ErrorCode.PROTOCOL,
    ),
    "a pushed step into a session without a push key": (
        Step("s", torch.zeros(1, 1, HIDDEN), 0, route=(), token=b"k" * 32),
        "unknown_session",
    ),
    "a pushed step of the wrong shape": (
        Step("s", torch.zeros(1, 1, HIDDEN + 1), 0, route=()),
        ErrorCode.BAD_SHAPE,
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_PUSHES))
def test_bad_push_messages_get_clear_errors_and_the_peer_serves_on(
    swarm: LocalSwarm, case: str
) -> None:
    msg, code = BAD_PUSHES[case]

    async def go() -> None:
        peer = peer_at(swarm, 0)
        async with await connect(peer) as conn:
            await open_hop(conn, "s", SPANS[0], None)
            await expect_error(conn.request(msg), code)
            reply = await conn.request(Step("s", torch.randn(1, 2, HIDDEN), 0))
            assert isinstance(reply, StepResult)

    run(go)


def test_push_route_tokens_cover_the_rest_of_the_route() -> None:
    """Each later hop's token is made with its own key for the hops after it (pure)."""

    class Hop:
        def __init__(self, n: int) -> None:
            self.view = type("V", (), {"address": f"127.0.0.1:{n}/ID{n}"})()
            self.session_id = f"s{n}"
            self.push_key = bytes([n]) * 32

    hops = [Hop(n) for n in range(1, 4)]
    route = push_route(hops)  # type: ignore[arg-type]
    assert [h.session_id for h in route] == ["s2", "s3"]
    assert route[1].token == push_token(hops[2].push_key, "s3", [])
    assert route[0].token == push_token(hops[1].push_key, "s2", [route[1]])


def test_reply_survives_kill_9_of_the_middle_hop_with_push(
    tiny_chat_dir: Path, swarm: LocalSwarm, reference: list[int]
) -> None:
    """Last in this file: it kills a peer of the module's swarm (the middle has a replica)."""
    events: list[str] = []
    gen = open_swarm_generator(tiny_chat_dir, swarm.addresses, on_event=events.append)
    gen.tokenizer.eos_ids = frozenset()
    tokens = []
    for token in gen.tokens(gen.tokenizer.encode_chat(PROMPT), GREEDY):
        tokens.append(token)
        if len(tokens) == 15:
            session = gen.active
            assert isinstance(session, RemoteSession) and len(session.hops) == 3
            middle = session.hops[1].view.peer_id
            victim = next(p for p in swarm.peers if p.peer_id == middle)
            victim.stop(signal.SIGKILL)
    assert tokens == reference
    assert any("rerouted" in e for e in events), events


def test_a_hop_lost_during_a_flowing_prefill_restarts_it_on_a_new_path(
    tiny_chat_dir: Path, swarm: LocalSwarm, tmp_path: Path
) -> None:
    """After the kill above: one more middle peer, so that one survives this test's kill. The
    session loses its middle hop before a prompt flows in chunks: the client opens a new path,
    and the output is what an undisturbed session computes."""
    spare = start_peer(tiny_chat_dir, Span(1, 3), tmp_path)
    try:
        live = [p.address for p in swarm.peers if p.process.poll() is None]
        client = SwarmClient(
            tiny_chat_dir, [*live, spare.address], ClientConfig(prefill_chunk_tokens=4, **UNCHECKED)
        )
        hidden = torch.randn(1, 30, HIDDEN)
        calm = client.net.run(client.open_pipeline(64))
        expected = calm.forward(hidden, 0)
        events: list[str] = []
        client.on_event = events.append
        session = client.net.run(client.open_pipeline(64))
        assert isinstance(session, RemoteSession)
        middle = session.hops[1].view.peer_id
        victim = next(p for p in [*swarm.peers, spare] if p.peer_id == middle)
        victim.stop(signal.SIGKILL)
        assert torch.equal(session.forward(hidden, 0), expected)
        assert any("starting it again" in e for e in events), events
        assert middle not in {h.view.peer_id for h in session.hops}
        client.close()
    finally:
        spare.stop()
