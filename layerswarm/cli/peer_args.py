"""`swarm-peer`'s command line: its subcommands and their options (`peer` runs them).

`start`'s options are `PeerConfig`'s fields (`config_flags` makes a flag of each field with a
help), plus the few that the command resolves on this machine before the config exists: the
model, the device and dtype, the mDNS interfaces and the swarm key file.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from layerswarm.cli.config_flags import add_config_flags
from layerswarm.cli.status import add_status_parser
from layerswarm.peer.config import DHT, PeerConfig
from layerswarm.shards.config import DTYPES


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="swarm-peer", description="Serve a span of a model's layers.")
    sub = ap.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="load a span of layers and serve it until stopped")
    start.add_argument(
        "--model",
        default="smollm2-135m",
        help="model name, Hugging Face name ORG/NAME[@REVISION], a Hugging Face style folder, "
        "or a .gguf file",
    )
    start.add_argument(
        "--device",
        default="auto",
        metavar="auto|cpu|cuda|cuda:N",
        help="where the span's weights, KV cache and compute live (auto, the default: the CUDA "
        "device with the most free memory, else the CPU)",
    )
    start.add_argument(
        "--dtype",
        default=None,
        choices=sorted(DTYPES),
        help="compute dtype (default: bfloat16 on a GPU, float16 on one without bf16, float32 "
        "on a CPU)",
    )
    start.add_argument(
        "--mdns-interface",
        action="append",
        default=None,
        metavar="IP|NAME|none",
        help="announce on the LAN over mDNS on this interface (repeat for more; default: every "
        "interface; none: no mDNS)",
    )
    groups: dict[str, Any] = {}  # argument groups by title, to add --swarm-key to the DHT's
    add_config_flags(start, PeerConfig, groups)
    groups[DHT].add_argument(
        "--swarm-key",
        type=Path,
        metavar="FILE",
        help="a private swarm's key (32 random bytes: head -c 32 /dev/urandom > swarm.key): "
        "the DHT and every connection then admit only holders of the same key; turns mDNS off "
        "unless --mdns-interface is given",
    )
    start.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        metavar="PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (steps, tokens, batches, "
        "queue, KV pages, latency; 0: any free port)",
    )
    start.add_argument(
        "--metrics-host", default="127.0.0.1", help="address for --metrics-port (default: loopback)"
    )
    start.add_argument("--verbose", action="store_true")
    add_status_parser(sub)
    return ap
