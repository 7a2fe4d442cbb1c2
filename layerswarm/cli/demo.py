"""`swarm-demo`: start a local swarm of peer processes on loopback and chat through it.

Fetches the default model if missing, starts peers that split its layers between them, streams
one reply generated through them, then stops the peers.
"""

from __future__ import annotations

import os

# The demo's client shares this machine with its peers: see layerswarm/cli/peer.py.
os.environ.setdefault("GOMP_SPINCOUNT", "20000")

import argparse
import sys
import tempfile
import time
from pathlib import Path

from layerswarm.cli.chat import close_generator, show
from layerswarm.cli.common import (
    default_cache_dir,
    quiet_logging,
    resolve_model_cli,
    route_libp2p_logs,
    run_main,
    setup_logging,
)
from layerswarm.cli.repl import Events
from layerswarm.peer.launch import LocalSwarm, even_spans, start_peer, start_peers
from layerswarm.routing.client import Client
from layerswarm.routing.sampling import SamplingConfig
from layerswarm.shards.config import ModelConfig


def main(argv: list[str] | None = None) -> None:
    run_main(_main, argv)


def _main(argv: list[str] | None) -> None:
    ap = argparse.ArgumentParser(prog="swarm-demo", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--peers", type=int, default=3, help="how many peers split the layers")
    ap.add_argument("--prompt", default="What is the capital of France?")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    setup_logging(args.verbose)
    events = Events()
    if not args.verbose:
        quiet_logging(events)
    model_dir = resolve_model_cli(args.model, default_cache_dir())
    spans = even_spans(ModelConfig.from_file(model_dir).num_layers, args.peers)
    say(
        f"starting {len(spans)} peers on 127.0.0.1 serving layers "
        + ", ".join(str(s) for s in spans)
        + "; they and the client find each other through a DHT on 127.0.0.1"
    )
    with tempfile.TemporaryDirectory(prefix="layerswarm-demo-") as tmp:
        t0 = time.monotonic()
        first = start_peer(model_dir, spans[0], Path(tmp), ["--dht"])
        with LocalSwarm([first]) as swarm:
            bootstrap = ["--bootstrap", first.multiaddr or ""]
            swarm.peers += start_peers(model_dir, spans[1:], Path(tmp), bootstrap).peers
            say(f"peers ready in {time.monotonic() - t0:.1f} s (bootstrap: {first.multiaddr}):")
            for p in swarm.peers:
                say(f"  layers {p.span}  at {p.address}")
            route_libp2p_logs(args.verbose)  # else its warnings print raw, mid-reply
            client = Client.connect(
                str(model_dir), bootstrap=[first.multiaddr or ""], on_event=events
            )
            gen = client.generator
            say(f"\n> {args.prompt}")
            show(
                gen.chat(
                    [{"role": "user", "content": args.prompt}],
                    SamplingConfig(max_new_tokens=args.max_new_tokens),
                ),
                events,
            )
            s = gen.last_stats
            say(
                f"\n{s.new_tokens} tokens through {len(spans)} peers: prefill "
                f"{s.prefill_seconds * 1e3:.0f} ms, decode {s.decode_tokens_per_second:.1f} tok/s"
            )
            say("stopping the peers")
            close_generator(gen)


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
