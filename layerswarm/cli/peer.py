"""`swarm-peer`: run a peer daemon that serves a span of a model's layers.

    swarm-peer start --model smollm2-135m --layers 0:15 --host 127.0.0.1 --port 0

With `--port 0` the peer picks a free port; scripts read the line it prints on stdout once it
serves: `LAYERSWARM-PEER-READY {"host": ..., "port": ..., "peer_id": ..., "address": ...,
"layers": "A:B", "multiaddr": ...}` (`multiaddr`: its DHT node's, or null without `--dht`).

Across networks, peers find each other in a DHT: start one with `--dht` (or several), and the
others with `--bootstrap MULTIADDR` of any member (the `multiaddr` of its ready line).
"""

from __future__ import annotations

import os

# A peer mostly waits on the network between steps, and OpenMP threads spin-wait for a while
# after each op. Spinning long takes the CPU from other processes on the machine; not spinning
# at all makes every op wake its threads. Spinning briefly keeps them awake within a step and
# asleep between steps: with 2 peers and a client on one 2-core machine, decode ran at 0.74x
# the local engine with OMP_WAIT_POLICY=PASSIVE and 0.92x with this (scripts/bench_swarm.py).
# OpenMP reads it when torch loads, so it is set before that; a value the user set wins.
os.environ.setdefault("GOMP_SPINCOUNT", "20000")

import argparse
import asyncio
import logging
import sys
from pathlib import Path

import torch

from layerswarm.cli.common import (
    ProgressLine,
    default_cache_dir,
    default_config_dir,
    mdns_interfaces,
    read_swarm_key,
    resolve_model_cli,
    route_libp2p_logs,
    run_main,
    runtime_dir,
    setup_logging,
)
from layerswarm.cli.status import add_status_parser, run_status
from layerswarm.peer.config import PeerConfig
from layerswarm.peer.fault_injection import FaultInjector
from layerswarm.peer.server import serve_peer
from layerswarm.shards.config import DTYPES, Span
from layerswarm.shards.device import (
    DeviceUnavailable,
    check_kernels,
    default_dtype,
    resolve_device,
)
from layerswarm.shards.scheduler import DEFAULT_PREFILL_CHUNK, DEFAULT_TOKEN_BUDGET
from layerswarm.swarm.identity import load_or_create_identity
from layerswarm.swarm.limits import ListenLimits
from layerswarm.swarm.transport import new_event_loop


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


def peer_device(spec: str, dtype: str | None, kernels: str) -> tuple[torch.device, str]:
    """`--device`, `--dtype` and `--kernels` checked together: the device and the dtype.

    `--kernels triton` on a CPU turns Triton's interpreter on (TRITON_INTERPRET=1) before any
    kernel module is imported, so the whole Triton path runs on CPU tensors.
    """
    try:
        device = resolve_device(spec)
    except DeviceUnavailable as e:
        raise SystemExit(f"error: --device: {e}") from None
    if kernels == "triton" and device.type == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        check_kernels(kernels, device, os.environ.get("TRITON_INTERPRET") == "1")
    except DeviceUnavailable as e:
        raise SystemExit(f"error: --kernels: {e}") from None
    return device, dtype or default_dtype(device)


def main(argv: list[str] | None = None) -> None:
    run_main(_main, argv)


def _main(argv: list[str] | None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "status":
        return run_status(args)
    setup_logging(args.verbose)
    try:
        span = None if args.layers == "auto" else Span.parse(args.layers)
    except ValueError as e:
        raise SystemExit(f"error: --layers: {e}") from None
    swarm_key = read_swarm_key(args.swarm_key) if args.swarm_key else None
    if swarm_key is not None and args.insecure_plaintext:
        raise SystemExit("error: --swarm-key needs TLS: drop --insecure-plaintext")
    if args.record_ttl <= 0:
        raise SystemExit("error: --record-ttl must be positive")
    if args.bootstrap:
        from layerswarm.swarm.kad_service import check_bootstrap

        try:
            check_bootstrap(args.bootstrap)
        except ValueError as e:
            raise SystemExit(f"error: --bootstrap: {e}") from None
    device, dtype = peer_device(args.device, args.dtype, args.kernels)
    try:
        limits = ListenLimits(
            max_connections=args.max_connections,
            max_connections_per_ip=args.max_connections_per_ip,
            idle_timeout=args.connection_idle_timeout,
        )
        if not args.handshake_timeout > 0 or not 0 < args.max_client_cache_fraction <= 1:
            raise ValueError(
                "--handshake-timeout must be positive, --max-client-cache-fraction in (0, 1]"
            )
        if args.test_fault_injector:
            FaultInjector(args.test_fault_injector)  # a bad SPEC fails here, not at the first step
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    model_dir = resolve_model_cli(args.model, default_cache_dir())
    key_path = args.key or default_config_dir() / "peer.key"
    identity = load_or_create_identity(key_path)
    config = PeerConfig(
        model_dir=model_dir,
        model_name=args.model if "/" not in args.model else model_dir.name,
        span=span,
        host=args.host,
        port=args.port,
        dtype=dtype,
        device=str(device),
        kernels=args.kernels,
        cuda_graphs=not args.no_cuda_graphs,
        gpu_share_dir=runtime_dir() / "gpus",
        quant=args.quant,
        quant_group_size=args.quant_group_size,
        cache_memory_bytes=int(args.cache_memory * 2**20),
        max_session_length=args.max_session_length,
        session_idle_timeout=args.session_idle_timeout,
        step_timeout=args.step_timeout,
        max_batch=args.max_batch,
        token_budget=args.token_budget,
        prefill_chunk=args.prefill_chunk,
        admission_timeout=args.admission_timeout,
        max_sessions_per_client=args.max_sessions_per_client,
        max_client_cache_fraction=args.max_client_cache_fraction,
        limits=limits,
        handshake_timeout=args.handshake_timeout,
        test_faults=args.test_fault_injector,
        memory_budget_bytes=int(args.memory_budget * 2**20),
        rebalance_interval=args.rebalance_interval,
        mdns_interfaces=mdns_interfaces(args.mdns_interface, private=swarm_key is not None),
        key_path=key_path,
        insecure_plaintext=args.insecure_plaintext,
        dht=args.dht,
        bootstrap=tuple(args.bootstrap),
        dht_port=args.dht_port,
        record_ttl=args.record_ttl,
        swarm_key=swarm_key,
    )

    if config.uses_dht:
        route_libp2p_logs(args.verbose)
    if args.metrics_port is not None:
        from layerswarm.metrics import serve_metrics

        try:
            port = serve_metrics(args.metrics_host, args.metrics_port)
        except OSError as e:
            raise SystemExit(f"error: --metrics-port {args.metrics_port}: {e}") from None
        logging.getLogger(__name__).info("metrics at http://%s:%d/metrics", args.metrics_host, port)

    def on_ready(line: str) -> None:
        print(line, flush=True)

    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        runner.run(serve_peer(config, identity, on_ready, ProgressLine(sys.stderr)))


if __name__ == "__main__":
    main()
