"""A client inside a test namespace (`test_nat_swarm.py`): one greedy chat reply, as JSON.

ip netns exec NS python nat_client.py MODEL_DIR BOOTSTRAP_MULTIADDR QUESTION MAX_TOKENS
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from layerswarm.routing.client_config import ClientConfig
from layerswarm.routing.sampling import SamplingConfig
from layerswarm.routing.swarm_client import open_swarm_generator


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s %(levelname)s %(message)s")
    model_dir, bootstrap, question, max_tokens = sys.argv[1:5]
    config = ClientConfig(connect_timeout=5.0, discovery_timeout=30.0, bootstrap=(bootstrap,))
    gen = open_swarm_generator(Path(model_dir), [], config=config)
    try:
        greedy = SamplingConfig(max_new_tokens=int(max_tokens), temperature=0.0)
        reply = "".join(gen.chat([{"role": "user", "content": question}], greedy))
        links = [str(link.address) for link in gen.client.links]  # type: ignore[attr-defined]
    finally:
        gen.client.close()  # type: ignore[attr-defined]
    print(json.dumps({"reply": reply, "links": links}), flush=True)


if __name__ == "__main__":
    main()
