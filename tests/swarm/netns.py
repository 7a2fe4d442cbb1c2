"""Network namespaces for tests: two namespaces joined by a veth pair, and processes inside them.

Multicast tests (mDNS) run only here, never on the machine's real interfaces:

    with veth_pair() as (a, b):                   # a.name, a.address == "10.77.0.1", ...
        proc = run_in_netns(a, [sys.executable, "script.py", a.address])

The veth ends are created directly inside their namespaces, so they never appear in the
machine's own namespace, and deleting the namespaces (always, on the way out) deletes them.
Needs root and iproute2; `netns_unavailable()` says why not, for `pytest.skip`.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import socket
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

SUBNET_PREFIX = "10.77.0"  # /24 inside the pair; namespaces are isolated, so pairs may reuse it
COMMAND_TIMEOUT = 10.0  # s: for each `ip` command
VETH_PREFIX = "lsv"  # names of the veth ends this module makes
_counter = itertools.count()


@dataclass(frozen=True)
class Netns:
    """One end of a veth pair: its namespace, its interface and that interface's address."""

    name: str  # namespace name, for `ip netns exec`
    interface: str  # the veth end inside it
    address: str  # its IPv4 address, in SUBNET_PREFIX.0/24


def netns_unavailable() -> str | None:
    """Why namespaces cannot be created here, or None if they can (tries one for real)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "network namespaces need iproute2's `ip`"
    name = f"lstest-probe-{os.getpid()}"
    try:
        _ip("netns", "add", name)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        return f"cannot create a network namespace: {_stderr(exc)}"
    _delete(name)
    return None


@contextlib.contextmanager
def veth_pair() -> Iterator[tuple[Netns, Netns]]:
    """Two fresh namespaces joined by a veth pair, up, with loopback up; deleted on exit."""
    tag = f"{os.getpid() % 100000}x{next(_counter)}"
    ends = (
        Netns(f"lstest-{tag}-a", f"{VETH_PREFIX}{tag}a", f"{SUBNET_PREFIX}.1"),
        Netns(f"lstest-{tag}-b", f"{VETH_PREFIX}{tag}b", f"{SUBNET_PREFIX}.2"),
    )
    a, b = ends
    created: list[str] = []
    try:
        for end in ends:
            _ip("netns", "add", end.name)
            created.append(end.name)
        _ip(
            "link", "add", a.interface, "netns", a.name, "type", "veth",
            "peer", "name", b.interface, "netns", b.name,
        )  # fmt: skip
        for end in ends:
            _ip("-n", end.name, "addr", "add", f"{end.address}/24", "dev", end.interface)
            _ip("-n", end.name, "link", "set", end.interface, "up")
            _ip("-n", end.name, "link", "set", "lo", "up")
        yield a, b
    finally:
        for name in created:
            _delete(name)


def run_in_netns(ns: Netns | str, argv: Sequence[str], **popen: Any) -> subprocess.Popen[bytes]:
    """Start `argv` inside namespace `ns` (`ip netns exec`); the caller waits for or kills it."""
    name = ns.name if isinstance(ns, Netns) else ns
    return subprocess.Popen(["ip", "netns", "exec", name, *argv], **popen)


def in_test_netns() -> bool:
    """Whether every network interface here is loopback or a veth end made by `veth_pair`.

    A process that multicasts only when this holds cannot reach the machine's real network.
    """
    names = [name for _, name in socket.if_nameindex()]
    return all(name == "lo" or name.startswith(VETH_PREFIX) for name in names)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=COMMAND_TIMEOUT)


def _delete(name: str) -> None:
    with contextlib.suppress(subprocess.CalledProcessError, subprocess.TimeoutExpired):
        _ip("netns", "delete", name)


def _stderr(exc: subprocess.CalledProcessError | subprocess.TimeoutExpired) -> str:
    out = exc.stderr
    return out.decode(errors="replace").strip() if isinstance(out, bytes) else str(exc)
