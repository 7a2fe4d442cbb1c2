"""WAN discovery: the trio bridge, and DHT nodes on loopback finding, forgetting and refusing peers.

Bridge tests run on asyncio and uvloop alike. DHT nodes run in threads of this process, except
in the five-process test, where each is a `dht_node.py` process that a test can kill or freeze.
Everything listens and dials on 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Coroutine
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio
import trio.testing

from layerswarm.errors import LayerswarmError, PeerUnavailable
from layerswarm.swarm.dht import DhtConfig, DhtNode, key_digest
from layerswarm.swarm.identity import generate_identity
from layerswarm.swarm.kad_service import ProvidePacer
from layerswarm.swarm.trio_bridge import TrioThread, TrioThreadClosed

T = TypeVar("T")

# Short waits: loopback answers in milliseconds, and a dead peer refuses at once.
FAST = DhtConfig(
    connect_timeout=1.0,
    lookup_timeout=3.0,
    fetch_timeout=1.0,
    put_timeout=10.0,
    start_timeout=10.0,
    close_timeout=3.0,
)
MODEL_KEY = "layerswarm/0123abcd"
NODE_SCRIPT = Path(__file__).with_name("dht_node.py")


def _loops() -> list[Any]:
    loops: list[Any] = [pytest.param(asyncio.new_event_loop, id="asyncio")]
    try:
        import uvloop
    except ImportError:
        return loops
    return [*loops, pytest.param(uvloop.new_event_loop, id="uvloop")]


def run(
    coro: Coroutine[Any, Any, T],
    loop_factory: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop,
) -> T:
    """Run `coro` on a fresh loop, bounded so that a hang fails the test instead of CI."""
    loop = loop_factory()
    try:
        return loop.run_until_complete(asyncio.wait_for(coro, 60))
    finally:
        loop.close()


# --- the bridge ------------------------------------------------------------------------------


@pytest.mark.parametrize("loop_factory", _loops())
def test_bridge_returns_results_and_raises_errors(loop_factory: Callable[[], Any]) -> None:
    async def add(a: int, b: int) -> int:
        await trio.sleep(0)
        return a + b

    async def fail() -> None:
        await trio.sleep(0)
        raise KeyError("from trio")

    async def main() -> None:
        bridge = TrioThread()
        bridge.start()
        try:
            assert await bridge.call(add, 2, 3, timeout=5) == 5
            results = await asyncio.gather(*(bridge.call(add, i, i, timeout=5) for i in range(200)))
            assert results == [2 * i for i in range(200)]
            with pytest.raises(KeyError, match="from trio"):
                await bridge.call(fail, timeout=5)
        finally:
            assert await bridge.stop(5)

    run(main(), loop_factory)


@pytest.mark.parametrize("loop_factory", _loops())
def test_bridge_timeout_and_caller_cancel_both_cancel_the_trio_task(
    loop_factory: Callable[[], Any],
) -> None:
    cancelled: list[str] = []

    async def hang(name: str) -> None:
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            cancelled.append(name)
            raise

    async def main() -> None:
        bridge = TrioThread()
        bridge.start()
        try:
            with pytest.raises(TimeoutError):
                await bridge.call(hang, "timeout", timeout=0.05)
            caller = asyncio.ensure_future(bridge.call(hang, "caller", timeout=30))
            await asyncio.sleep(0.05)
            caller.cancel()
            with pytest.raises(asyncio.CancelledError):
                await caller
            for _ in range(100):  # the cancel crosses threads: give it a moment
                if len(cancelled) == 2:
                    break
                await asyncio.sleep(0.01)
            assert sorted(cancelled) == ["caller", "timeout"]
        finally:
            assert await bridge.stop(5)

    run(main(), loop_factory)


def test_bridge_start_task_runs_until_stop_and_refuses_calls_after() -> None:
    events: list[str] = []

    async def service(name: str, *, task_status: Any) -> None:
        task_status.started(f"{name} up")
        try:
            await trio.sleep_forever()
        finally:
            events.append("service cancelled")

    async def broken(*, task_status: Any) -> None:
        await trio.sleep(0)
        raise ValueError("failed before start")

    async def noop() -> None:
        await trio.sleep(0)

    async def main() -> None:
        bridge = TrioThread()
        bridge.start()
        assert await bridge.start_task(service, "svc", timeout=5) == "svc up"
        with pytest.raises(ValueError, match="failed before start"):
            await bridge.start_task(broken, timeout=5)
        await bridge.call(noop, timeout=5)  # a failed start leaves the thread serving
        assert await bridge.stop(5)
        assert events == ["service cancelled"]
        with pytest.raises(TrioThreadClosed):
            await bridge.call(noop, timeout=5)

    run(main())


def test_provide_pacer_keeps_to_its_window() -> None:
    times: list[float] = []

    async def main() -> None:
        pacer = ProvidePacer(count=3, window=10.0)
        for _ in range(7):
            await pacer.wait()
            times.append(trio.current_time())

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    start = times[0]
    assert [t - start for t in times] == [0, 0, 0, 10, 10, 10, 20]


# --- DHT nodes in threads of this process ---------------------------------------------------


def test_key_digest_depends_on_key_and_swarm_key() -> None:
    assert len(key_digest(MODEL_KEY)) == 32
    assert key_digest(MODEL_KEY) != key_digest(MODEL_KEY + "/block/0")
    assert key_digest(MODEL_KEY) != key_digest(MODEL_KEY, bytes(32))
    assert key_digest(MODEL_KEY, bytes(32)) != key_digest(MODEL_KEY, bytes([1]) * 32)


def test_start_rejects_bad_input_and_unreachable_bootstrap() -> None:
    async def main() -> None:
        identity = generate_identity()
        with pytest.raises(ValueError, match="swarm key"):
            await DhtNode.start(identity, swarm_key=b"short", config=FAST)
        with pytest.raises(ValueError, match="bootstrap"):
            await DhtNode.start(identity, bootstrap=["/ip4/127.0.0.1/tcp/1"], config=FAST)
        with pytest.raises(ValueError, match="republish"):
            replace(FAST, republish_interval=60.0, provider_ttl=30.0)
        dead = f"/ip4/127.0.0.1/tcp/{_free_port()}/p2p/{generate_identity().peer_id}"
        with pytest.raises(PeerUnavailable):
            await DhtNode.start(identity, bootstrap=[dead], config=FAST)
        async with await DhtNode.start(generate_identity(), config=FAST) as live:
            impostor = live.multiaddr.replace(live.peer_id, generate_identity().peer_id)
            with pytest.raises(PeerUnavailable):  # noise proves who answers at that address
                await DhtNode.start(identity, bootstrap=[impostor], config=FAST)

    run(main())


def test_records_replace_withdraw_and_are_read_fresh() -> None:
    async def main() -> None:
        identity = generate_identity()
        a = await DhtNode.start(identity, config=FAST)
        b = await DhtNode.start(generate_identity(), bootstrap=[a.multiaddr], config=FAST)
        async with a, b:
            assert a.peer_id == identity.peer_id  # one peer ID on the DHT and the data plane
            assert a.multiaddr == f"/ip4/127.0.0.1/tcp/{a.multiaddr.split('/')[4]}/p2p/{a.peer_id}"
            await a.put_record(MODEL_KEY, b"a1")
            await b.put_record(MODEL_KEY, b"b1")
            assert await b.get_records_by_peer(MODEL_KEY) == {a.peer_id: b"a1", b.peer_id: b"b1"}
            await a.put_record(MODEL_KEY, b"a2")  # a read after a re-put sees the new value
            assert await b.get_records_by_peer(MODEL_KEY) == {a.peer_id: b"a2", b.peer_id: b"b1"}
            await a.remove_record(MODEL_KEY)
            assert await b.get_records(MODEL_KEY) == [b"b1"]
            await a.republish()
            assert await a.get_records(MODEL_KEY + "/block/0") == []
            with pytest.raises(ValueError):
                await a.put_record(MODEL_KEY, b"")
        with pytest.raises(LayerswarmError, match="closed"):
            await a.get_records(MODEL_KEY)

    run(main())


def test_records_live_while_republished_and_expire_after() -> None:
    keeper = replace(FAST, republish_interval=0.2, record_ttl=0.8, provider_ttl=0.8)
    quitter = replace(FAST, republish_interval=0, record_ttl=0.8)

    async def main() -> None:
        a = await DhtNode.start(generate_identity(), config=keeper)
        b = await DhtNode.start(generate_identity(), bootstrap=[a.multiaddr], config=keeper)
        c = await DhtNode.start(generate_identity(), bootstrap=[a.multiaddr], config=quitter)
        async with a, b, c:
            await b.put_record(MODEL_KEY, b"kept")
            await c.put_record(MODEL_KEY, b"once")
            assert sorted(await a.get_records(MODEL_KEY)) == [b"kept", b"once"]
            await asyncio.sleep(1.6)  # twice record_ttl: b re-put its value, c did not
            assert await a.get_records(MODEL_KEY) == [b"kept"]

            async def providers_held_by_a() -> set[str]:
                await trio.sleep(0)
                entries = a._service._require()[1].provider_store.providers
                return set(entries.get(key_digest(MODEL_KEY), {}))

            # c's provider entry went stale at a, and a's maintenance pruned it
            assert await a._bridge.call(providers_held_by_a, timeout=5) == {b.peer_id}

    run(main())


def test_private_swarm_keeps_outsiders_out() -> None:
    key = os.urandom(32)

    async def main() -> None:
        a = await DhtNode.start(generate_identity(), swarm_key=key, config=FAST)
        b = await DhtNode.start(
            generate_identity(), bootstrap=[a.multiaddr], swarm_key=key, config=FAST
        )
        outsider = await DhtNode.start(generate_identity(), config=FAST)
        async with a, b, outsider:
            await a.put_record(MODEL_KEY, b"member")
            await outsider.put_record(MODEL_KEY, b"injected")

            async def cannot_join(swarm_key: bytes | None) -> None:
                with pytest.raises(PeerUnavailable):
                    await DhtNode.start(
                        generate_identity(),
                        bootstrap=[a.multiaddr],
                        swarm_key=swarm_key,
                        config=FAST,
                    )

            async def member_cannot_reach_outsider() -> None:
                with pytest.raises(PeerUnavailable):
                    await DhtNode.start(
                        generate_identity(),
                        bootstrap=[outsider.multiaddr],
                        swarm_key=key,
                        config=FAST,
                    )

            await asyncio.gather(
                cannot_join(None), cannot_join(os.urandom(32)), member_cannot_reach_outsider()
            )
            assert await b.get_records(MODEL_KEY) == [b"member"]
            assert await outsider.get_records(MODEL_KEY) == [b"injected"]  # only its own

    run(main())


# --- five DHT node processes ---------------------------------------------------------------


class NodeProcess:
    """A `dht_node.py` process: one JSON request a line on stdin, one reply a line on stdout."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(NODE_SCRIPT)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.multiaddr = self.peer_id = ""

    def start(self, bootstrap: list[str], config: dict[str, float]) -> str:
        reply = self.request(op="start", bootstrap=bootstrap, config=config)
        self.multiaddr = reply["multiaddr"]
        self.peer_id = self.multiaddr.rsplit("/p2p/", 1)[1]
        return self.multiaddr

    def request(self, **request: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()  # bounded by the test's timeout
        if not line:
            raise RuntimeError(f"node process exited with {self.proc.wait(5)}")
        reply: dict[str, Any] = json.loads(line)
        assert reply["ok"], reply
        return reply

    def get(self, key: str) -> dict[str, bytes]:
        records = self.request(op="get", key=key)["records"]
        return {peer: bytes.fromhex(value) for peer, value in records.items()}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()


@pytest.mark.timeout(120)
def test_five_processes_find_every_value_and_drop_dead_and_frozen_peers() -> None:
    config = {"connect_timeout": 1.0, "lookup_timeout": 3.0, "fetch_timeout": 1.0}
    nodes = [NodeProcess() for _ in range(5)]  # all at once: their imports overlap
    try:
        seed = nodes[0].start([], config)
        for node in nodes[1:]:
            node.start([seed], config)
        for i, node in enumerate(nodes):
            node.request(op="put", key=MODEL_KEY, value=f"value {i}".encode().hex())
            node.request(op="put", key=f"{MODEL_KEY}/block/{i % 2}", value=bytes([i]).hex())
        everyone = {node.peer_id: f"value {i}".encode() for i, node in enumerate(nodes)}
        for node in nodes:
            assert node.get(MODEL_KEY) == everyone
            assert set(node.get(f"{MODEL_KEY}/block/1")) == {nodes[1].peer_id, nodes[3].peer_id}

        dead, frozen, reader = nodes[2], nodes[4], nodes[1]
        dead.stop()  # SIGKILL: its provider records stay in the DHT; its value must not
        del everyone[dead.peer_id]
        for node in (nodes[0], nodes[1], nodes[3], nodes[4]):
            assert node.get(MODEL_KEY) == everyone
        os.kill(frozen.proc.pid, signal.SIGSTOP)  # alive to TCP, silent to every request
        try:
            alive = {peer: v for peer, v in everyone.items() if peer != frozen.peer_id}
            assert reader.get(MODEL_KEY) == alive
        finally:
            os.kill(frozen.proc.pid, signal.SIGCONT)
        assert reader.get(MODEL_KEY) == everyone  # the frozen one answers again
        closing = [node for node in nodes if node is not dead]
        for node in closing:
            node.request(op="close")
        assert [node.proc.wait(10) for node in closing] == [0] * len(closing)
    finally:
        for node in nodes:
            node.stop()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
