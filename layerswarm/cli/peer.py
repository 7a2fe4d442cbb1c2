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

import asyncio
import dataclasses
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
from layerswarm.cli.config_flags import config_from_args
from layerswarm.cli.peer_args import build_parser
from layerswarm.cli.status import run_status
from layerswarm.peer.config import PeerConfig
from layerswarm.peer.server import serve_peer
from layerswarm.shards.device import (
    DeviceUnavailable,
    check_kernels,
    default_dtype,
    resolve_device,
)
from layerswarm.swarm.identity import load_or_create_identity
from layerswarm.swarm.transport import new_event_loop


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


# The flags behind the fields `_main` sets itself, to name them in errors.
GIVEN_FLAGS = {
    "swarm_key": "--swarm-key",
    "mdns_interfaces": "--mdns-interface",
    "dtype": "--dtype",
}


def main(argv: list[str] | None = None) -> None:
    run_main(_main, argv)


def _main(argv: list[str] | None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "status":
        return run_status(args)
    setup_logging(args.verbose)
    swarm_key = read_swarm_key(args.swarm_key) if args.swarm_key else None
    device, dtype = peer_device(args.device, args.dtype, args.kernels)
    key_path = args.key_path or default_config_dir() / "peer.key"
    config = config_from_args(  # checked before the model is resolved (maybe downloaded)
        PeerConfig,
        args,
        GIVEN_FLAGS,
        model_dir=Path(args.model),
        model_name=args.model,
        dtype=dtype,
        device=str(device),
        gpu_share_dir=runtime_dir() / "gpus",
        mdns_interfaces=mdns_interfaces(args.mdns_interface, private=swarm_key is not None),
        key_path=key_path,
        swarm_key=swarm_key,
    )
    model_dir = resolve_model_cli(args.model, default_cache_dir())
    name = args.model if "/" not in args.model else model_dir.name
    config = dataclasses.replace(
        config,
        model_dir=model_dir,
        model_name=name,
        cpu_plans_dir=config.cpu_plans_dir or default_cache_dir(),
    )
    identity = load_or_create_identity(key_path)

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
