"""`swarm-chat`: chat with a model, locally (`--local`) or through peers.

swarm-chat --local --model smollm2-135m                       # interactive
swarm-chat --local --model M --prompt TEXT --max-new-tokens N --temperature 0   # one shot
swarm-chat --model M --peer HOST:PORT --peer ...              # these peers
swarm-chat --model M --bootstrap /ip4/A/tcp/P/p2p/PEERID      # the peers a DHT knows
swarm-chat --model M                                          # the peers on the LAN (mDNS)
swarm-chat --model M --peer ... --speculate lookup            # several tokens a round trip
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from layerswarm.cli.common import (
    default_cache_dir,
    quiet_logging,
    resolve_model_cli,
    route_libp2p_logs,
    run_main,
    setup_logging,
)
from layerswarm.cli.repl import Chat, Events
from layerswarm.cli.swarm_flags import add_swarm_arguments
from layerswarm.routing.generate import Generator
from layerswarm.routing.local import open_local_generator, parse_dtype
from layerswarm.routing.sampling import SamplingConfig
from layerswarm.routing.text import Message
from layerswarm.shards.device import DeviceUnavailable, default_dtype, resolve_device
from layerswarm.shards.weights import freeze_heap

HELP = "commands: /route, /stats, /system TEXT, /reset, /save FILE, /help, /quit"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="swarm-chat", description="Chat with a model.")
    add_swarm_arguments(ap)
    ap.add_argument("--prompt", help="answer this one prompt, print the reply and exit")
    ap.add_argument("--system", help="a system message to start the conversation with")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument(
        "--max-context",
        type=int,
        default=None,
        metavar="TOKENS",
        help="the longest conversation, in tokens (default: the model's context); peers take "
        "memory for it as it grows",
    )
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--repetition-penalty", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--stop", action="append", default=[], help="a string that ends the reply")
    return ap


def sampling_from(args: argparse.Namespace) -> SamplingConfig:
    try:
        return SamplingConfig(
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            repetition_penalty=args.repetition_penalty,
            seed=args.seed,
            stop=tuple(args.stop),
        )
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def open_generator(
    args: argparse.Namespace, on_event: Callable[[str], None] | None = None
) -> Generator:
    """The generator `args` ask for; `on_event(text)` hears of reroutes and peers leaving."""
    device, dtype = client_device(args)
    model_dir = resolve_model_cli(args.model, default_cache_dir())
    gen = _open_layers(args, model_dir, device, dtype, on_event)
    if args.speculate is not None:
        from layerswarm.routing.drafters import open_speculator

        draft_dir = None
        if args.draft_model is not None:
            draft_dir = resolve_model_cli(args.draft_model, default_cache_dir())
        gen.speculator = open_speculator(
            gen, args.speculate, model_dir, draft_dir, args.draft_quant, dtype
        )
    freeze_heap()  # this process serves this generator from now on
    return gen


def _open_layers(
    args: argparse.Namespace,
    model_dir: Path,
    device: torch.device,
    dtype: torch.dtype,
    on_event: Callable[[str], None] | None,
) -> Generator:
    if args.local:
        return open_local_generator(model_dir, dtype, device=device)
    from layerswarm.cli.common import read_swarm_key
    from layerswarm.errors import PeerUnavailable
    from layerswarm.routing.swarm_client import ClientConfig, open_swarm_generator

    swarm_key = read_swarm_key(args.swarm_key) if args.swarm_key else None
    if swarm_key is not None and args.insecure_plaintext:
        raise SystemExit("error: --swarm-key needs TLS: drop --insecure-plaintext")
    lan_only = not args.peer and not args.bootstrap  # told nothing: look on the LAN
    mdns = tuple(args.mdns_interface or ()) if lan_only or args.mdns_interface else None
    if args.bootstrap:
        route_libp2p_logs(args.verbose)
    if not 0.0 <= args.verify_fraction <= 1.0:
        raise SystemExit("error: --verify-fraction must be between 0 and 1")
    config = ClientConfig(
        insecure_plaintext=args.insecure_plaintext,
        mdns_interfaces=mdns,
        bootstrap=tuple(args.bootstrap),
        swarm_key=swarm_key,
        verify_fraction=args.verify_fraction,
        verify_locally=args.verify_locally,
        push=not args.relay,
    )
    try:
        return open_swarm_generator(
            model_dir, args.peer, dtype=dtype, config=config, on_event=on_event, device=device
        )
    except PeerUnavailable as e:
        if not lan_only:
            raise
        raise SystemExit(
            f"error: no swarm found on the LAN: {e}; use --peer or --bootstrap (or --local)"
        ) from None


def client_device(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    """`--device` and `--dtype`, checked: the device and the dtype (bf16 by default on a GPU)."""
    try:
        device = resolve_device(args.device)
    except DeviceUnavailable as e:
        raise SystemExit(f"error: --device: {e}") from None
    try:
        return device, parse_dtype(args.dtype or default_dtype(device))
    except ValueError as e:
        raise SystemExit(f"error: --dtype: {e}") from None


def close_generator(gen: Generator) -> None:
    """Close what `open_generator` opened: the swarm's connections and the network thread.

    A process must not exit with them running: a daemon thread inside uvloop, zeroconf or
    py-libp2p while the interpreter finalizes can crash it (the `swarm-chat` SIGSEGV, exit -11
    with an empty stderr, once seen in test_mdns_swarm.py under load).
    """
    client = getattr(gen, "client", None)
    if client is not None:
        client.close()
        return
    engine = getattr(gen, "engine", None)
    if engine is not None:
        engine.close()  # its compute loop, not left pending on the loop
    gen.net.stop()


def show(pieces: Iterable[str], events: Events | None = None) -> str:
    """Print pieces as they come; return the whole reply. `events` learns whether a line is
    unfinished, so that a log line or an event printed meanwhile starts a line of its own."""
    reply = []
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
        reply.append(piece)
        if events is not None:
            events.mid_line = not piece.endswith("\n")
    if events is not None:
        events.mid_line = False
    sys.stdout.write("\n")
    sys.stdout.flush()
    return "".join(reply)


def main(argv: list[str] | None = None) -> None:
    run_main(_main, argv)


def _main(argv: list[str] | None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    sampling = sampling_from(args)
    if args.max_context is not None and args.max_context < 2:
        raise SystemExit("error: --max-context must be at least 2 tokens")
    events = Events()
    if not args.verbose:
        quiet_logging(events)
    gen = open_generator(args, on_event=events)
    try:
        if args.prompt is not None:
            messages: list[Message] = (
                [{"role": "system", "content": args.system}] if args.system else []
            )
            show(gen.chat([*messages, {"role": "user", "content": args.prompt}], sampling), events)
            return
        Chat(gen, sampling, args.system, args.max_context, events).run()
    finally:
        close_generator(gen)


if __name__ == "__main__":
    main()
