"""`swarm-peer`'s command line: its subcommands and their options (`peer` runs them)."""

from __future__ import annotations

import argparse
from pathlib import Path

from layerswarm.cli.status import add_status_parser
from layerswarm.shards.config import DTYPES
from layerswarm.shards.scheduler_config import DEFAULT_PREFILL_CHUNK, DEFAULT_TOKEN_BUDGET


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
        "--layers",
        default="auto",
        metavar="A:B|auto",
        help="serve layers A up to (not including) B; auto (the default): as many as the memory "
        "budget holds, where the swarm is weakest",
    )
    start.add_argument(
        "--rebalance-interval",
        type=float,
        default=30.0,
        metavar="S",
        help="with --layers auto: look at the swarm this often and move where layers are "
        "missing (0: never)",
    )
    start.add_argument(
        "--memory-budget",
        type=float,
        default=0,
        metavar="MIB",
        help="memory for weights and KV cache when --layers auto (default: half the free memory)",
    )
    start.add_argument(
        "--mdns-interface",
        action="append",
        default=None,
        metavar="IP|NAME|none",
        help="announce on the LAN over mDNS on this interface (repeat for more; default: every "
        "interface; none: no mDNS)",
    )
    start.add_argument(
        "--host",
        default="0.0.0.0",
        help="address to listen on (default: every interface, so LAN clients can reach it)",
    )
    start.add_argument("--port", type=int, default=0, help="TCP port (0: pick a free one)")
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
        "--kernels",
        default="auto",
        choices=["auto", "torch", "triton"],
        help="auto: Triton on CUDA, torch on a CPU; triton on a CPU runs Triton's interpreter "
        "(slow: for checking the Triton path end to end)",
    )
    start.add_argument(
        "--no-cuda-graphs",
        action="store_true",
        help="run decode steps eagerly on a GPU instead of replaying captured CUDA graphs",
    )
    start.add_argument(
        "--quant",
        default="none",
        choices=["none", "int8", "int4"],
        help="weight-only quantization of the span at load time",
    )
    start.add_argument(
        "--quant-group-size",
        type=int,
        default=32,
        metavar="N",
        help="inputs per int4 scale (32 suits models converted from a Q4 GGUF)",
    )
    start.add_argument(
        "--cache-memory",
        type=float,
        default=256,
        metavar="MIB",
        help="KV-cache budget for all sessions together, in MiB",
    )
    start.add_argument("--max-session-length", type=int, default=8192, metavar="TOKENS")
    start.add_argument("--session-idle-timeout", type=float, default=300, metavar="S")
    start.add_argument(
        "--step-timeout",
        type=float,
        default=30,
        metavar="S",
        help="a step running this long (from its first chunk; waiting in line is free) fails",
    )
    start.add_argument(
        "--max-batch", type=int, default=16, metavar="N", help="sessions in one batch at most"
    )
    start.add_argument(
        "--token-budget",
        type=int,
        default=DEFAULT_TOKEN_BUDGET,
        metavar="TOKENS",
        help="tokens a batch: every decode step, then prefill chunks up to this",
    )
    start.add_argument(
        "--prefill-chunk",
        type=int,
        default=DEFAULT_PREFILL_CHUNK,
        metavar="TOKENS",
        help="tokens a batch takes of a prompt while no session decodes",
    )
    start.add_argument(
        "--admission-timeout",
        type=float,
        default=10,
        metavar="S",
        help="a new session waits this long for KV memory before 'cache full'",
    )
    start.add_argument(
        "--max-sessions-per-client",
        type=int,
        default=64,
        metavar="N",
        help="sessions one client may hold open here; more are refused with 'busy'",
    )
    add_limit_arguments(start)
    start.add_argument(
        "--key",
        type=Path,
        metavar="FILE",
        help="the peer's Ed25519 key (created if missing; default: in the config dir)",
    )
    start.add_argument(
        "--insecure-plaintext",
        action="store_true",
        help="serve without encryption (trusted LANs and measurements only)",
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
    add_dht_arguments(start)
    start.add_argument("--verbose", action="store_true")
    add_status_parser(sub)
    return ap


def add_limit_arguments(start: argparse.ArgumentParser) -> None:
    limits = start.add_argument_group("limits on strangers (each refusal tells the client why)")
    limits.add_argument(
        "--max-client-cache-fraction",
        type=float,
        default=0.5,
        metavar="F",
        help="share of the KV cache one client's sessions may hold while others want room",
    )
    limits.add_argument(
        "--max-connections", type=int, default=1024, metavar="N", help="connections at once"
    )
    limits.add_argument(
        "--max-connections-per-ip",
        type=int,
        default=64,
        metavar="N",
        help="connections at once from one IP address",
    )
    limits.add_argument(
        "--handshake-timeout",
        type=float,
        default=5.0,
        metavar="S",
        help="a new connection's TLS handshake, then its Hello, must each finish within this",
    )
    limits.add_argument(
        "--connection-idle-timeout",
        type=float,
        default=600.0,
        metavar="S",
        help="close a connection with no request in flight for this long",
    )
    # Tests only: make this peer lie on purpose (layerswarm.peer.fault_injection).
    limits.add_argument("--test-fault-injector", default="", help=argparse.SUPPRESS)


def add_dht_arguments(start: argparse.ArgumentParser) -> None:
    dht = start.add_argument_group("WAN discovery (DHT) and private swarms")
    dht.add_argument(
        "--dht",
        action="store_true",
        help="run a DHT node even without --bootstrap, so that others can bootstrap from this "
        "peer (its multiaddr is logged and in the ready line)",
    )
    dht.add_argument(
        "--bootstrap",
        action="append",
        default=[],
        metavar="MULTIADDR",
        help="join the DHT through this member, /ip4/A/tcp/P/p2p/PEERID (repeat for more; "
        "implies --dht)",
    )
    dht.add_argument(
        "--dht-port", type=int, default=0, metavar="N", help="TCP port of the DHT node (0: free)"
    )
    dht.add_argument(
        "--record-ttl",
        type=float,
        default=60.0,
        metavar="S",
        help="how long this peer's DHT record stays valid: a peer that stops answering drops "
        "out of others' view after this; re-announced every third of it (default: 60)",
    )
    dht.add_argument(
        "--swarm-key",
        type=Path,
        metavar="FILE",
        help="a private swarm's key (32 random bytes: head -c 32 /dev/urandom > swarm.key): "
        "the DHT and every connection then admit only holders of the same key; turns mDNS off "
        "unless --mdns-interface is given",
    )
