"""A NAT test agent: one peer's swarm layer (no model) inside a namespace, run by `test_nat.py`.

    ip netns exec NS python nat_agent.py serve HOST [--reach-peer A] [--relay on|off|auto] [--upnp]
    ip netns exec NS python nat_agent.py dial ADDRESS [--punch] [--requests N]

`serve` listens on HOST (port 0), runs `Traversal.start` and prints one JSON line: its address,
reachability, announced addresses and relay port; it answers `InfoRequest`s until stdin closes
or a SIGTERM comes (then it prints its traversal's summary, relay and hole punches, and closes
it: reservations, relay, UPnP mapping).
`dial` dials ADDRESS (relayed or direct; with `--punch`, then a hole punch), asks for the peer's
info N times (1), and prints `{"ok": true, "peer_id": ..., "via": ...}` (via: where the
connection goes, a relayed address unless punched) or `{"ok": false, "error": ...}`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import threading

from layerswarm.errors import LayerswarmError, RemoteError
from layerswarm.swarm.dial import open_connection
from layerswarm.swarm.identity import generate_identity
from layerswarm.swarm.listen import ConnectionInfo, serve_connections
from layerswarm.swarm.messages import ErrorCode, InfoReply, InfoRequest, Message
from layerswarm.swarm.punch import open_punched
from layerswarm.swarm.transport import TransportConfig, new_event_loop, parse_address
from layerswarm.swarm.traversal import NatConfig, Traversal

TRANSPORT = TransportConfig(connect_timeout=3.0, handshake_timeout=5.0, request_timeout=10.0)
IDENTITY = generate_identity()


async def answer(conn: ConnectionInfo, msg: Message) -> Message:
    if isinstance(msg, InfoRequest):
        return InfoReply(IDENTITY.peer_id, "agent", 0, 1, 1, "float32", 0, 0, 0, {})
    raise RemoteError(ErrorCode.PROTOCOL, f"unexpected {type(msg).__name__}")


async def serve(args: argparse.Namespace) -> None:
    config = NatConfig(
        reach_peers=tuple(args.reach_peer), relay=args.relay, retry_interval=1.0, upnp=args.upnp
    )
    traversal = Traversal(config, IDENTITY, TRANSPORT, args.host)
    server = await serve_connections(traversal.handler(answer), args.host, 0, IDENTITY, TRANSPORT)
    local = f"{args.host}:{server.port}"
    await traversal.start(server, [local], server.port, list)
    info = {
        "address": f"{local}/{IDENTITY.peer_id}",
        "peer_id": IDENTITY.peer_id,
        "status": traversal.status,
        "addresses": list(traversal.addresses),
        "relay_port": traversal.relay.port if traversal.relay is not None else 0,
        "observed": traversal.reachability.observed_host if traversal.reachability else None,
        "mapped": traversal.mapped,
        "mapped_by": traversal.mapped_by,
    }
    print(json.dumps(info), flush=True)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    reader = threading.Thread(
        target=lambda: (sys.stdin.read(), loop.call_soon_threadsafe(stop.set))
    )
    reader.daemon = True  # a SIGTERM ends the agent while the thread still reads
    reader.start()
    async with asyncio.TaskGroup() as tasks:
        keeper = tasks.create_task(traversal.serve())
        await stop.wait()  # until the test closes stdin, or sends SIGTERM
        print(json.dumps(traversal.summary()), flush=True)
        keeper.cancel()
    server.close()
    await server.wait_closed()


async def dial(args: argparse.Namespace) -> None:
    try:
        address, identity = parse_address(args.address), generate_identity()
        opened = open_punched if args.punch else open_connection
        async with await opened(address, identity, TRANSPORT) as conn:
            for _ in range(args.requests):
                reply = await conn.request(InfoRequest())
                assert isinstance(reply, InfoReply)
        print(json.dumps({"ok": True, "peer_id": conn.peer_id, "via": str(conn.address)}))
    except LayerswarmError as exc:
        print(json.dumps({"ok": False, "error": f"{type(exc).__name__}: {exc}"}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve")
    s.add_argument("host")
    s.add_argument("--reach-peer", action="append", default=[])
    s.add_argument("--relay", default="auto")
    s.add_argument("--upnp", action="store_true")
    d = sub.add_parser("dial")
    d.add_argument("address")
    d.add_argument("--punch", action="store_true")
    d.add_argument("--requests", type=int, default=1)
    args = ap.parse_args()
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        runner.run(serve(args) if args.command == "serve" else dial(args))


if __name__ == "__main__":
    main()
