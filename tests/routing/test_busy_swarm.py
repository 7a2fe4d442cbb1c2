"""Full and busy peers are not failed peers: the router waits or moves, never bans, and leaves
nothing behind. Real peer processes of a tiny random model, driven through `RemoteSession`."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from layerswarm.errors import RemoteError
from layerswarm.peer.launch import start_peer
from layerswarm.routing.paths import BanList
from layerswarm.routing.session import RemoteSession
from layerswarm.routing.swarm_client import SwarmClient
from layerswarm.shards.config import Span
from layerswarm.swarm.protocol import ErrorCode, InfoReply, InfoRequest, OpenSession, Step

# 0.0625 MiB holds 128 tokens of 2 tiny layers: 8 pages of 16.
SMALL_CACHE = ["--cache-memory", "0.0625", "--admission-timeout", "0.3"]


def active_sessions(client: SwarmClient, peer_id: str) -> int:
    info = client.net.run(client.connection(peer_id).request(InfoRequest()))
    assert isinstance(info, InfoReply)
    return info.active_sessions


def test_a_full_peer_is_waited_for_and_a_retried_open_leaves_nothing_behind(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    first = start_peer(tiny_llama_dir, Span(0, 2), tmp_path)
    second = start_peer(tiny_llama_dir, Span(2, 4), tmp_path, SMALL_CACHE)
    addresses = [first.address, second.address]
    events: list[str] = []
    hog = SwarmClient(tiny_llama_dir, addresses)
    waiter = SwarmClient(tiny_llama_dir, addresses, on_event=events.append)
    try:
        held = RemoteSession(hog, 128)
        hog.net.run(held.open())
        held.forward(torch.randn(1, 128, 64), 0)  # all 8 of the second peer's pages

        opened = RemoteSession(waiter, 64)
        worker = threading.Thread(target=lambda: waiter.net.run(opened.open()))
        worker.start()
        deadline = time.monotonic() + 60
        while not any("full: waiting for room" in e for e in events):
            assert time.monotonic() < deadline, "the second peer never said it was full"
            time.sleep(0.02)
        assert worker.is_alive()  # waiting for room, not failed
        held.close()  # room again
        worker.join(timeout=60)
        assert [h.span for h in opened.hops] == [Span(0, 2), Span(2, 4)]
        assert waiter.bans.banned() == set()  # full is not broken
        # The first peer holds exactly the waiter's session: each attempt opened one under a new
        # ID (reusing one would have been refused), and the abandoned ones were closed.
        assert active_sessions(waiter, first.peer_id) == 1
        out = opened.forward(torch.randn(1, 4, 64), 0)
        assert out.shape == (1, 4, 64)
    finally:
        for client in (hog, waiter):
            client.close()
        first.stop()
        second.stop()


def test_an_error_reply_to_an_expired_request_does_not_poison_the_connection(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    peer = start_peer(tiny_llama_dir, Span(0, 2), tmp_path, SMALL_CACHE)
    client = SwarmClient(tiny_llama_dir, [peer.address])
    try:
        conn = client.connection(peer.peer_id)
        client.net.run(conn.request(OpenSession("hog", 0, 2, 128)))
        client.net.run(conn.request(Step("hog", torch.randn(1, 128, 64), 0)))  # every page
        # The open waits 0.3 s for room, then the peer answers cache_full: after this side
        # gave up on it (0.05 s).
        with pytest.raises(Exception, match="no reply"):
            client.net.run(conn.request(OpenSession("late", 0, 2, 16), 0.05))
        time.sleep(0.6)  # the late error reply arrives
        assert not conn.closed
        info = client.net.run(conn.request(InfoRequest()))
        assert isinstance(info, InfoReply)
        with pytest.raises(RemoteError) as e:
            client.net.run(conn.request(OpenSession("again", 0, 2, 16), 5.0))
        assert e.value.code == ErrorCode.CACHE_FULL
    finally:
        client.close()
        peer.stop()


@pytest.mark.parametrize(
    ("events", "strikes_after"),
    [
        (["fail"], 1),
        (["fail", "fail", "fail"], 1),  # one failure seen by three sessions while banned
        (["fail", "wait", "fail"], 2),  # failed again after its ban ran out
        (["fail", "wait", "fail", "ok", "fail"], 1),  # success forgives
    ],
)
def test_strikes_count_failures_not_the_sessions_that_saw_one(
    events: list[str], strikes_after: int
) -> None:
    bans = BanList(base_seconds=1.0, max_seconds=8.0)
    now = 0.0
    for event in events:
        if event == "fail":
            bans.ban("p", now)
        elif event == "wait":
            now += 100.0
        else:
            bans.succeeded("p")
    seconds = bans.ban("q", now)  # a fresh peer for comparison: its first ban
    assert seconds == 1.0
    assert bans._strikes["p"] == strikes_after


def test_bans_have_a_bounded_maximum() -> None:
    bans = BanList(base_seconds=1.0, max_seconds=8.0)
    now = 0.0
    lengths = []
    for _ in range(10):
        lengths.append(bans.ban("p", now))
        now += 100.0
    assert lengths[:4] == [1.0, 2.0, 4.0, 8.0] and max(lengths) == 8.0


def test_a_connection_that_gets_replaced_is_closed(tiny_llama_dir: Path, tmp_path: Path) -> None:
    peer = start_peer(tiny_llama_dir, Span(0, 2), tmp_path)
    client = SwarmClient(tiny_llama_dir, [peer.address])
    try:
        old = client.connection(peer.peer_id)
        # As if the peer had said Goodbye (the callback the transport calls then), while its
        # socket stays open: the next refresh dials it anew and must close the old connection.
        client._goodbye(old, "a test says so")
        client.net.run(client.refresh())
        new = client.connection(peer.peer_id)
        assert new is not old
        assert old.closed
        info = client.net.run(new.request(InfoRequest()))
        assert isinstance(info, InfoReply)
    finally:
        client.close()
        peer.stop()
