"""A small internet in network namespaces: a public network, and homes behind NAT routers.

    with nat_world(homes=2) as world:
        world.public.address          # "10.99.0.1": in the public namespace, the internet
        world.homes[0].address        # "10.101.0.2": a host at home, behind its router
        world.homes[0].wan            # "10.99.0.11": its router's address on the internet
        run_in_netns(world.homes[0].name, [...])

Each router namespace forwards between its home (`lan0`) and the public network (`wan0`, a
port of a bridge in the public namespace) and masquerades what leaves `wan0` with nftables:
outbound connections work, inbound ones to the home are dropped unanswered, as home routers do
(a RST from the router's own stack would refuse the first SYN of a hole punch's simultaneous
open: `swarm/punch.py`).
`random_ports=True` makes it `masquerade random` (a port-randomizing NAT); `upnp=True` runs
Debian's miniupnpd in each router (`upnp_unavailable()`), its chains hooked into the router's,
speaking UPnP-IGD and NAT-PMP (NAT-PMP only with `natpmp_only=True`).
Every namespace and daemon is gone on the way out. Needs root, iproute2 and nft:
`nat_unavailable()` says why not.
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

# /24: the "internet"; the public namespace is .1, router i is .11+i. Not a private range:
# miniupnpd refuses to map ports on a router whose outside address is private (RFC 1918), and
# these namespaces reach nothing outside themselves anyway.
PUBLIC_NET = "11.99.0"
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
    random_ports: bool = False  # the routers `masquerade random` (hole punching cannot cross)

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


def upnp_unavailable() -> str | None:
    """Why miniupnpd cannot run in a router here, or None if it can."""
    if shutil.which("miniupnpd") is None:
        return "UPnP tests need miniupnpd (apt-get install miniupnpd)"
    try:
        import miniupnpc  # noqa: F401
    except ImportError:
        return "UPnP tests need the miniupnpc package"
    return None


# A home router's rules: masquerade what leaves for the internet, forward only what the home
# started, and drop what else comes in for the router itself, unanswered (a chain may not be
# named "fwd": a keyword of nft's).
RULES = """table ip nat {{
 chain post {{ type nat hook postrouting priority 100; oifname "wan0" {masquerade}; }}
}}
table ip filter {{
 chain forwarding {{ type filter hook forward priority 0; policy drop;
  iifname "lan0" accept; ct state established,related accept; }}
 chain input {{ type filter hook input priority 0; policy accept;
  iifname "wan0" ct state established,related accept; iifname "wan0" drop; }}
}}
"""
# The router's rules when it runs miniupnpd: its chains, named in MINIUPNPD_CONF, hooked in.
UPNP_RULES = """table inet filter {{
 chain forward {{ type filter hook forward priority 0; policy drop;
  iifname "lan0" accept; ct state established,related accept; jump miniupnpd; }}
 chain input {{ type filter hook input priority 0; policy accept;
  iifname "wan0" ct state established,related accept; iifname "wan0" drop; }}
 chain miniupnpd {{ }}
 chain prerouting {{ type nat hook prerouting priority -100; policy accept;
  jump prerouting_miniupnpd; }}
 chain postrouting {{ type nat hook postrouting priority 100; policy accept;
  jump postrouting_miniupnpd; oifname "wan0" {masquerade}; }}
 chain prerouting_miniupnpd {{ }}
 chain postrouting_miniupnpd {{ }}
}}
"""
MINIUPNPD_CONF = """ext_ifname=wan0
ext_ip={wan}
listening_ip=lan0
http_port=0
enable_natpmp=yes
enable_upnp={upnp}
secure_mode=yes
system_uptime=yes
uuid=47ff5665-548b-4740-be4c-4aa28ba4463{n}
lease_file={lease}
upnp_table_name=filter
upnp_nat_table_name=filter
upnp_forward_chain=miniupnpd
upnp_nat_chain=prerouting_miniupnpd
upnp_nat_postrouting_chain=postrouting_miniupnpd
allow 1024-65535 {lan}.0/24 1024-65535
deny 0-65535 0.0.0.0/0 0-65535
"""


def mapped_ports(router: str) -> list[str]:
    """The `dnat` rules miniupnpd holds in `router` now (one per mapping)."""
    out = subprocess.run(
        ["ip", "netns", "exec", router, "nft", "list", "ruleset"],
        capture_output=True, text=True, check=True, timeout=COMMAND_TIMEOUT,
    )  # fmt: skip
    return [line.strip() for line in out.stdout.splitlines() if "dnat" in line]


def sh(ns: str, *args: str) -> None:
    subprocess.run(
        ["ip", "netns", "exec", ns, *args], check=True, capture_output=True, timeout=COMMAND_TIMEOUT
    )


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=COMMAND_TIMEOUT)


@contextlib.contextmanager
def nat_world(
    homes: int = 2,
    random_ports: bool = False,
    upnp: bool = False,
    workdir: str = "/tmp",
    natpmp_only: bool = False,
) -> Iterator[World]:
    """The public namespace and `homes` homes, each behind its own masquerading router;
    `natpmp_only`: its miniupnpd (`upnp`) answers NAT-PMP, not UPnP-IGD."""
    tag = f"{os.getpid() % 100000}n{next(_counter)}"
    created: list[str] = []
    daemons: list[subprocess.Popen[bytes]] = []

    def netns(name: str) -> str:
        _ip("netns", "add", name)
        created.append(name)
        _ip("-n", name, "link", "set", "lo", "up")
        return name

    try:
        public = netns(f"lsnat-{tag}-pub")
        world = World(public, f"{PUBLIC_NET}.1", random_ports=random_ports)
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
            rules = (UPNP_RULES if upnp else RULES).format(masquerade=masquerade)
            subprocess.run(
                ["ip", "netns", "exec", router, "nft", "-f", "-"],
                input=rules.encode(),
                check=True,
                capture_output=True,
                timeout=COMMAND_TIMEOUT,
            )
            world.homes.append(Home(home, f"{lan}.2", router, wan))
            if upnp:
                conf = os.path.join(workdir, f"miniupnpd-{tag}-{i}.conf")
                with open(conf, "w") as f:
                    f.write(
                        MINIUPNPD_CONF.format(
                            wan=wan,
                            lan=lan,
                            n=i,
                            lease=conf + ".leases",
                            upnp="no" if natpmp_only else "yes",
                        )
                    )
                daemons.append(
                    subprocess.Popen(
                        ["ip", "netns", "exec", router, "miniupnpd", "-d", "-f", conf],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                )
        yield world
    finally:
        for daemon in daemons:
            daemon.terminate()
            try:
                daemon.wait(10)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
        for name in reversed(created):
            with contextlib.suppress(subprocess.CalledProcessError, subprocess.TimeoutExpired):
                _ip("netns", "delete", name)
