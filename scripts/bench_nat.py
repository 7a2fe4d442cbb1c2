"""Benchmark crossing home routers: direct, relayed and hole-punched paths over emulated links,
and how long a peer behind NAT takes from `swarm-peer start` to a first token for a client in
another home.

Real NAT, as the tests build it (`tests/swarm/nat_world.py`: network namespaces, nftables
masquerade). A public peer A (layers 0:N/2) is also the relay; a home peer H (N/2:N) sits behind
its router and holds a reservation on A; a public peer D serves N/2:N directly; the client sits in
another home. Every byte to A's data port, A's relay port and D crosses one emulated link
(`layerswarm/devtools/linkemu.py`, `--delay-ms` one-way each way): the proxies listen on a second
public address, and H reserves through it, so its leg to the relay crosses a link too. A token
with push then costs `compute + crossings x delay`:

- direct (A, D): client -> A, A -> D, D -> client: 3 crossings;
- relayed (A, H): client -> A, A -> relay -> H (2), H -> relay -> client (2): 5 crossings (the
  relay sees the proxies' addresses, not the routers', so no punch can succeed here);
- punched (A, P): a second home peer P reserves on A's own address; the client and A reach it
  through the relay, then punch (`swarm/punch.py`): client -> A, A -> P, P -> client, 3
  crossings of which only client -> A crosses an emulated link (the punched ones go router to
  router: a TCP proxy cannot sit in a simultaneous open, and this kernel has no netem).

Compute is the local engine's (one process, same model and prompt). Then the time from
`swarm-peer start` of H (with only A up) until a client in the other home, that started looking
at the same moment through the DHT, has its first token.

    sudo python scripts/bench_nat.py [--model smollm2-135m] [--delay-ms 10] [--new-tokens 32]
        [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchlib import start_ready, stop

sys.path.insert(0, str(Path(__file__).parents[1] / "tests" / "swarm"))  # the NAT world
from nat_world import PUBLIC_NET, World, nat_unavailable, nat_world

from layerswarm.cli.common import default_cache_dir, resolve_model_cli
from layerswarm.peer.server import READY_PREFIX
from layerswarm.routing.client import Client
from layerswarm.routing.local import open_local_generator
from layerswarm.routing.sampling import SamplingConfig
from layerswarm.shards.config import ModelConfig

PROMPT = "Write a story about a lighthouse keeper and a storm."
PROXY_ADDRESS = f"{PUBLIC_NET}.2"  # the proxies' public address, beside the peers' .1
A_PORT, RELAY_PORT, D_PORT = 7100, 7101, 7200
# link crossings a token with push, and how many of them cross an emulated link (docstring)
CROSSINGS = {"direct": (3, 3), "relayed": (5, 5), "punched": (3, 1)}

PROXIES = """
import asyncio, sys
from layerswarm.devtools.linkemu import LinkConfig, LinkProxy
async def main(listen, target, delay, ports):
    link = LinkConfig(delay=float(delay))
    proxies = [await LinkProxy(target, p, link, host=listen, port=p).start() for p in ports]
    print("PROXIES-READY", flush=True)
    await asyncio.Event().wait()
asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], [int(p) for p in sys.argv[4:]]))
"""

# Replies through the swarm: a warm-up, then `repeats` timed ones; one JSON line of stats.
CLIENT = """
import json, sys
from pathlib import Path
from layerswarm.routing.client_config import ClientConfig
from layerswarm.routing.sampling import SamplingConfig
from layerswarm.routing.swarm_client import open_swarm_generator
model, prompt, tokens, repeats = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
peers = sys.argv[5:]
config = ClientConfig(connect_timeout=5.0, discovery_timeout=10.0)
gen = open_swarm_generator(Path(model), peers, config=config)
greedy = SamplingConfig(max_new_tokens=tokens, temperature=0.0)
runs = []
try:
    for i in range(repeats + 1):
        reply = "".join(gen.chat([{"role": "user", "content": prompt}], greedy))
        s = gen.last_stats
        if i:
            runs.append({"ttft": s.prefill_seconds, "tok_s": s.decode_tokens_per_second,
                         "ms_token": 1e3 * s.decode_seconds / max(1, s.new_tokens - 1)})
    links = [str(link.address) for link in gen.client.links]
    reach = [link.reach for link in gen.client.links]
finally:
    gen.client.close()
print(json.dumps({"runs": runs, "reply": reply, "links": links, "reach": reach}), flush=True)
"""

# Look for the swarm through the DHT until a first token comes; print when (unix s).
FIRST_TOKEN = """
import json, sys, time
from pathlib import Path
from layerswarm.routing.client_config import ClientConfig
from layerswarm.routing.sampling import SamplingConfig
from layerswarm.routing.swarm_client import open_swarm_generator
model, bootstrap, deadline = sys.argv[1], sys.argv[2], time.time() + float(sys.argv[3])
tries = 0
while time.time() < deadline:
    tries += 1
    try:
        config = ClientConfig(connect_timeout=5.0, discovery_timeout=20.0, bootstrap=(bootstrap,))
        gen = open_swarm_generator(Path(model), [], config=config)
        try:
            next(iter(gen.chat([{"role": "user", "content": "Hi"}],
                               SamplingConfig(max_new_tokens=2, temperature=0.0))))
            print(json.dumps({"first_token_at": time.time(), "tries": tries}), flush=True)
            break
        finally:
            gen.client.close()
    except Exception as e:
        print(f"try {tries}: {e!r}", file=sys.stderr, flush=True)
        time.sleep(0.5)
"""


def in_ns(ns: str, *cmd: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *cmd]


def peer_cmd(ns: str, host: str, model: Path, layers: str, port: int, work: Path, *args: str):  # type: ignore[no-untyped-def]
    key = work / f"{ns}-{layers.replace(':', '-')}-{port}.key"  # one identity a peer
    return in_ns(
        ns, sys.executable, "-m", "layerswarm.cli.peer", "start", "--model", str(model),
        "--layers", layers, "--host", host, "--port", str(port), "--key", str(key),
        "--mdns-interface", "none", "--cache-memory", "64", *args,
    )  # fmt: skip


def run_client(ns: str, model: Path, args: argparse.Namespace, peers: list[str]) -> dict[str, Any]:
    out = subprocess.run(
        in_ns(ns, sys.executable, "-c", CLIENT, str(model), PROMPT, str(args.new_tokens),
              str(args.repeats), *peers),
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    if out.returncode != 0 or not out.stdout.strip():
        raise RuntimeError(f"client failed:\n{out.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def local_compute(model: Path, args: argparse.Namespace) -> dict[str, float]:
    """The local engine's time to first token and ms a token: the floor's compute."""
    gen = open_local_generator(model)
    greedy = SamplingConfig(max_new_tokens=args.new_tokens, temperature=0.0)
    ttft, ms = [], []
    try:
        for i in range(args.repeats + 1):
            "".join(gen.chat([{"role": "user", "content": PROMPT}], greedy))
            s = gen.last_stats
            if i:
                ttft.append(s.prefill_seconds)
                ms.append(1e3 * s.decode_seconds / max(1, s.new_tokens - 1))
    finally:
        Client(gen).close()  # the engine's compute loop and the network thread
    return {"ttft": statistics.median(ttft), "ms_token": statistics.median(ms)}


def bench(world: World, model: Path, args: argparse.Namespace, work: Path) -> None:
    pub, home, client_home, punched_home = world.public, *world.homes
    half = ModelConfig.from_file(model).num_layers // 2
    low, high = f"0:{half}", f"{half}:{2 * half}"
    subprocess.run(
        ["ip", "-n", pub.name, "addr", "add", f"{PROXY_ADDRESS}/24", "dev", "br0"], check=True
    )
    procs: list[subprocess.Popen[str]] = []
    try:
        proxies, _ = start_ready(
            in_ns(pub.name, sys.executable, "-c", PROXIES, PROXY_ADDRESS, pub.address,
                  str(args.delay_ms / 1e3), str(A_PORT), str(RELAY_PORT), str(D_PORT)),
            "PROXIES-READY", work / "proxies.log",
        )  # fmt: skip
        procs.append(proxies)
        a_proc, a_line = start_ready(
            peer_cmd(pub.name, pub.address, model, low, A_PORT, work, "--dht", "--relay", "on",
                     "--relay-port", str(RELAY_PORT)),
            READY_PREFIX, work / "a.log", timeout=300,
        )  # fmt: skip
        procs.append(a_proc)
        a = json.loads(a_line)
        # H starts behind NAT while a client in the other home looks for the swarm
        started = time.time()
        with open(work / "first-token.log", "w") as err:
            looker = subprocess.Popen(
                in_ns(client_home.name, sys.executable, "-c", FIRST_TOKEN, str(model),
                      a["multiaddr"], "300"),
                stdout=subprocess.PIPE, stderr=err, text=True,
            )  # fmt: skip
        procs.append(looker)
        h_proc, h_line = start_ready(
            peer_cmd(home.name, home.address, model, high, 0, work, "--relay", "off",
                     "--bootstrap", a["multiaddr"], "--reach-peer", a["address"],
                     "--reserve-on", f"{PROXY_ADDRESS}:{A_PORT}/{a['peer_id']}"),
            READY_PREFIX, work / "h.log", timeout=300,
        )  # fmt: skip
        procs.append(h_proc)
        h_ready = time.time() - started
        out, _ = looker.communicate(timeout=330)
        lines = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
        first = lines[-1]["first_token_at"] - started if lines else float("nan")
        h = json.loads(h_line)
        relayed = run_client(
            client_home.name, model, args,
            [f"{PROXY_ADDRESS}:{A_PORT}/{a['peer_id']}",
             f"{PROXY_ADDRESS}:{RELAY_PORT}/{a['peer_id']}/p2p-circuit/{h['peer_id']}"],
        )  # fmt: skip
        p_proc, p_line = start_ready(
            peer_cmd(punched_home.name, punched_home.address, model, high, 0, work, "--relay",
                     "off", "--bootstrap", a["multiaddr"], "--reach-peer", a["address"],
                     "--reserve-on", a["address"]),
            READY_PREFIX, work / "p.log", timeout=300,
        )  # fmt: skip
        procs.append(p_proc)
        p = json.loads(p_line)
        punched = run_client(
            client_home.name, model, args,
            [f"{PROXY_ADDRESS}:{A_PORT}/{a['peer_id']}",
             f"{pub.address}:{RELAY_PORT}/{a['peer_id']}/p2p-circuit/{p['peer_id']}"],
        )  # fmt: skip
        stop(p_proc)
        d_proc, d_line = start_ready(
            peer_cmd(pub.name, pub.address, model, high, D_PORT, work, "--relay", "off"),
            READY_PREFIX, work / "d.log", timeout=300,
        )  # fmt: skip
        procs.append(d_proc)
        d = json.loads(d_line)
        direct = run_client(
            client_home.name, model, args,
            [f"{PROXY_ADDRESS}:{A_PORT}/{a['peer_id']}",
             f"{PROXY_ADDRESS}:{D_PORT}/{d['peer_id']}"],
        )  # fmt: skip
    finally:
        for proc in reversed(procs):
            stop(proc)
    compute = local_compute(model, args)
    results = {"direct": direct, "relayed": relayed, "punched": punched}
    report(args, compute, results, h_ready, first)


def report(
    args: argparse.Namespace,
    compute: dict[str, float],
    results: dict[str, dict[str, Any]],
    h_ready: float,
    first: float,
) -> None:
    delay = args.delay_ms
    print(f"\n{args.model}, {args.new_tokens} new tokens, {args.repeats} runs (median), "
          f"{delay:g} ms one-way a link; local engine: first token {1e3 * compute['ttft']:.0f} "
          f"ms, {compute['ms_token']:.1f} ms a token")  # fmt: skip
    print("| path | crossings a token (emulated) | first token, ms | floor, ms | decode tok/s "
          "| ms a token | floor, ms | over the floor | reach |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for name, result in results.items():
        runs = result["runs"]
        crossings, n = CROSSINGS[name]
        ttft = 1e3 * statistics.median(r["ttft"] for r in runs)
        ms = statistics.median(r["ms_token"] for r in runs)
        tok_s = statistics.median(r["tok_s"] for r in runs)
        ttft_floor = 1e3 * compute["ttft"] + n * delay
        floor = compute["ms_token"] + n * delay
        reach = "/".join(result.get("reach", []))
        print(f"| {name} | {crossings} ({n}) | {ttft:.0f} | {ttft_floor:.0f} | {tok_s:.1f} "
              f"| {ms:.1f} | {floor:.1f} | {ms / floor:.2f}x | {reach} |")  # fmt: skip
    same = len({result["reply"] for result in results.values()}) == 1
    print(f"\ndirect, relayed and punched replies identical: {same}")
    print(
        f"swarm-peer start behind NAT -> ready (reserved, announced): {h_ready:.1f} s; "
        f"-> first token for a client in another home: {first:.1f} s"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--delay-ms", type=float, default=10.0, help="one-way delay of each link")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if why := nat_unavailable():
        sys.exit(f"bench_nat needs a NAT world: {why}")
    model = resolve_model_cli(args.model, default_cache_dir())
    with tempfile.TemporaryDirectory() as tmp, nat_world(homes=3, workdir=tmp) as world:
        os.chmod(tmp, 0o755)
        bench(world, Path(model), args, Path(tmp))


if __name__ == "__main__":
    main()
