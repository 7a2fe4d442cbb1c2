"""A small internet in network namespaces: a public network, and homes behind NAT routers.

    with nat_world(homes=2) as world:
        world.public.address          # "10.99.0.1": in the public namespace, the internet
        world.homes[0].address        # "10.101.0.2": a host at home, behind its router
        world.homes[0].wan            # "10.99.0.11": its router's address on the internet
        run_in_netns(world.homes[0].name, [...])

Each router namespace forwards between its home (`lan0`) and the public network (`wan0`, a
port of a bridge in the public namespace) and masquerades what leaves `wan0` with nftables:
outbound connections work, inbound ones to the home are refused, as behind a home router.
`random_ports=True` makes it `masquerade random` (a port-randomizing NAT). Every namespace is
deleted on the way out. Needs root, iproute2 and nft: `nat_unavailable()` says why not.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field

from netns import COMMAND_TIMEOUT, VETH_PREFIX, netns_unavailable

PUBLIC_NET = "10.99.0"  # /24: the "internet"; the public namespace is .1, router i is .11+i
_counter = itertools.count()


@dataclass(frozen=True)
class Home:
    name: str  # the home host's namespace
    address: str  # its address on the home LAN
    router: str  # the router's namespace
    wan: str  # the router's public address (what others see the home as)


@dataclass
class World:
    public_name: str  # the public namespace
    public_address: str
    homes: list[Home] = field(default_factory=list)

    @property
    def public(self) -> Home:
        """The public namespace, as a Home whose router is itself (for uniform code)."""
        return Home(self.public_name, self.public_address, self.public_name, self.public_address)


def nat_unavailable() -> str | None:
    """Why a NAT world cannot be built here, or None if it can."""
    why = netns_unavailable()
    if why is not None:
        return why
    if shutil.which("nft") is None:
        return "NAT tests need nftables' `nft` (apt-get install nftables)"
    return None


def sh(ns: str, *args: str) -> None:
    subprocess.run(
        ["ip", "netns", "exec", ns, *args], check=True, capture_output=True, timeout=COMMAND_TIMEOUT
    )


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=COMMAND_TIMEOUT)


@contextlib.contextmanager
def nat_world(homes: int = 2, random_ports: bool = False) -> Iterator[World]:
    """The public namespace and `homes` homes, each behind its own masquerading router."""
    tag = f"{os.getpid() % 100000}n{next(_counter)}"
    created: list[str] = []

    def netns(name: str) -> str:
        _ip("netns", "add", name)
        created.append(name)
        _ip("-n", name, "link", "set", "lo", "up")
        return name

    try:
        public = netns(f"lsnat-{tag}-pub")
        world = World(public, f"{PUBLIC_NET}.1")
        _ip("-n", public, "link", "add", "br0", "type", "bridge")
        _ip("-n", public, "addr", "add", f"{world.public_address}/24", "dev", "br0")
        _ip("-n", public, "link", "set", "br0", "up")
        for i in range(homes):
            router, home = netns(f"lsnat-{tag}-r{i}"), netns(f"lsnat-{tag}-h{i}")
            wan, lan = f"{PUBLIC_NET}.{11 + i}", f"10.{101 + i}.0"
            up, down = f"{VETH_PREFIX}{tag}w{i}", f"{VETH_PREFIX}{tag}l{i}"
            _ip("link", "add", "wan0", "netns", router, "type", "veth", "peer", "name", up,
                "netns", public)  # fmt: skip
            _ip("-n", public, "link", "set", up, "master", "br0", "up")
            _ip("-n", router, "addr", "add", f"{wan}/24", "dev", "wan0")
            _ip("-n", router, "link", "set", "wan0", "up")
            _ip("link", "add", "lan0", "netns", router, "type", "veth", "peer", "name", down,
                "netns", home)  # fmt: skip
            _ip("-n", router, "addr", "add", f"{lan}.1/24", "dev", "lan0")
            _ip("-n", router, "link", "set", "lan0", "up")
            _ip("-n", home, "addr", "add", f"{lan}.2/24", "dev", down)
            _ip("-n", home, "link", "set", down, "up")
            _ip("-n", home, "route", "add", "default", "via", f"{lan}.1")
            sh(router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            masquerade = "masquerade random" if random_ports else "masquerade"
            rules = (
                "table ip nat {\n chain post {\n  type nat hook postrouting priority 100;\n"
                f'  oifname "wan0" {masquerade}\n }}\n}}\n'
                "table ip filter {\n chain forwarding {\n  type filter hook forward priority 0;\n"
                "  policy drop;\n"
                '  iifname "lan0" accept\n'
                "  ct state established,related accept\n }\n}\n"
            )
            subprocess.run(
                ["ip", "netns", "exec", router, "nft", "-f", "-"],
                input=rules.encode(),
                check=True,
                capture_output=True,
                timeout=COMMAND_TIMEOUT,
            )
            world.homes.append(Home(home, f"{lan}.2", router, wan))
        yield world
    finally:
        for name in reversed(created):
            with contextlib.suppress(subprocess.CalledProcessError, subprocess.TimeoutExpired):
                _ip("netns", "delete", name)
