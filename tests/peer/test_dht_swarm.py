"""WAN discovery for real: peer processes on loopback meet in the DHT, choose their spans from it,
and serve a client that knows one bootstrap address; a private swarm admits only its key's holders.

Every peer is a `swarm-peer start` process listening on 127.0.0.1 (mDNS off, as `start_peer`
does); clients and readers are DHT nodes in this process, on 127.0.0.1 too.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import pytest

from layerswarm.errors import PeerUnavailable, SwarmKeyMismatch
from layerswarm.peer.launch import LocalSwarm, PeerProcess, start_peer, start_peers
from layerswarm.peer.placement import Server, choose_span, layers_that_fit
from layerswarm.routing.sampling import SamplingConfig
from layerswarm.routing.swarm_client import ClientConfig, open_swarm_generator
from layerswarm.shards.config import ModelConfig, Span
from layerswarm.shards.weights import model_fingerprint
from layerswarm.swarm.dht import DhtConfig, DhtNode
from layerswarm.swarm.discovery import DhtLookup, dht_key
from layerswarm.swarm.identity import generate_identity
from layerswarm.swarm.records import PeerRecord

T = TypeVar("T")
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = SamplingConfig(max_new_tokens=12, temperature=0.0)
FAST = DhtConfig(connect_timeout=2.0, lookup_timeout=3.0, fetch_timeout=1.0, start_timeout=10.0)
CLIENT = ClientConfig(connect_timeout=2.0, discovery_timeout=10.0)
SMALL = ["--cache-memory", "8"]  # MiB of KV cache: the budgets below are mostly weights
GUARD = 120.0  # s: a hung read fails the test instead of hanging it; no test asserts a duration


def run(coro: Coroutine[Any, Any, T]) -> T:
    async def guarded() -> T:
        return await asyncio.wait_for(coro, GUARD)

    return asyncio.run(guarded())


class Reader:
    """A DHT node of its own (a client's view), reading one model's verified records."""

    def __init__(self, node: DhtNode, model_hash: str) -> None:
        self.node = node
        self.lookup = DhtLookup(lambda: node.get_records(dht_key(model_hash)))
        self.model_hash = model_hash

    @classmethod
    async def open(cls, bootstrap: str, model_hash: str, swarm_key: bytes | None = None) -> Reader:
        node = await DhtNode.start(
            generate_identity(), "127.0.0.1", 0, [bootstrap], swarm_key, FAST
        )
        return cls(node, model_hash)

    async def wait_for(self, peer_ids: set[str], timeout: float = 30.0) -> list[PeerRecord]:
        """Read until the view is exactly `peer_ids` (or `timeout` passes); return the view."""
        deadline = time.monotonic() + timeout
        while True:
            await self.lookup.refresh()
            records = self.lookup.records(self.model_hash)
            if {r.peer_id for r in records} == peer_ids or time.monotonic() > deadline:
                return records
            await asyncio.sleep(0.3)


def ids(peers: Sequence[PeerProcess]) -> set[str]:
    return {p.peer_id for p in peers}


def ask_france(model_dir: Path, config: ClientConfig, peers: Sequence[str] = ()) -> str:
    gen = open_swarm_generator(model_dir, peers, config=config)
    try:
        return "".join(gen.chat(QUESTION, GREEDY))
    finally:
        gen.client.close()  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def model_hash(smollm2_dir: Path) -> str:
    return model_fingerprint(smollm2_dir)


@pytest.fixture(scope="module")
def five_peers(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSwarm]:
    """Five peers of six layers each: the first runs a bare DHT node, the rest join through it."""
    workdir = tmp_path_factory.mktemp("dht5")
    swarm = LocalSwarm([start_peer(smollm2_dir, Span(0, 6), workdir, ["--dht"])])
    with swarm:
        join = ["--bootstrap", swarm.peers[0].multiaddr]
        spans = [Span(n, n + 6) for n in range(6, 30, 6)]
        swarm.peers += start_peers(smollm2_dir, spans, workdir, join).peers
        yield swarm


def test_every_peer_is_found_through_any_peer_as_bootstrap(
    five_peers: LocalSwarm, model_hash: str
) -> None:
    expected = {p.peer_id: p.span for p in five_peers.peers}

    async def main() -> None:
        for peer in five_peers.peers:
            reader = await Reader.open(peer.multiaddr, model_hash)
            try:
                records = await reader.wait_for(set(expected))
            finally:
                await reader.node.close()
            assert {r.peer_id: Span(r.span_start, r.span_end) for r in records} == expected
            ports = {p.peer_id: p.port for p in five_peers.peers}
            assert all(r.addresses == (f"127.0.0.1:{ports[r.peer_id]}",) for r in records)

    run(main())


def test_a_client_that_knows_one_bootstrap_address_chats_through_the_discovered_swarm(
    smollm2_dir: Path, five_peers: LocalSwarm
) -> None:
    config = replace(CLIENT, bootstrap=(five_peers.peers[3].multiaddr,))
    gen = open_swarm_generator(smollm2_dir, [], config=config)
    try:
        assert {v.peer_id for v in gen.client.views()} == ids(five_peers.peers)  # type: ignore[attr-defined]
        reply = "".join(gen.chat(QUESTION, GREEDY))
    finally:
        gen.client.close()  # type: ignore[attr-defined]
    assert "Paris" in reply


def test_a_peer_that_stops_leaves_the_view_once_its_record_expires(
    smollm2_dir: Path, five_peers: LocalSwarm, model_hash: str, tmp_path: Path
) -> None:
    join = ["--bootstrap", five_peers.peers[0].multiaddr, "--record-ttl", "5"]
    extra = start_peer(smollm2_dir, Span(0, 6), tmp_path, join)
    everyone = ids(five_peers.peers)

    async def main() -> None:
        reader = await Reader.open(five_peers.peers[1].multiaddr, model_hash)
        try:
            seen = await reader.wait_for(everyone | {extra.peer_id})
            assert {r.peer_id for r in seen} == everyone | {extra.peer_id}
            (record,) = [r for r in seen if r.peer_id == extra.peer_id]
            assert record.expires_at - record.timestamp == 5.0
            extra.stop(signal.SIGKILL)  # no goodbye, no unpublishing: only expiry removes it
            after = await reader.wait_for(everyone)
            assert {r.peer_id for r in after} == everyone
        finally:
            await reader.node.close()

    try:
        run(main())
    finally:
        extra.stop(signal.SIGKILL)


def test_auto_layers_follow_memory_budgets_and_a_fourth_peer_goes_where_coverage_is_thinnest(
    smollm2_dir: Path, model_hash: str, tmp_path: Path
) -> None:
    model = ModelConfig.from_file(smollm2_dir)
    per_layer = model.layer_parameters() * 4  # fp32 weights: ~14.2 MB a layer
    budgets = [230, 160, 110]  # MiB, with 8 of them for the KV cache: 16, 11 and 7 layers
    wanted = [layers_that_fit(b * 2**20, per_layer, 8 * 2**20, 30) for b in budgets]
    assert wanted == [16, 11, 7]
    with LocalSwarm() as swarm:
        for n, budget in enumerate(budgets):  # one after another, each joining through the last
            join = ["--bootstrap", swarm.peers[-1].multiaddr] if n else ["--dht"]
            args = [*join, "--memory-budget", str(budget), *SMALL]
            swarm.peers.append(start_peer(smollm2_dir, None, tmp_path, args))
        spans = [p.span for p in swarm.peers]
        assert [len(s) for s in spans if s is not None] == wanted
        assert spans == [Span(0, 16), Span(16, 27), Span(23, 30)]  # the gap first, then the rest

        config = replace(CLIENT, bootstrap=(swarm.peers[0].multiaddr,))
        assert "Paris" in ask_france(smollm2_dir, config)

        async def records() -> list[PeerRecord]:
            reader = await Reader.open(swarm.peers[1].multiaddr, model_hash)
            try:
                return await reader.wait_for(ids(swarm.peers))
            finally:
                await reader.node.close()

        seen = run(records())
        join = ["--bootstrap", swarm.peers[2].multiaddr, "--memory-budget", "110", *SMALL]
        fourth = start_peer(smollm2_dir, None, tmp_path, join)
        swarm.peers.append(fourth)
        # Every layer is served: it goes where the swarm's throughput is lowest, by the speeds
        # the three measured and announced (a window served once, unless speeds differ widely).
        servers = [
            Server(r.peer_id, Span(r.span_start, r.span_end), r.decode_steps_per_s_per_layer)
            for r in seen
        ]
        assert fourth.span == choose_span(servers, 30, 7)


def test_a_private_swarm_admits_only_clients_with_its_key(
    smollm2_dir: Path, model_hash: str, tmp_path: Path
) -> None:
    key_file, other_file = tmp_path / "swarm.key", tmp_path / "other.key"
    key_file.write_bytes(os.urandom(32))
    other_file.write_text(os.urandom(32).hex() + "\n")  # the hex form is read too
    private = ["--swarm-key", str(key_file)]
    with LocalSwarm([start_peer(smollm2_dir, Span(0, 15), tmp_path, ["--dht", *private])]) as swarm:
        join = ["--bootstrap", swarm.peers[0].multiaddr, *private]
        swarm.peers.append(start_peer(smollm2_dir, Span(15, 30), tmp_path, join))
        bootstrap = (swarm.peers[1].multiaddr,)
        key = key_file.read_bytes()

        member = replace(CLIENT, bootstrap=bootstrap, swarm_key=key)
        assert "Paris" in ask_france(smollm2_dir, member)

        for swarm_key in (None, bytes.fromhex(other_file.read_text())):
            # The DHT lets nobody in without the key: the client cannot even find the peers...
            outsider = replace(CLIENT, bootstrap=bootstrap, swarm_key=swarm_key)
            with pytest.raises(PeerUnavailable, match="cannot join the DHT"):
                ask_france(smollm2_dir, outsider)
            # ...and the peers refuse it, even told their addresses.
            plain = replace(CLIENT, swarm_key=swarm_key)
            with pytest.raises(SwarmKeyMismatch, match="private swarm"):
                ask_france(smollm2_dir, plain, swarm.addresses)


def test_a_peer_that_joins_is_used_by_new_sessions(smollm2_dir: Path, tmp_path: Path) -> None:
    import random

    from layerswarm.routing.session import RemoteSession

    first = start_peer(smollm2_dir, Span(0, 30), tmp_path, ["--dht"])
    with LocalSwarm([first]) as swarm:
        config = ClientConfig(bootstrap=(first.multiaddr or "",), refresh_interval=0.0)
        gen = open_swarm_generator(smollm2_dir, [], config=config)
        gen.client.rng = random.Random(0)  # type: ignore[attr-defined]
        swarm.peers.append(
            start_peer(smollm2_dir, Span(0, 30), tmp_path, ["--bootstrap", first.multiaddr or ""])
        )
        used: set[str] = set()
        prompt = gen.tokenizer.encode_chat([{"role": "user", "content": "Hi"}])
        for _ in range(8):  # sessions spread over both replicas once the new one is known
            tokens = gen.tokens(prompt, SamplingConfig(max_new_tokens=2))
            next(tokens)
            assert isinstance(gen.active, RemoteSession)
            used |= {hop.view.peer_id for hop in gen.active.hops}
            tokens.close()
        assert swarm.peers[1].peer_id in used
        gen.client.close()  # type: ignore[attr-defined]


def wait_for_span(
    span_now: Callable[[], tuple[int, int]], wanted: tuple[int, int], timeout: float = 60
) -> None:
    deadline = time.monotonic() + timeout
    while (now := span_now()) != wanted:
        assert time.monotonic() < deadline, f"the auto-placed peer stayed at {now}, not {wanted}"
        time.sleep(1)


def test_an_auto_placed_peer_moves_to_fill_a_gap_another_left(
    smollm2_dir: Path, tmp_path: Path
) -> None:
    from layerswarm.swarm.dial import open_connection
    from layerswarm.swarm.protocol import InfoReply, InfoRequest
    from layerswarm.swarm.transport import TransportConfig, parse_address

    async def span_of(peer: PeerProcess) -> tuple[int, int]:
        async with await open_connection(
            parse_address(peer.address), generate_identity(), TransportConfig()
        ) as conn:
            info = await conn.request(InfoRequest())
            assert isinstance(info, InfoReply)
            return info.span_start, info.span_end

    first = start_peer(smollm2_dir, Span(0, 15), tmp_path, ["--dht"])
    with LocalSwarm([first]) as swarm:
        join = ["--bootstrap", first.multiaddr or ""]
        # Layers 15:30 served three times, 0:15 once: the auto peer (15 layers fit) doubles
        # 0:15 (three, not two: placement weighs peers by their measured speed, which varies
        # on a busy machine).
        # One at a time: each measures its speed alone (placement weighs peers by it, and on
        # one 2-core machine peers that load together measure each other's load).
        short = [*join, "--record-ttl", "4"]
        right = LocalSwarm([start_peer(smollm2_dir, Span(15, 30), tmp_path, short) for _ in "abc"])
        swarm.peers += right.peers
        auto = ["--memory-budget", "215", "--cache-memory", "8", "--rebalance-interval", "1"]
        mover = start_peer(smollm2_dir, None, tmp_path, [*join, *auto])
        swarm.peers.append(mover)
        # It doubles 0:15: at once if it saw every record when it chose, else by moving there
        # (from 15:30 the weakest layer's throughput would double: worth a move).
        wait_for_span(lambda: run(span_of(mover)), (0, 15))
        right.stop()  # layers 15:30 are left to nobody once their records expire
        wait_for_span(lambda: run(span_of(mover)), (15, 30))
        config = ClientConfig(bootstrap=(first.multiaddr or "",))
        assert "Paris" in ask_france(smollm2_dir, config)
