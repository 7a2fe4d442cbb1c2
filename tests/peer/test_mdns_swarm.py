"""mDNS for real, end to end: a peer and a client in two network namespaces find each other.

A real `swarm-peer start` serves all of SmolLM2 in one namespace, announcing itself over mDNS by
default (no flags); in the other, `swarm-chat` with no peer flags finds it on the "LAN" (the
veth pair) and answers, and `swarm-peer status` shows it. Every process runs inside a namespace
made here, behind a guard that refuses to start anywhere else, so nothing multicasts on this
machine's interfaces. Skipped where namespaces cannot be created (not root, no iproute2).
"""

from __future__ import annotations

import json
import select
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from layerswarm.peer.server import READY_PREFIX

sys.path.insert(0, str(Path(__file__).parents[1] / "swarm"))  # tests/ is no package: netns.py
from netns import Netns, netns_unavailable, run_in_netns, veth_pair

SWARM_TESTS = Path(__file__).parents[1] / "swarm"  # where netns.py is, for the guard
READY_TIMEOUT = 120.0  # s: the peer loads 30 layers and measures itself (~10 s here)
CHAT_TIMEOUT = 180.0  # s: discovery, then 16 tokens through the peer
STATUS_TIMEOUT = 60.0  # s: python and torch start, then 2 s of listening
STOP_TIMEOUT = 10.0  # s: a peer says goodbye and exits on SIGTERM, else it is killed
PROMPT = "What is the capital of France?"

# Runs a module only inside a namespace of `netns.veth_pair` (interfaces: lo and its veth end).
GUARD = """
import runpy, sys
sys.path.insert(0, sys.argv[1])
from netns import in_test_netns
sys.path.pop(0)
if not in_test_netns():
    sys.exit("refusing to run outside a test network namespace: mDNS would reach the LAN")
module = sys.argv[2]
sys.argv = [module, *sys.argv[3:]]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def in_netns(ns: Netns, module: str, args: Sequence[str], **popen: object) -> subprocess.Popen[str]:
    """`python -m module args` inside `ns`, behind the guard; text output."""
    argv = [sys.executable, "-c", GUARD, str(SWARM_TESTS), module, *args]
    return run_in_netns(ns, argv, text=True, **popen)  # type: ignore[return-value]


def run_to_end(ns: Netns, module: str, args: Sequence[str], timeout: float) -> tuple[int, str, str]:
    """Run a command in `ns` to its end; returns (exit status, stdout, stderr)."""
    proc = in_netns(ns, module, args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"{module} {' '.join(args)} ran over {timeout} s; stderr:\n{err[-3000:]}")
    return proc.returncode, out, err


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[Netns, Netns]]:
    """Two namespaces joined by a veth pair, deleted after the module's tests."""
    reason = netns_unavailable()
    if reason is not None:
        pytest.skip(reason)
    with veth_pair() as ends:
        yield ends


def start_peer_in(ns: Netns, model_dir: Path, workdir: Path) -> tuple[subprocess.Popen[str], dict]:
    """A peer serving every layer in `ns`, with no mDNS flag (it announces everywhere there).

    Returns the process and its ready line's JSON; the caller stops the process.
    """
    log = (workdir / "peer.log").open("w")
    args = ["start", "--model", str(model_dir), "--layers", "0:30", "--host", ns.address]
    args += ["--port", "0", "--key", str(workdir / "peer.key")]
    proc = in_netns(ns, "layerswarm.cli.peer", args, stdout=subprocess.PIPE, stderr=log)
    log.close()  # the child holds its own descriptor
    assert proc.stdout is not None
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline and proc.poll() is None:
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        line = proc.stdout.readline() if ready else ""
        if line.startswith(READY_PREFIX):
            return proc, json.loads(line[len(READY_PREFIX) :])
    stop(proc)
    log_tail = (workdir / "peer.log").read_text()[-3000:]
    pytest.fail(f"the peer did not get ready within {READY_TIMEOUT} s; its log ends:\n{log_tail}")


def stop(proc: subprocess.Popen[str]) -> None:
    """SIGTERM, then SIGKILL if it does not exit in time; closes its pipe."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_TIMEOUT)
    if proc.stdout is not None:
        proc.stdout.close()


def test_chat_finds_a_peer_on_the_lan_by_mdns_and_status_shows_it(
    pair: tuple[Netns, Netns], smollm2_dir: Path, tmp_path: Path
) -> None:
    ns1, ns2 = pair
    peer, ready = start_peer_in(ns1, smollm2_dir, tmp_path)
    try:
        assert ready["host"] == ns1.address
        code, out, err = run_to_end(
            ns2, "layerswarm.cli.peer", ["status", "--model", str(smollm2_dir)], STATUS_TIMEOUT
        )
        assert code == 0, err[-3000:]
        assert "…" + ready["peer_id"][-8:] in out, out
        assert f"{ns1.address}:{ready['port']}" in out, out
        assert "peers   " + "1" * 30 + "\n" in out, out
        assert "every layer is served" in out, out

        code, out, err = run_to_end(
            ns2, "layerswarm.cli.peer", ["status", "--json", "--wait", "1"], STATUS_TIMEOUT
        )
        assert code == 0, err[-3000:]
        records = json.loads(out)
        assert [(r["peer_id"], r["span_start"], r["span_end"]) for r in records] == [
            (ready["peer_id"], 0, 30)
        ]

        chat = ["--model", str(smollm2_dir), "--prompt", PROMPT]
        chat += ["--max-new-tokens", "16", "--temperature", "0"]
        code, out, err = run_to_end(ns2, "layerswarm.cli.chat", chat, CHAT_TIMEOUT)
        assert code == 0, err[-3000:]
        assert "Paris" in out, (out, err[-3000:])
    finally:
        stop(peer)


def test_chat_without_a_swarm_on_the_lan_says_so_in_one_line(
    pair: tuple[Netns, Netns], smollm2_dir: Path
) -> None:
    _, ns2 = pair
    chat = ["--model", str(smollm2_dir), "--prompt", PROMPT, "--max-new-tokens", "4"]
    code, _, err = run_to_end(ns2, "layerswarm.cli.chat", chat, CHAT_TIMEOUT)
    assert code != 0
    assert err.startswith("error: no swarm found on the LAN"), err[-3000:]
    assert "use --peer or --bootstrap" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
