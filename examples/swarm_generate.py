"""Start two peers on this machine, then generate through them, with the sync and async APIs."""

import asyncio
import tempfile
from pathlib import Path

from layerswarm import AsyncClient, Client
from layerswarm.peer.launch import even_spans, start_peers
from layerswarm.shards.registry import resolve_model

model_dir = resolve_model("smollm2-135m", Path.home() / ".cache" / "layerswarm")
with (
    tempfile.TemporaryDirectory() as tmp,
    start_peers(model_dir, even_spans(30, 2), Path(tmp)) as swarm,
):
    print("peers:", ", ".join(f"{p.span} at {p.address}" for p in swarm.peers))
    with Client.connect(peers=swarm.addresses, temperature=0, max_new_tokens=32) as client:
        print(client.generate("What is the capital of France?"))

    async def main() -> None:
        client = await AsyncClient.connect(peers=swarm.addresses, temperature=0, max_new_tokens=32)
        async for piece in client.stream("What is the capital of Germany?"):
            print(piece, end="", flush=True)
        print()
        await client.close()

    asyncio.run(main())
