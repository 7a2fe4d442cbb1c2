"""A client inside a test namespace (`test_nat_swarm.py`): one greedy chat reply, as JSON.

ip netns exec NS python nat_client.py MODEL_DIR BOOTSTRAPS QUESTION MAX_TOKENS [pause]

BOOTSTRAPS: multiaddrs, comma-separated.

With `pause`, it prints `{"first": ..., "links": [...]}` after the first piece of the reply and
waits for a line on stdin before going on (the test kills a relay in between).

The last line also has `reach` (peer ID -> direct, relayed or punched, `PeerLink.reach`) and
`nat` (peer ID -> the "nat" summary of its info, asked after the reply: relay byte counters).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

from layerswarm.routing.client_config import ClientConfig
from layerswarm.routing.sampling import SamplingConfig
from layerswarm.routing.swarm_client import open_swarm_generator
from layerswarm.swarm.protocol import InfoReply, InfoRequest


async def nat_summaries(links: list[Any]) -> dict[str, Any]:
    """Each live link's peer's "nat" summary, asked now (its relay's counters are fresh)."""
    found: dict[str, Any] = {}
    for link in links:
        if link.live:
            info = await link.conn.request(InfoRequest())
            if isinstance(info, InfoReply):
                found[link.conn.peer_id] = info.extra.get("nat")
    return found


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s %(levelname)s %(message)s")
    model_dir, bootstrap, question, max_tokens = sys.argv[1:5]
    pause = sys.argv[5:6] == ["pause"]
    bootstraps = tuple(bootstrap.split(","))
    config = ClientConfig(connect_timeout=5.0, discovery_timeout=30.0, bootstrap=bootstraps)
    gen = open_swarm_generator(Path(model_dir), [], config=config)
    try:
        greedy = SamplingConfig(max_new_tokens=int(max_tokens), temperature=0.0)
        pieces: list[str] = []
        for piece in gen.chat([{"role": "user", "content": question}], greedy):
            if pause and not pieces:
                links = [str(link.address) for link in gen.client.links]  # type: ignore[attr-defined]
                print(json.dumps({"first": piece, "links": links}), flush=True)
                sys.stdin.readline()
            pieces.append(piece)
        reply = "".join(pieces)
        client: Any = gen.client  # type: ignore[attr-defined]
        links = [str(link.address) for link in client.links]
        reach = {link.conn.peer_id: link.reach for link in client.links if link.live}
        nat = client.net.run(nat_summaries(client.links))
    finally:
        gen.client.close()  # type: ignore[attr-defined]
    print(json.dumps({"reply": reply, "links": links, "reach": reach, "nat": nat}), flush=True)


if __name__ == "__main__":
    main()
