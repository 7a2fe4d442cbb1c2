"""Across real NAT: namespaces for the internet and for homes behind masquerading routers
(`nat_world.py`), with `nat_agent.py` peers (the swarm layer, no model) in them.

A peer at home learns it is behind NAT (its router's address is what others see), holds a
reservation on a public relay, and a peer in another home reaches it through that relay, while
dialing it directly gets no answer; the two homes then punch a direct connection where the NAT
keeps ports, and stay relayed where it does not; a public peer learns that it is reachable.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/ is no package: reach netns.py beside us
from nat_world import World, mapped_ports, nat_unavailable, nat_world, upnp_unavailable
from netns import run_in_netns

AGENT = Path(__file__).with_name("nat_agent.py")
WAIT = 60.0  # s: for an agent's line; a hung agent fails the test instead of hanging it

pytestmark = pytest.mark.skipif(nat_unavailable() is not None, reason=str(nat_unavailable()))


@contextmanager
def agent(ns: str, *args: str) -> Iterator[tuple[subprocess.Popen[str], dict[str, Any]]]:
    """A `nat_agent.py serve` in `ns`; yields the process and its first JSON line."""
    proc = run_in_netns(
        ns,
        [sys.executable, str(AGENT), "serve", *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield proc, _line(proc)
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def _line(proc: subprocess.Popen[str]) -> dict[str, Any]:
    assert proc.stdout is not None and proc.stderr is not None
    import select

    ready, _, _ = select.select([proc.stdout], [], [], WAIT)
    line = proc.stdout.readline() if ready else ""
    if not line:
        proc.kill()
        raise AssertionError(f"agent gave no line; its log ends:\n{proc.stderr.read()[-3000:]}")
    info: dict[str, Any] = json.loads(line)
    return info


def dial(ns: str, address: str, *args: str) -> dict[str, Any]:
    out = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, str(AGENT), "dial", address, *args],
        capture_output=True,
        text=True,
        timeout=WAIT,
    )
    assert out.stdout, out.stderr[-3000:]
    reply: dict[str, Any] = json.loads(out.stdout.splitlines()[-1])
    return reply


def relayed(addresses: Sequence[str]) -> list[str]:
    return [a for a in addresses if "/p2p-circuit" in a]


@pytest.fixture(scope="module", params=["masquerade", "masquerade random"])
def world(request: pytest.FixtureRequest) -> Iterator[World]:
    """Homes behind endpoint-independent NAT (Linux keeps source ports), then behind a
    port-randomizing one (where hole punching could not work; a relay still does)."""
    with nat_world(homes=2, random_ports=request.param != "masquerade") as w:
        yield w


def test_home_peer_behind_nat_is_reached_through_a_relay_and_not_directly(world: World) -> None:
    pub, home_a, home_b = world.public, world.homes[0], world.homes[1]
    with agent(pub.name, pub.address, "--relay", "on") as (relay_proc, relay):
        with agent(home_a.name, home_a.address, "--reach-peer", relay["address"]) as (_, a):
            assert a["status"] == "relayed", a
            assert a["observed"] == home_a.wan  # its router's address, as the relay saw it
            circuit = relayed(a["addresses"])
            assert circuit and a["addresses"][0] == circuit[0]
            assert circuit[0].startswith(f"{pub.address}:{relay['relay_port']}/")
            # Directly, at the address the relay saw it at: the router refuses.
            port = a["address"].split("/")[0].rpartition(":")[2]
            direct = dial(home_b.name, f"{home_a.wan}:{port}/{a['peer_id']}")
            assert not direct["ok"] and "PeerUnavailable" in direct["error"], direct
            # Through the relay, from another home: TLS end to end proves home A's ID.
            through = dial(home_b.name, f"{circuit[0]}/{a['peer_id']}")
            assert through["ok"] and through["peer_id"] == a["peer_id"], through
        assert relay_proc.stdin is not None
        relay_proc.stdin.close()
        summary = _line(relay_proc)
        assert summary["relay"]["circuits"] >= 1 and summary["relay"]["bytes_relayed"] > 0


# info requests over the dialed connection: 49.6 KB through the relay with control, measured
# behind masquerade random; 4.3 KB (control only) punched behind masquerade
REQUESTS = 100


def test_two_homes_hole_punch_where_the_nat_keeps_ports_and_stay_relayed_where_not(
    world: World,
) -> None:
    """A peer in home B dials home A through the relay, then punches (`swarm/punch.py`).
    Behind endpoint-independent NAT the direct connection replaces the relayed one: it goes
    to home A's router, and the relay carries only the control traffic (TLS, Hello, the
    punch), not the requests. Behind `masquerade random` the punch times out: the same
    requests pass through the relay, and every answer still comes."""
    pub, home_a, home_b = world.public, world.homes[0], world.homes[1]
    with agent(pub.name, pub.address, "--relay", "on") as (relay_proc, relay):
        with agent(home_a.name, home_a.address, "--reach-peer", relay["address"]) as (a_proc, a):
            (circuit, *_) = relayed(a["addresses"])
            got = dial(home_b.name, f"{circuit}/{a['peer_id']}", "--punch", "--requests",
                       str(REQUESTS))  # fmt: skip
            assert got["ok"] and got["peer_id"] == a["peer_id"], got
            assert a_proc.stdin is not None
            a_proc.stdin.close()
            punches = _line(a_proc)
        assert relay_proc.stdin is not None
        relay_proc.stdin.close()
        carried = _line(relay_proc)["relay"]["bytes_relayed"]
    if world.random_ports:
        assert "/p2p-circuit" in got["via"] and punches.get("punch_failed") == 1, punches
        assert carried > REQUESTS * 300  # every request and its answer crossed the relay
    else:
        assert got["via"].startswith(f"{home_a.wan}:"), got  # home A's router, directly
        assert punches.get("punched") == 1, punches
        assert carried < 10_000, carried  # TLS handshake, Hellos, HolePunch and Sync only


def test_public_peer_learns_it_is_reachable_and_becomes_a_relay() -> None:
    with nat_world(homes=1) as world:
        _public_peer_learns_it_is_reachable(world)


def _public_peer_learns_it_is_reachable(world: World) -> None:
    pub, home_a = world.public, world.homes[0]
    with agent(pub.name, pub.address, "--relay", "off") as (_, first):
        assert first["status"] == "unknown" and first["relay_port"] == 0  # nobody to ask
        with agent(pub.name, pub.address, "--reach-peer", first["address"]) as (_, second):
            assert second["status"] == "public", second
            assert second["relay_port"] > 0  # auto: public peers relay
            assert second["addresses"][0] == second["address"].split("/")[0]
            # A home peer asking a peer that relays not: behind NAT, with no relay to use.
            with agent(home_a.name, home_a.address, "--reach-peer", first["address"]) as (_, a):
                assert a["status"] == "private" and not relayed(a["addresses"]), a


@pytest.mark.skipif(upnp_unavailable() is not None, reason=str(upnp_unavailable()))
@pytest.mark.parametrize("protocol", ["UPnP-IGD", "NAT-PMP"])
def test_upnp_maps_a_port_the_peer_is_then_dialed_directly_and_sigterm_removes_it(
    tmp_path: Path, protocol: str
) -> None:
    """`--upnp` against miniupnpd in the router: over UPnP-IGD, and over NAT-PMP (RFC 6886)
    where the router answers no IGD discovery."""
    natpmp_only = protocol == "NAT-PMP"
    with nat_world(homes=2, upnp=True, workdir=str(tmp_path), natpmp_only=natpmp_only) as world:
        pub, home_a, home_b = world.public, world.homes[0], world.homes[1]
        with agent(pub.name, pub.address, "--relay", "on") as (_, relay):
            args = ("--reach-peer", relay["address"], "--upnp")
            with agent(home_a.name, home_a.address, *args) as (proc, a):
                assert a["mapped"] is not None and a["mapped"].startswith(f"{home_a.wan}:"), a
                assert a["mapped_by"] == protocol, a
                assert a["status"] == "public" and a["addresses"][0] == a["mapped"], a
                assert not relayed(a["addresses"])  # public: no reservation needed
                assert len(mapped_ports(home_a.router)) == 1
                direct = dial(home_b.name, f"{a['mapped']}/{a['peer_id']}")
                assert direct["ok"] and direct["peer_id"] == a["peer_id"], direct
                proc.send_signal(signal.SIGTERM)
                proc.wait(30)
                assert proc.returncode == 0
            assert mapped_ports(home_a.router) == []
