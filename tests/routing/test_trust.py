"""Peers that lie, send garbage or make wild claims, against a client that checks them.

Real peer processes of a tiny random model; the misbehaving ones run the test-only fault
injector (`swarm-peer start --test-fault-injector`). Each test first opens its session on the
bad peer alone, then lets the client know honest replicas, so the bad peer is the one in use.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from prometheus_client import REGISTRY

from layerswarm import metrics
from layerswarm.errors import NoRouteError
from layerswarm.peer.launch import PeerProcess, start_peer
from layerswarm.routing.session import RemoteSession
from layerswarm.routing.swarm_client import ClientConfig, SwarmClient
from layerswarm.shards.config import Span

ALL = Span(0, 4)
FAULTS = {
    "liar": "perturb=0.3,seed=1",  # wrong activations on ~30% of steps
    "nan": "nan=1.0",
    "half": "dtype=float16",  # answers in float16 to a float32 client
    "fast": "claim_s_per_layer=inf",
    "other": "model=SomeoneElse@0123456789abcdef",
}


@dataclass
class Swarm:
    honest: list[PeerProcess]  # layers 0:4
    bad: dict[str, PeerProcess]  # layers 0:4
    head_liar: PeerProcess  # layers 0:2, perturbing half its steps
    tail: PeerProcess  # layers 2:4, honest

    def stop(self) -> None:
        for peer in [*self.honest, *self.bad.values(), self.head_liar, self.tail]:
            peer.stop()


@pytest.fixture(scope="module")
def swarm(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swarm]:
    workdir = tmp_path_factory.mktemp("trust")
    specs = [(ALL, ""), (ALL, ""), *((ALL, spec) for spec in FAULTS.values())]
    specs += [(Span(0, 2), "perturb=0.5,seed=2"), (Span(2, 4), "")]
    with ThreadPoolExecutor(len(specs)) as pool:  # every peer loads at once
        started = list(pool.map(lambda s: start(tiny_llama_dir, workdir, *s), specs))
    bad = dict(zip(FAULTS, started[2:-2], strict=True))
    swarm = Swarm(started[:2], bad, started[-2], started[-1])
    try:
        yield swarm
    finally:
        swarm.stop()


def start(model: Path, workdir: Path, span: Span, spec: str) -> PeerProcess:
    return start_peer(model, span, workdir, ["--test-fault-injector", spec] if spec else [])


def honest_outputs(model: Path, swarm: Swarm, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    client = SwarmClient(model, [p.address for p in swarm.honest], ClientConfig(verify_fraction=0))
    try:
        session = RemoteSession(client, 64)
        client.net.run(session.open())
        outs, at = [], 0
        for hidden in inputs:
            outs.append(session.forward(hidden, at))
            at += hidden.shape[1]
        session.close()
        return outs
    finally:
        client.close()


def steps() -> list[torch.Tensor]:
    """A prompt of 6 tokens, then 20 one-token steps (hidden states, fixed)."""
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(1, 6, 64, generator=gen)] + [
        torch.randn(1, 1, 64, generator=gen) for _ in range(20)
    ]


def session_on(client: SwarmClient, bad: PeerProcess, swarm: Swarm) -> RemoteSession:
    """A session whose one hop is `bad`, in a client that then learns of the honest peers."""
    session = RemoteSession(client, 64)
    client.net.run(session.open())
    assert [h.view.peer_id for h in session.hops] == [bad.peer_id]
    client.net.run(client.add_peers([p.address for p in swarm.honest]))
    return session


def mismatch_count() -> float:
    value = REGISTRY.get_sample_value("layerswarm_verifications_total", {"result": "mismatch"})
    return value or 0.0


def test_a_peer_returning_perturbed_activations_is_caught_banned_and_its_steps_redone(
    tiny_llama_dir: Path, swarm: Swarm
) -> None:
    inputs = steps()
    expected = honest_outputs(tiny_llama_dir, swarm, inputs)
    liar = swarm.bad["liar"]
    events: list[str] = []
    mismatches = mismatch_count()
    config = ClientConfig(verify_fraction=1.0)  # every step checked: no wrong output gets out
    client = SwarmClient(tiny_llama_dir, [liar.address], config, on_event=events.append)
    try:
        session = session_on(client, liar, swarm)
        at, caught_at = 0, None
        for n, (hidden, want) in enumerate(zip(inputs, expected, strict=True)):
            got = session.forward(hidden, at)
            at += hidden.shape[1]
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
            if caught_at is None and liar.peer_id in client.trust.liars:
                caught_at = n
        assert caught_at is not None and caught_at <= 4, caught_at
        assert liar.peer_id not in [h.view.peer_id for h in session.hops]
        [record] = client.trust.records()
        assert record.peer_id == liar.peer_id and "differs from 2 replicas" in record.reason
        assert record.evidence["layers"] == "0:4"
        assert set(record.evidence["agreeing"]) == {p.peer_id for p in swarm.honest}  # type: ignore[arg-type]
        assert record.evidence["relative_error"] > record.evidence["tolerance"]  # type: ignore[operator]
        assert any("banned peer" in e and "lying" in e for e in events)
        shown = [e.text for e in metrics.EVENTS.recent() if e.kind == "ban"]  # the dashboard's
        assert any(liar.peer_id in text and "for lying" in text for text in shown)
        assert client.verify_counts["mismatch"] >= 1 and client.verify_counts["match"] >= 1
        # The same, for /metrics and the dashboard: counted, and the ban shown with its reason.
        assert mismatch_count() > mismatches
        assert any(e.kind == "ban" and liar.peer_id in e.text for e in metrics.EVENTS.recent())
        # Banned for good: a new session never uses it, even with every other peer banned.
        for peer in swarm.honest:
            client.bans.ban(peer.peer_id)
        again = RemoteSession(client, 64)
        client.net.run(again.open())
        assert liar.peer_id not in [h.view.peer_id for h in again.hops]
        again.close()
        session.close()
    finally:
        client.close()


def test_a_liar_on_a_pushed_path_is_caught_on_the_steps_relayed_to_check_it(
    tiny_llama_dir: Path, swarm: Swarm
) -> None:
    """Push (the default) sends a step down the hops without the client: a step chosen for a
    check goes hop by hop instead, so the liar on the first of two hops is caught too."""
    inputs = steps()
    expected = honest_outputs(tiny_llama_dir, swarm, inputs)
    liar = swarm.head_liar
    config = ClientConfig(verify_fraction=1.0)
    assert config.push
    client = SwarmClient(tiny_llama_dir, [liar.address, swarm.tail.address], config)
    try:
        session = RemoteSession(client, 64)
        client.net.run(session.open())
        assert [h.view.peer_id for h in session.hops] == [liar.peer_id, swarm.tail.peer_id]
        client.net.run(client.add_peers([p.address for p in swarm.honest]))
        at = 0
        for hidden, want in zip(inputs, expected, strict=True):
            torch.testing.assert_close(session.forward(hidden, at), want, rtol=1e-4, atol=1e-4)
            at += hidden.shape[1]
        assert liar.peer_id in client.trust.liars
        [record] = client.trust.records()
        assert record.evidence["layers"] == "0:2"
        session.close()
    finally:
        client.close()


def test_a_client_holding_the_weights_checks_a_lone_peer_itself(
    tiny_llama_dir: Path, swarm: Swarm
) -> None:
    """No replica to compare with: the client computes the span itself, catches the liar, and
    says no honest peer serves those layers rather than pass a wrong output on."""
    liar = swarm.bad["liar"]
    config = ClientConfig(verify_fraction=1.0, verify_locally=True, route_wait=0.5)
    client = SwarmClient(tiny_llama_dir, [liar.address], config)
    try:
        session = RemoteSession(client, 64)
        client.net.run(session.open())
        with pytest.raises(NoRouteError, match="1 peer serving them banned for lying"):
            for n, hidden in enumerate(steps()[1:] * 2):  # one-token steps until it lies
                session.forward(hidden, n)
        [record] = client.trust.records()
        assert record.peer_id == liar.peer_id
        assert "this client's own computation" in record.reason
        client.net.run(client.add_peers([swarm.honest[0].address]))
        again = RemoteSession(client, 64)
        client.net.run(again.open())
        assert [h.view.peer_id for h in again.hops] == [swarm.honest[0].peer_id]
        again.close()
    finally:
        client.close()


@pytest.mark.parametrize(("fault", "blame"), [("nan", "non-finite"), ("half", "torch.float16")])
def test_a_garbage_reply_is_blamed_on_its_sender_and_the_step_redone(
    tiny_llama_dir: Path, swarm: Swarm, fault: str, blame: str, caplog: pytest.LogCaptureFixture
) -> None:
    inputs = steps()[:4]
    expected = honest_outputs(tiny_llama_dir, swarm, inputs)
    bad = swarm.bad[fault]
    client = SwarmClient(tiny_llama_dir, [bad.address], ClientConfig(verify_fraction=0))
    try:
        session = session_on(client, bad, swarm)
        at = 0
        with caplog.at_level(logging.DEBUG, logger="layerswarm.routing"):  # the ban's line
            for hidden, want in zip(inputs, expected, strict=True):
                got = session.forward(hidden, at)
                at += hidden.shape[1]
                assert got.dtype == torch.float32
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        assert bad.peer_id in client.bans.banned()  # the sender, not the next honest peer
        assert not client.bans.banned() & {p.peer_id for p in swarm.honest}
        assert any(
            blame in r.getMessage() and bad.peer_id in r.getMessage() for r in caplog.records
        )
        session.close()
    finally:
        client.close()


def test_an_inf_speed_claim_and_a_lying_info_reply_leave_discovery_working(
    tiny_llama_dir: Path, swarm: Swarm, caplog: pytest.LogCaptureFixture
) -> None:
    fast, other = swarm.bad["fast"], swarm.bad["other"]
    addresses = [fast.address, other.address, *(p.address for p in swarm.honest)]
    with caplog.at_level(logging.WARNING, logger="layerswarm.routing.swarm_client"):
        client = SwarmClient(tiny_llama_dir, addresses, ClientConfig(verify_fraction=0))
    try:
        usable = {v.peer_id for v in client.views()}
        assert usable == {p.peer_id for p in swarm.honest}
        skipped = " ".join(r.getMessage() for r in caplog.records)
        assert "serves another model" in skipped  # the lying InfoReply
        assert "not a finite number" in skipped  # the inf claim: its peer cannot even send it
        session = RemoteSession(client, 64)
        client.net.run(session.open())
        assert session.forward(torch.randn(1, 3, 64), 0).shape == (1, 3, 64)
        session.close()
    finally:
        client.close()
