"""What the benchmark scripts share: spreads and percentiles for tables, child processes.

The scripts run as `python scripts/bench_X.py`, so this folder is on `sys.path` and they
`import benchlib`. Peers themselves start through `layerswarm.peer.launch`.
"""

from __future__ import annotations

import json
import os
import select
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from layerswarm.peer.launch import LocalSwarm, start_peer


def spread(
    values: Sequence[float],
    fmt: str = ".0f",
    scale: float = 1.0,
    *,
    brackets: str = "()",
    alone: bool = True,
) -> str:
    """`median (min-max)` of `values` times `scale`, each formatted with `fmt`.

    `brackets="[]"` writes `median [min..max]`. NaN values are left out; none left: `-`. One
    value is shown alone when `alone`, else as `x (x-x)`.
    """
    v = [x * scale for x in values if x == x]
    if not v:
        return "-"
    med = format(statistics.median(v), fmt)
    if len(v) == 1 and alone:
        return med
    lo, hi = format(min(v), fmt), format(max(v), fmt)
    return f"{med} [{lo}..{hi}]" if brackets == "[]" else f"{med} ({lo}-{hi})"


def value_range(values: Sequence[float], fmt: str) -> str:
    """`min-max` of `values`."""
    return f"{min(values):{fmt}}-{max(values):{fmt}}"


def percentile(xs: Sequence[float], q: float) -> float:
    """The `q` quantile (0..1) of `xs`, nearest rank; NaN for none."""
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def run_self(
    argv: Sequence[str],
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
    check: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Run the calling script again with `argv`, in a fresh Python, its output captured.

    `env` adds to (or overrides) this process's environment.
    """
    cmd = [sys.executable, sys.argv[0], *argv]
    return subprocess.run(
        cmd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=check,
    )


def child_json(
    argv: Sequence[str], env: Mapping[str, str] | None = None, timeout: float | None = None
) -> tuple[dict[str, Any], str]:
    """`run_self`, its last stdout line read as JSON, and its stderr.

    A child that timed out, or printed no JSON, gives `{"error": ...}`.
    """
    try:
        done = run_self(argv, env, timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"no result within {timeout:.0f} s"}, ""
    lines = done.stdout.strip().splitlines()
    try:
        result: dict[str, Any] = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        result = {"error": f"exit status {done.returncode}"}
    return result, done.stderr


def start_ready(
    cmd: Sequence[str], prefix: str, log_path: Path, timeout: float = 180.0
) -> tuple[subprocess.Popen[str], str]:
    """Start `cmd` (stderr to `log_path`) and wait for the stdout line that starts with
    `prefix`: the process, and the rest of that line.

    Raises:
        RuntimeError: it exited, or printed no such line in `timeout` s; its log is quoted.
    """
    with open(log_path, "w") as err:
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if ready:
            line = proc.stdout.readline()
            if line.startswith(prefix):
                return proc, line[len(prefix) :].strip()
    stop(proc)
    raise RuntimeError(f"{cmd[0]} did not get ready; its log ends:\n{log_path.read_text()[-2000:]}")


def stop(proc: subprocess.Popen[str], timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout` s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


def restart_dead(swarm: LocalSwarm, model_dir: Path, workdir: Path) -> None:
    """Start a new peer, with a new key and port, for each of `swarm`'s that has exited."""
    for i, p in enumerate(swarm.peers):
        if p.process.poll() is not None:
            p.stop()
            swarm.peers[i] = start_peer(model_dir, p.span, workdir)
