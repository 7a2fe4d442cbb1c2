"""SmolLM2 served across real NAT: a public peer (DHT bootstrap and relay), peers at home
behind masquerading routers, and a client in another home; the reply is the local engine's,
with the home peers punched direct where the NAT keeps ports, and relayed where it does not.

Namespaces and routers come from `tests/swarm/nat_world.py`; peers are `swarm-peer start`
processes inside them, the client is `nat_client.py` inside its home.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "swarm"))  # tests/ is no package
from nat_world import World, nat_unavailable, nat_world

from layerswarm.peer.server import READY_PREFIX
from layerswarm.routing.local import open_local_generator
from layerswarm.routing.sampling import SamplingConfig

CLIENT = Path(__file__).with_name("nat_client.py")
QUESTION = "What is the capital of France?"
TOKENS = 12
READY = 240.0  # s: for a peer to load and announce on a loaded 2-core machine
pytestmark = pytest.mark.skipif(nat_unavailable() is not None, reason=str(nat_unavailable()))


class NsPeer:
    """A `swarm-peer start` process in a namespace, and what its ready line said."""

    def __init__(self, ns: str, host: str, model: Path, layers: str, work: Path, *args: str):
        self.log = work / f"peer-{layers.replace(':', '-')}-{time.monotonic_ns()}.log"
        cmd = [
            "ip", "netns", "exec", ns, sys.executable, "-m", "layerswarm.cli.peer", "start",
            "--model", str(model), "--layers", layers, "--host", host, "--port", "0",
            "--key", str(self.log.with_suffix(".key")), "--mdns-interface", "none",
            "--cache-memory", "16", *args,
        ]  # fmt: skip
        with open(self.log, "w") as err:
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            self.proc = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env
            )
        self.info = self._ready()

    def _ready(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + READY
        while time.monotonic() < deadline and self.proc.poll() is None:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.5)
            if ready:
                line = self.proc.stdout.readline()
                if line.startswith(READY_PREFIX):
                    info: dict[str, Any] = json.loads(line[len(READY_PREFIX) :])
                    return info
        self.stop(signal.SIGKILL)
        raise AssertionError(f"peer did not start; its log ends:\n{self.log.read_text()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def log_has(self, text: str) -> bool:
        return text in self.log.read_text()


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    """Three homes behind endpoint-independent NAT (Linux masquerade keeps source ports)."""
    with nat_world(homes=3) as w:
        yield w


@pytest.fixture(scope="module")
def random_world() -> Iterator[World]:
    """Two homes behind port-randomizing NAT (`masquerade random`): no punch crosses it."""
    with nat_world(homes=2, random_ports=True) as w:
        yield w


def chat_from(world_ns: str, model: Path, bootstrap: str) -> dict[str, Any]:
    out = subprocess.run(
        ["ip", "netns", "exec", world_ns, sys.executable, str(CLIENT), str(model), bootstrap,
         QUESTION, str(TOKENS)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    ours = "\n".join(line for line in out.stderr.splitlines() if "libp2p" not in line)
    assert out.returncode == 0 and out.stdout, ours[-4000:]
    reply: dict[str, Any] = json.loads(out.stdout.splitlines()[-1])
    return reply


SEEN = """
import asyncio, sys, time
from layerswarm.swarm.dht import DhtNode
from layerswarm.swarm.discovery import DhtLookup, dht_key
from layerswarm.swarm.identity import generate_identity
from layerswarm.shards.weights import model_fingerprint

async def main(host, bootstrap, model, want, relayed=""):
    node = await DhtNode.start(generate_identity(), host, 0, bootstrap.split(","), None)
    holder, _, count = relayed.partition("=")
    lookup = DhtLookup(lambda: node.get_records(dht_key(model_fingerprint(model))))
    deadline = time.monotonic() + 180  # a loaded host: announcements run late
    try:
        while time.monotonic() < deadline:
            await lookup.refresh()
            records = {r.peer_id: r for r in lookup.records()}
            held = records[holder].addresses if holder in records else ()
            circuits = [a for a in held if "p2p-circuit" in a]
            if set(records) >= set(want.split(",")) and len(circuits) >= int(count or 0):
                print("seen")
                return
            await asyncio.sleep(1)
    finally:
        await node.close()

asyncio.run(main(*sys.argv[1:6]))
"""


def wait_seen(
    ns: str, host: str, bootstrap: str, model: Path, peer_ids: Sequence[str], relayed: str = ""
) -> None:
    """Read the DHT from `ns` until every peer's record is there (a relay carries a NAT'd
    peer's record once its next announcement runs); `relayed` "PEERID=N": until that peer's
    record lists N relayed addresses."""
    out = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-c", SEEN, host, bootstrap, str(model),
         ",".join(peer_ids), relayed],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert "seen" in out.stdout, out.stderr[-3000:]


def relayed(addresses: Sequence[str]) -> list[str]:
    return [a for a in addresses if "/p2p-circuit" in a]


CONTROL_BYTES = 12_000  # bytes a relayed connection carries before its punch: TLS, Hellos, punch


@pytest.mark.xfail(
    strict=False,
    reason="flaky inside the full suite on a loaded 2-core host (2 of 3 full runs on "
    "2026-12-04; passes alone): the DHT does not show every record in time; see the closing "
    "note of 2026-12-04",
)
def test_home_peers_punch_direct_and_the_reply_leaves_the_relay_but_for_control_traffic(
    world: World, smollm2_dir: Path, tmp_path: Path
) -> None:
    """A public peer (DHT, relay, layers 0:10), two peers in two homes (10:20, 20:30), and a
    client in a third home. Every connection to a home peer opens through the relay and is
    punched direct: the client's, the public peer's push to the first home and that home's
    push to the second. The reply is the local engine's, and the relay carried only what each
    connection sent before its punch, none of the hidden states."""
    local = open_local_generator(smollm2_dir)
    greedy = SamplingConfig(max_new_tokens=TOKENS, temperature=0.0)
    expected = "".join(local.chat([{"role": "user", "content": QUESTION}], greedy))
    pub, home_a, home_b, home_c = world.public, *world.homes
    peers: list[NsPeer] = []
    try:
        public = NsPeer(pub.name, pub.address, smollm2_dir, "0:10", tmp_path, "--dht",
                        "--relay", "on")  # fmt: skip
        peers.append(public)
        join = ["--bootstrap", public.info["multiaddr"]]
        for home, layers in ((home_a, "10:20"), (home_b, "20:30")):
            peers.append(NsPeer(home.name, home.address, smollm2_dir, layers, tmp_path, *join))
        ids = [p.info["peer_id"] for p in peers]
        bootstrap = public.info["multiaddr"]
        wait_seen(home_c.name, home_c.address, bootstrap, smollm2_dir, ids)
        got = chat_from(home_c.name, smollm2_dir, bootstrap)
    finally:
        for p in reversed(peers):
            p.stop()
    assert got["reply"] == expected
    for home_peer in peers[1:]:
        (link,) = [a for a in got["links"] if a.endswith(home_peer.info["peer_id"])]
        assert relayed([link]), got["links"]  # its record's address: the relay's
        assert got["reach"][home_peer.info["peer_id"]] == "punched", got["reach"]
    nat = got["nat"]
    relay = nat[ids[0]]["relay"]
    # the client's two, the public peer's push to home A and home A's push to home B
    assert nat[ids[1]].get("punched", 0) >= 2 and nat[ids[2]].get("punched", 0) >= 2, nat
    assert relay["bytes_relayed"] < CONTROL_BYTES * relay["circuits"], relay


def test_a_relay_killed_mid_reply_leaves_the_reply_identical_through_the_other_relay(
    random_world: World, smollm2_dir: Path, tmp_path: Path
) -> None:
    """Behind port-randomizing NAT, where no punch crosses and relays carry the reply: two
    public peers, each a relay serving 0:15; a home peer serving 15:30 holds a reservation on
    both. The client in another home pauses after its first token, the relay its link to the
    home peer goes through is SIGKILLed, and the reply goes on: the home peer through its
    record's other relayed address, layers 0:15 on the surviving public peer."""
    world = random_world
    local = open_local_generator(smollm2_dir)
    greedy = SamplingConfig(max_new_tokens=TOKENS, temperature=0.0)
    expected = "".join(local.chat([{"role": "user", "content": QUESTION}], greedy))
    pub, home_a, home_b = world.public, world.homes[0], world.homes[1]
    peers: list[NsPeer] = []
    client: subprocess.Popen[str] | None = None
    try:
        first = NsPeer(
            pub.name, pub.address, smollm2_dir, "0:15", tmp_path, "--dht", "--relay", "on"
        )
        peers.append(first)
        boot = ["--bootstrap", first.info["multiaddr"]]
        peers.append(
            NsPeer(pub.name, pub.address, smollm2_dir, "0:15", tmp_path, *boot, "--relay", "on")
        )
        relays = {p.info["peer_id"]: p for p in peers}
        reserve = [arg for p in peers for arg in ("--reserve-on", p.info["address"])]
        home = NsPeer(home_a.name, home_a.address, smollm2_dir, "15:30", tmp_path, *boot, *reserve)
        peers.append(home)
        bootstraps = ",".join(p.info["multiaddr"] for p in relays.values())
        ids = [p.info["peer_id"] for p in peers]
        wait_seen(home_b.name, home_b.address, bootstraps, smollm2_dir, ids, f"{ids[2]}=2")
        client_log = tmp_path / "client.log"
        with open(client_log, "w") as err:  # a file: a full stderr pipe would stall the client
            client = subprocess.Popen(
                ["ip", "netns", "exec", home_b.name, sys.executable, str(CLIENT),
                 str(smollm2_dir), bootstraps, QUESTION, str(TOKENS), "pause"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True,
            )  # fmt: skip
        assert client.stdin is not None and client.stdout is not None
        paused = json.loads(client.stdout.readline() or "{}")
        (via,) = [a for a in paused.get("links", []) if a.endswith(home.info["peer_id"])] or [""]
        assert "/p2p-circuit/" in via, (paused, client_log.read_text()[-3000:])
        killed = relays[via.split("/")[1]]
        killed.stop(signal.SIGKILL)
        client.stdin.write("go\n")
        client.stdin.flush()
        out, _ = client.communicate(timeout=300)
        assert client.returncode == 0, client_log.read_text()[-4000:]
        got = json.loads(out.splitlines()[-1])
        assert got["reply"] == expected and expected.startswith(paused["first"])
        (now,) = [a for a in got["links"] if a.endswith(home.info["peer_id"])]
        assert "/p2p-circuit/" in now and killed.info["peer_id"] not in now, got["links"]
        assert got["reach"][home.info["peer_id"]] == "relayed", got["reach"]  # the punch failed
    finally:
        try:
            if client is not None:
                if client.poll() is None:
                    client.kill()
                client.wait()
                for stream in (client.stdin, client.stdout):
                    if stream is not None and not stream.closed:
                        stream.close()
        finally:
            for p in reversed(peers):
                p.stop()
