"""Replies through swarm-api while peers die and come back: served, failed, p50/p99 latency.

For 2 and 3 replicas of each span (0:15 and 15:30 of SmolLM2-135M), one `swarm-api` over all
the peers; first a quiet run asks each question once (greedy) for the reference replies. Then,
for each kill interval (10 s, 5 s) and user count (4, 8), the users ask questions in a loop with
the official `openai` client (no retries of its own: a failure counts) while every interval one
peer is killed with SIGKILL and restarted on the same key and port. A peer is killed only while
every other replica of its span serves (a span is never left with no ready peer on purpose).
Every reply is compared with the quiet run's.

    python scripts/bench_churn.py                      # 60 s of churn a cell, 8 cells
    python scripts/bench_churn.py --duration 15        # a quick run: 2 min of churn in all

Beyond the churn itself a run spends time starting the peers, asking the quiet questions,
finishing the replies in flight at the end of a cell and waiting for restarts: the quick run
took ~11 min on a loaded 2-core machine (replies of 16 tokens took 11-21 s at the median).

Columns: kills done (skipped: no peer could be killed without emptying a span), requests
served (reply equal to the quiet run's), failed (an error or a status >= 400), wrong (a reply
that differs), p50/p99 latency of the served ones in s.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from benchlib import percentile, start_ready, stop
from openai import OpenAI

from layerswarm.cli.common import default_cache_dir, resolve_model_cli
from layerswarm.peer.launch import LocalSwarm, PeerProcess, start_peer, start_peers
from layerswarm.shards.config import Span

SPANS = [Span(0, 15), Span(15, 30)]
QUESTIONS = [
    "What is the capital of France?",
    "Explain in one sentence why the sky is blue.",
    "Name three primary colors.",
    "What is 12 times 12?",
    "Who wrote Romeo and Juliet?",
    "What do bees make?",
    "Give one use of a hammer.",
    "What is the boiling point of water in Celsius?",
]
API_READY = "LAYERSWARM-API-READY "


@dataclass
class Cell:
    """One cell of the table: what the users saw while peers churned."""

    kill_every: float
    replicas: int
    users: int
    kills: int = 0
    skipped: int = 0  # kill times when every span had a replica still loading
    served: list[float] = field(default_factory=list)  # latencies (s) of right replies
    failed: int = 0
    wrong: int = 0
    errors: list[str] = field(default_factory=list)  # the first few failures, for the log


class Churn:
    """Peers of a swarm with fixed keys and ports, killed and restarted one at a time."""

    def __init__(self, model_dir: Path, workdir: Path, replicas: int, extra: list[str]) -> None:
        self.model_dir, self.workdir, self.extra = model_dir, workdir, extra
        spans = [s for s in SPANS for _ in range(replicas)]
        self.args = [
            ["--port", str(free_port()), "--key", str(workdir / f"peer-{i}.key"), *extra]
            for i in range(len(spans))
        ]
        self.swarm: LocalSwarm = start_peers(model_dir, spans, workdir, peer_args=self.args)
        self.lock = threading.Lock()
        self.loading: set[int] = set()  # peers restarting
        self.restarts: list[threading.Thread] = []

    def kill_one(self, rng: random.Random) -> bool:
        """SIGKILL a peer whose span keeps another ready replica, and restart it; False: none."""
        with self.lock:
            peers = self.swarm.peers
            ok = [
                i
                for i, p in enumerate(peers)
                if i not in self.loading
                and all(j not in self.loading for j, q in enumerate(peers) if q.span == p.span)
            ]
            if not ok:
                return False
            i = rng.choice(ok)
            self.loading.add(i)
            victim = peers[i]
        victim.process.send_signal(signal.SIGKILL)
        victim.stop()
        thread = threading.Thread(target=self._restart, args=(i, victim), daemon=True)
        thread.start()
        self.restarts.append(thread)
        return True

    def _restart(self, i: int, old: PeerProcess) -> None:
        for attempt in range(3):  # the port may linger a moment after the kill
            try:
                peer = start_peer(self.model_dir, old.span, self.workdir, self.args[i])
                break
            except Exception as e:
                print(f"restart of peer {i} failed ({attempt + 1}/3): {e}", file=sys.stderr)
                time.sleep(1.0)
        else:
            return
        with self.lock:
            self.swarm.peers[i] = peer
            self.loading.discard(i)

    def settle(self, timeout: float = 300.0) -> None:
        """Wait for every restart to finish."""
        for thread in self.restarts:
            thread.join(timeout)
        self.restarts.clear()

    def stop(self) -> None:
        self.settle()
        self.swarm.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ask(client: OpenAI, model: str, question: str, max_tokens: int) -> str:
    reply = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": question}],
        max_tokens=max_tokens,
        temperature=0,
    )
    return reply.choices[0].message.content or ""


def run_cell(
    cell: Cell, churn: Churn, url: str, model: str, refs: dict[str, str], args: argparse.Namespace
) -> None:
    stop_at = time.monotonic() + args.duration
    lock = threading.Lock()

    def user(u: int) -> None:
        client = OpenAI(base_url=url, api_key="none", max_retries=0, timeout=args.request_timeout)
        n = u
        while time.monotonic() < stop_at:
            question = QUESTIONS[n % len(QUESTIONS)]
            n += 1
            t0 = time.monotonic()
            try:
                text = ask(client, model, question, args.max_tokens)
            except Exception as e:
                with lock:
                    cell.failed += 1
                    if len(cell.errors) < 5:
                        cell.errors.append(f"{type(e).__name__}: {e}"[:300])
                continue
            with lock:
                if text == refs[question]:
                    cell.served.append(time.monotonic() - t0)
                else:
                    cell.wrong += 1
                    if len(cell.errors) < 5:
                        cell.errors.append(f"wrong reply to {question!r}: {text!r}"[:300])

    rng = random.Random(args.seed + cell.users + cell.replicas)
    users = [threading.Thread(target=user, args=(u,)) for u in range(cell.users)]
    for t in users:
        t.start()
    next_kill = time.monotonic() + cell.kill_every
    while time.monotonic() < stop_at:
        time.sleep(max(0.0, min(next_kill, stop_at) - time.monotonic()))
        if time.monotonic() >= stop_at:
            break
        if churn.kill_one(rng):
            cell.kills += 1
        else:
            cell.skipped += 1
        next_kill += cell.kill_every
    for t in users:
        t.join()
    churn.settle()


def one_swarm(
    model_dir: Path, replicas: int, args: argparse.Namespace, workdir: Path
) -> list[Cell]:
    churn = Churn(model_dir, workdir, replicas, args.peer_arg)
    cells: list[Cell] = []
    api = None
    try:
        cmd = [sys.executable, "-m", "layerswarm.cli.api", "--model", str(model_dir)]
        cmd += ["--port", "0", "--device", "cpu", *args.api_arg]
        cmd += [f"--peer={a}" for a in churn.swarm.addresses]
        api, line = start_ready(cmd, API_READY, workdir / "api.log")
        info = json.loads(line)
        url, model = info["url"], info["model"]
        quiet = OpenAI(base_url=url, api_key="none", max_retries=0, timeout=args.request_timeout)
        refs = {q: ask(quiet, model, q, args.max_tokens) for q in QUESTIONS}
        for kill_every in args.kill_every:
            for users in args.users:
                cell = Cell(kill_every, replicas, users)
                print(f"{replicas} replicas, kill every {kill_every:g} s, {users} users",
                      file=sys.stderr)  # fmt: skip
                run_cell(cell, churn, url, model, refs, args)
                for e in cell.errors:
                    print(f"  {e}", file=sys.stderr)
                cells.append(cell)
    finally:
        if api is not None:
            stop(api)
        churn.stop()
    return cells


def row(c: Cell) -> str:
    kills = f"{c.kills}" + (f" ({c.skipped} skipped)" if c.skipped else "")
    p50, p99 = percentile(c.served, 0.5), percentile(c.served, 0.99)
    return (
        f"| {c.kill_every:g} s | {c.replicas} | {c.users} | {kills} | {len(c.served)} "
        f"| {c.failed} | {c.wrong} | {p50:.1f} | {p99:.1f} |"
    )


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--duration", type=float, default=60.0, help="s of churn a cell")
    ap.add_argument("--kill-every", type=float, nargs="+", default=[10.0, 5.0], metavar="S")
    ap.add_argument("--replicas", type=int, nargs="+", default=[2, 3], help="per span")
    ap.add_argument("--users", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--max-tokens", type=int, default=16, help="tokens a reply")
    ap.add_argument("--request-timeout", type=float, default=300.0, metavar="S")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--peer-arg", action="append", default=[], help="one more argument for every peer"
    )
    ap.add_argument(
        "--api-arg", action="append", default=[], help="one more argument for swarm-api"
    )
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    model_dir = resolve_model_cli(args.model, default_cache_dir())
    cells: list[Cell] = []
    with tempfile.TemporaryDirectory() as tmp:
        for replicas in args.replicas:
            cells += one_swarm(model_dir, replicas, args, Path(tmp) / f"r{replicas}")
    print(
        f"\n{args.model}, {datetime.now():%Y-%m-%d %H:%M}, {os.cpu_count()} cores, spans "
        f"{', '.join(map(str, SPANS))}, {args.duration:g} s a cell, {args.max_tokens}-token "
        "greedy replies through swarm-api (openai client, no retries)\n"
    )
    print(
        "| kill every | replicas/span | users | kills | served | failed | wrong | p50 s | p99 s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for c in cells:
        print(row(c))


if __name__ == "__main__":
    main()
