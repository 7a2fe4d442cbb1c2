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

import torch

from layerswarm.cli.common import (
    ProgressLine,
    default_cache_dir,
    quiet_logging,
    route_libp2p_logs,
    run_main,
    setup_logging,
)
from layerswarm.cli.config_flags import config_from_args
from layerswarm.cli.repl import Chat, Events
from layerswarm.cli.swarm_flags import add_swarm_arguments
from layerswarm.routing.client_config import ClientConfig
from layerswarm.routing.generate import Generator
from layerswarm.routing.local import parse_dtype
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
    """The generator `args` ask for, built through `Client.connect` (the one front door);
    `on_event(text)` hears of reroutes and peers leaving."""
    from layerswarm.errors import PeerUnavailable
    from layerswarm.routing.client import Client

    client_device(args)  # a wrong --device or --dtype is told as such, before any work
    lan_only = not args.local and not args.peer and not args.bootstrap  # told nothing: the LAN
    try:
        client = Client.connect(
            args.model,
            peers=args.peer,
            bootstrap=args.bootstrap,
            local=args.local,
            dtype=args.dtype,
            device=args.device,
            cache_dir=default_cache_dir(),
            speculate=args.speculate,
            draft_model=args.draft_model,
            draft_quant=args.draft_quant,
            config=None if args.local else client_config(args, lan_only),
            on_event=on_event,
            progress=ProgressLine(),
        )
    except PeerUnavailable as e:
        if not lan_only:
            raise
        raise SystemExit(
            f"error: no swarm found on the LAN: {e}; use --peer or --bootstrap (or --local)"
        ) from None
    freeze_heap()  # this process serves this generator from now on
    return client.generator


def client_config(args: argparse.Namespace, lan_only: bool) -> ClientConfig:
    """The `ClientConfig` that the swarm flags of `args` ask for."""
    from layerswarm.cli.common import read_swarm_key

    swarm_key = read_swarm_key(args.swarm_key) if args.swarm_key else None
    if swarm_key is not None and args.insecure_plaintext:
        raise SystemExit("error: --swarm-key needs TLS: drop --insecure-plaintext")
    mdns = tuple(args.mdns_interface or ()) if lan_only or args.mdns_interface else None
    if args.bootstrap:
        route_libp2p_logs(args.verbose)
    flag_names = {"verify_fraction": "--verify-fraction"}
    return config_from_args(
        ClientConfig,
        args,
        flag_names,
        insecure_plaintext=args.insecure_plaintext,
        mdns_interfaces=mdns,
        bootstrap=tuple(args.bootstrap),
        swarm_key=swarm_key,
        verify_fraction=args.verify_fraction,
        verify_locally=args.verify_locally,
        push=not args.relay,
    )


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
    """Close what `open_generator` opened (`Client.close`): the swarm's connections, or the
    local engine, and the network thread."""
    from layerswarm.routing.client import Client

    Client(gen).close()


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
