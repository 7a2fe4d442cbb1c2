"""One DHT node in its own process, driven over stdin/stdout by tests/swarm/test_dht.py.

Usage: python tests/swarm/dht_node.py, then one JSON request a line on stdin, one JSON reply a
line on stdout. The first request starts the node (so that a test can launch every process at
once and let their imports overlap, before it knows the bootstrap address):
  {"op": "start", "bootstrap": [multiaddr], "swarm_key": hex|null, "config": {DhtConfig}}
                                          -> {"ok": true, "multiaddr": "/ip4/127.0.0.1/..."}
  {"op": "put", "key": k, "value": hex}   -> {"ok": true}
  {"op": "get", "key": k}                 -> {"ok": true, "records": {peer_id: hex}}
  {"op": "close"}                         -> {"ok": true}, then the process exits
Errors answer {"ok": false, "error": "..."}; end of input closes the node too. The node listens
on 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from typing import Any

from layerswarm.swarm.dht import DhtConfig, DhtNode
from layerswarm.swarm.identity import generate_identity


async def start(request: dict[str, Any]) -> DhtNode:
    swarm_key = request.get("swarm_key")
    return await DhtNode.start(
        generate_identity(),
        listen_host="127.0.0.1",
        bootstrap=request.get("bootstrap", []),
        swarm_key=bytes.fromhex(swarm_key) if swarm_key else None,
        config=DhtConfig(**request.get("config", {})),
    )


async def handle(node: DhtNode, request: dict[str, Any]) -> dict[str, Any]:
    op = request["op"]
    if op == "put":
        await node.put_record(request["key"], bytes.fromhex(request["value"]))
        return {"ok": True}
    if op == "get":
        records = await node.get_records_by_peer(request["key"])
        return {"ok": True, "records": {peer: value.hex() for peer, value in records.items()}}
    if op == "close":
        return {"ok": True}
    return {"ok": False, "error": f"unknown op {op!r}"}


async def serve() -> None:
    loop = asyncio.get_running_loop()
    node: DhtNode | None = None
    try:
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            request = json.loads(line)
            try:
                if node is None:
                    node = await start(request)
                    reply = {"ok": True, "multiaddr": node.multiaddr}
                else:
                    reply = await handle(node, request)
            except Exception as exc:
                reply = {"ok": False, "error": repr(exc)}
            print(json.dumps(reply), flush=True)
            if request["op"] == "close":
                break
    finally:
        if node is not None:
            await node.close()


def main() -> None:
    # py-libp2p logs warnings and errors for every dead peer it meets, through Python's
    # last-resort handler (importing libp2p detaches its logger from the root): keep them out.
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    logging.getLogger("libp2p").setLevel(logging.CRITICAL)
    asyncio.run(serve())


if __name__ == "__main__":
    main()
