"""Start peer daemons as real processes on this machine (the demo, tests and benchmarks use it)."""

from __future__ import annotations

import itertools
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from layerswarm.errors import LayerswarmError
from layerswarm.peer.server import READY_PREFIX
from layerswarm.shards.config import Span


@dataclass
class PeerProcess:
    """One `swarm-peer start` process and what its ready line said."""

    span: Span | None  # None: `--layers auto`, until the ready line says which it chose
    process: subprocess.Popen[str]
    address: str = ""  # host:port/PEERID
    peer_id: str = ""
    port: int = 0
    stderr_path: Path | None = None
    multiaddr: str = ""  # its DHT node's, to --bootstrap from; "" without a DHT node

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        """Signal the peer and wait for it to exit; kill it if it does not."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
        return self.process.returncode


@dataclass
class LocalSwarm:
    """Peers started by `start_peers`; stops them all on exit."""

    peers: list[PeerProcess] = field(default_factory=list)

    @property
    def addresses(self) -> list[str]:
        return [p.address for p in self.peers]

    def stop(self) -> None:
        for p in self.peers:
            p.stop()

    def __enter__(self) -> LocalSwarm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_peer(
    model: str | Path,
    span: Span | None,
    workdir: Path,
    extra_args: Sequence[str] = (),
    ready_timeout: float = 180.0,
) -> PeerProcess:
    """Start one peer on 127.0.0.1 with a free port and wait until it serves.

    `span` None lets the peer choose (`--layers auto`); `PeerProcess.span` then says which.

    Raises:
        LayerswarmError: the peer exited or did not get ready in time; its log is quoted.
    """
    peer = _spawn(model, span, workdir, extra_args)
    wait_ready(peer, time.monotonic() + ready_timeout)
    return peer


def start_peers(
    model: str | Path,
    spans: Sequence[Span],
    workdir: Path,
    extra_args: Sequence[str] = (),
    ready_timeout: float = 180.0,
    peer_args: Sequence[Sequence[str]] = (),
) -> LocalSwarm:
    """Start one peer per span, all loading at once, and wait for every one to serve.

    `peer_args`: more arguments for each peer in turn (after `extra_args`), if given.
    """
    swarm = LocalSwarm()
    own = list(peer_args) or [()] * len(spans)
    try:
        swarm.peers = [
            _spawn(model, span, workdir, [*extra_args, *more])
            for span, more in zip(spans, own, strict=True)
        ]
        deadline = time.monotonic() + ready_timeout
        for peer in swarm.peers:
            wait_ready(peer, deadline)
    except BaseException:
        swarm.stop()
        raise
    return swarm


def _spawn(
    model: str | Path, span: Span | None, workdir: Path, extra_args: Sequence[str]
) -> PeerProcess:
    workdir.mkdir(parents=True, exist_ok=True)
    layers = "auto" if span is None else str(span)
    name = f"peer-{layers.replace(':', '-')}-{time.monotonic_ns()}"
    err_path = workdir / f"{name}.log"
    cmd = [
        sys.executable,
        "-m",
        "layerswarm.cli.peer",
        "start",
        "--model",
        str(model),
        "--layers",
        layers,
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--key",
        str(workdir / f"{name}.key"),
        *extra_args,
    ]
    if "--mdns-interface" not in extra_args:
        # Peers started here stay quiet on the LAN: mDNS on the machine's real interface would
        # multicast off it. Tests that want mDNS run peers in a network namespace of their own.
        cmd += ["--mdns-interface", "none"]
    with open(err_path, "w") as err:
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    return PeerProcess(span, proc, stderr_path=err_path)


def wait_ready(peer: PeerProcess, deadline: float) -> None:
    proc = peer.process
    assert proc.stdout is not None  # spawned with a pipe
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if ready:
            line = proc.stdout.readline()
            if line.startswith(READY_PREFIX):
                info = json.loads(line[len(READY_PREFIX) :])
                peer.address, peer.peer_id, peer.port = (
                    info["address"],
                    info["peer_id"],
                    info["port"],
                )
                peer.span = Span.parse(info["layers"])
                peer.multiaddr = info.get("multiaddr") or ""
                return
        if proc.poll() is not None:
            break
    peer.stop(signal.SIGKILL)
    log_tail = peer.stderr_path.read_text()[-2000:] if peer.stderr_path else ""
    layers = "auto" if peer.span is None else peer.span
    raise LayerswarmError(f"peer for layers {layers} did not start; its log ends:\n{log_tail}")


def even_spans(num_layers: int, parts: int) -> list[Span]:
    """Split `[0, num_layers)` into `parts` contiguous spans of near-equal length."""
    cuts = [round(i * num_layers / parts) for i in range(parts + 1)]
    return [Span(a, b) for a, b in itertools.pairwise(cuts)]
