"""The flags that say which model and which swarm: `swarm-chat` and `swarm-api` share them.

Declared once here, so that both commands find a swarm the same way. A `ClientConfig` field
with a `help` in its metadata becomes a flag of both as well (`config_flags`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from layerswarm.cli.config_flags import add_config_flags
from layerswarm.routing.client_config import ClientConfig


def add_swarm_arguments(ap: argparse.ArgumentParser) -> None:
    """Add the model, where its layers run (`--local` or the swarm) and how to reach them."""
    ap.add_argument(
        "--model",
        default="smollm2-135m",
        help="model name, Hugging Face name ORG/NAME[@REVISION], a Hugging Face style folder, "
        "or a .gguf file",
    )
    where = ap.add_mutually_exclusive_group()
    where.add_argument("--local", action="store_true", help="run every layer in this process")
    where.add_argument(
        "--peer",
        action="append",
        default=[],
        metavar="HOST:PORT[/PEERID]",
        help="a peer to use; repeat so that their spans cover every layer",
    )
    ap.add_argument(
        "--dtype",
        default=None,
        help="float32, bfloat16 or float16 (default: bfloat16 on a GPU, float32 on a CPU)",
    )
    ap.add_argument(
        "--device",
        default="auto",
        metavar="auto|cpu|cuda|cuda:N",
        help="where the embedding and the head run, and with --local every layer (auto: the "
        "CUDA device with the most free memory, else the CPU)",
    )
    ap.add_argument(
        "--mdns-interface",
        action="append",
        default=None,
        metavar="IP|NAME",
        help="without --peer, look for the swarm over mDNS on this interface (repeat for more; "
        "default: every interface; with --peer or --bootstrap: off unless given)",
    )
    ap.add_argument(
        "--bootstrap",
        action="append",
        default=[],
        metavar="MULTIADDR",
        help="find the swarm's peers in the DHT, joined through this member "
        "(/ip4/A/tcp/P/p2p/PEERID, a peer's ready line says it); repeat for more",
    )
    ap.add_argument(
        "--swarm-key",
        type=Path,
        metavar="FILE",
        help="a private swarm's key: the same 32-byte file its peers were started with",
    )
    ap.add_argument(
        "--insecure-plaintext",
        action="store_true",
        help="talk to peers without encryption (trusted LANs and measurements only)",
    )
    ap.add_argument(
        "--speculate",
        choices=("lookup", "draft"),
        default=None,
        help="guess several tokens a pass through the layers, checked in one step (the reply "
        "is the same): lookup (n-grams of the conversation) or draft (a local draft model)",
    )
    ap.add_argument(
        "--draft-model",
        metavar="NAME|PATH",
        help="with --speculate draft: a model with the same tokenizer, run whole here "
        "(default: --model itself)",
    )
    ap.add_argument(
        "--draft-quant",
        choices=("none", "int8", "int4"),
        default="none",
        help="weight-only quantization of the draft model's layers (default: none)",
    )
    ap.add_argument(
        "--verify-fraction",
        type=float,
        default=ClientConfig.verify_fraction,
        metavar="F",
        help="share of steps re-run on another replica and compared; a peer caught lying is "
        "banned (default: %(default)s; each peer's first steps are always checked)",
    )
    ap.add_argument(
        "--verify-locally",
        action="store_true",
        help="where no other replica can check a peer, compute its layers here to check it "
        "(loads those layers' weights in this process)",
    )
    ap.add_argument(
        "--relay",
        action="store_true",
        help="relay every hop's output through this client instead of letting peers hand it "
        "to the next hop (push, the default: fewer link crossings a token)",
    )
    ap.add_argument("--verbose", action="store_true")
    add_config_flags(ap, ClientConfig)
