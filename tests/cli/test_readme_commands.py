"""The README's commands, run as written (ports and addresses filled in), give what it says.

The README's first peer form is `--peer host:port`, without the peer ID: it broke the default
(push) path once, because routes must name each hop by the ID learned in the handshake. Every
run here also checks that stderr holds nothing but real warnings (no "nanobind: leaked" lines
at exit, no tracebacks).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import openai
import pytest

from layerswarm.peer.launch import PeerProcess, wait_ready

pytestmark = pytest.mark.slow

QUESTION = "Explain in one sentence why the sky is blue."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def env_for(smollm2_dir: Path) -> dict[str, str]:
    """The environment a user has: `smollm2-135m` resolves from the cache the tests fill."""
    return {**os.environ, "LAYERSWARM_CACHE": str(smollm2_dir.parents[1])}


def command(name: str) -> list[str]:
    """A console script of ours, run by this interpreter (`swarm-chat` -> its module)."""
    module = {"swarm-chat": "chat", "swarm-peer": "peer", "swarm-api": "api"}[name]
    return [sys.executable, "-m", f"layerswarm.cli.{module}"]


def run(smollm2_dir: Path, name: str, *args: str) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(
        [*command(name), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env_for(smollm2_dir),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out


LOG_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [A-Z]+ [\w.]+: ")
PROGRESS = re.compile(r"^[\w ,./:-]+ \(\d+%\)$")  # loading layer 3/30 (20%)


def only_records(stderr: str) -> None:
    """A daemon's stderr: log records (and what they carry on their next lines), progress."""
    bad = [
        line
        for line in stderr.splitlines()
        if line.strip() and not LOG_RECORD.match(line) and not PROGRESS.match(line)
    ]
    assert not [line for line in bad if "nanobind" in line or "Traceback" in line], stderr
    assert not bad, bad


def quiet(stderr: str) -> None:
    """Nothing but warnings a person should read: no leak reports, no tracebacks."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert not [line for line in lines if "nanobind" in line or "Traceback" in line], stderr
    assert all(line.startswith("warning: ") for line in lines), stderr


@pytest.fixture(scope="module")
def readme_peers(
    smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[tuple[int, PeerProcess]]]:
    """`swarm-peer start --model smollm2-135m --layers 0:15 --host H --port P` and 15:30."""
    work = tmp_path_factory.mktemp("readme")
    peers: list[tuple[int, PeerProcess]] = []
    try:
        for layers in ("0:15", "15:30"):
            port = free_port()
            args = ["start", "--model", "smollm2-135m", "--layers", layers]
            args += ["--host", "127.0.0.1", "--port", str(port)]
            args += ["--mdns-interface", "none", "--key", str(work / f"{port}.key")]
            with open(work / f"{port}.log", "w") as err:  # the child keeps its own copy
                proc = subprocess.Popen(
                    [*command("swarm-peer"), *args],
                    stdout=subprocess.PIPE,
                    stderr=err,
                    text=True,
                    env={**env_for(smollm2_dir), "PYTHONUNBUFFERED": "1"},
                )
            peer = PeerProcess(None, proc, stderr_path=work / f"{port}.log")
            peers.append((port, peer))
        for _, peer in peers:
            wait_ready(peer, time.monotonic() + 180)
        yield peers
    finally:
        for _, peer in peers:
            peer.stop()


@pytest.fixture(scope="module")
def local_reply(smollm2_dir: Path) -> str:
    """`swarm-chat --local --model smollm2-135m --prompt ... --temperature 0`."""
    out = run(
        smollm2_dir,
        "swarm-chat",
        *("--local", "--model", "smollm2-135m", "--prompt", QUESTION),
        *("--max-new-tokens", "24", "--temperature", "0"),
    )
    quiet(out.stderr)
    assert "sky" in out.stdout.lower()
    return out.stdout


@pytest.mark.parametrize(
    "how",
    [
        ("host:port", "host:port"),
        ("host:port/ID", "host:port"),
        ("relay", "host:port"),
        ("speculate", "lookup"),
        ("speculate", "draft"),
    ],
    ids=["push", "with-an-ID", "relay", "speculate-lookup", "speculate-draft"],
)
def test_swarm_chat_through_peers_given_as_the_readme_writes_them(
    smollm2_dir: Path,
    readme_peers: list[tuple[int, PeerProcess]],
    local_reply: str,
    how: tuple[str, str],
) -> None:
    (first_port, first), (second_port, _) = readme_peers
    peers = [f"127.0.0.1:{first_port}", f"127.0.0.1:{second_port}"]
    extra: list[str] = []
    if how[0] == "host:port/ID":  # swarm-chat --peer 192.0.2.10:7000/12D3KooW... --peer ...:7001
        peers[0] = f"127.0.0.1:{first_port}/{first.peer_id}"
    elif how[0] == "relay":
        extra = ["--relay"]
    elif how == ("speculate", "lookup"):
        extra = ["--speculate", "lookup"]
    elif how == ("speculate", "draft"):
        extra = ["--speculate", "draft", "--draft-model", "smollm2-135m"]
    out = run(
        smollm2_dir,
        "swarm-chat",
        *("--model", "smollm2-135m", *(a for p in peers for a in ("--peer", p))),
        *("--prompt", QUESTION, "--max-new-tokens", "24", "--temperature", "0", *extra),
    )
    quiet(out.stderr)
    assert out.stdout == local_reply


def test_swarm_api_in_front_of_peers_given_as_host_port(
    smollm2_dir: Path,
    readme_peers: list[tuple[int, PeerProcess]],
    local_reply: str,
    open_api: Callable[..., AbstractContextManager[str]],
    tmp_path: Path,
) -> None:
    peers = [f"127.0.0.1:{port}" for port, _ in readme_peers]
    log = tmp_path / "api.log"
    with open_api(smollm2_dir, peers, log=log) as url:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
        reply = client.chat.completions.create(
            model="smollm2-135m",
            messages=[{"role": "user", "content": QUESTION}],
            max_tokens=24,
            temperature=0,
        )
    assert reply.choices[0].message.content == local_reply.rstrip("\n")
    only_records(log.read_text())  # stopped by SIGTERM above


def test_the_peers_stop_with_only_log_records_and_progress_on_stderr(
    readme_peers: list[tuple[int, PeerProcess]],
) -> None:
    for _, peer in readme_peers:
        assert peer.stop() == 0  # SIGTERM: a clean stop
        assert peer.stderr_path is not None
        only_records(peer.stderr_path.read_text())
