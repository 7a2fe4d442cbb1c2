"""`swarm-peer status --serve PORT`: the web dashboard over the swarm's records, without an API."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import time
from contextlib import AsyncExitStack

from starlette.applications import Starlette

from layerswarm.cli.api_server import ApiConfig, serve_app
from layerswarm.cli.dashboard import RecordSource, dashboard_routes
from layerswarm.cli.status import RecordPlaces, open_record_sources
from layerswarm.swarm.discovery import merged
from layerswarm.swarm.records import PeerRecord

READY_PREFIX = "LAYERSWARM-DASHBOARD-READY "  # then one line of JSON: host, port, url
DHT_REREAD_S = 5.0  # unit: s between two DHT reads (a page polls every 2 s)


async def serve_dashboard(
    args: argparse.Namespace, where: RecordPlaces, model: str, num_layers: int
) -> None:
    """Serve the dashboard on `args.host:args.serve` until SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with AsyncExitStack() as stack:
        sources, lookups = await open_record_sources(stack, where)
        last_read = 0.0

        async def read() -> list[PeerRecord]:
            nonlocal last_read
            if lookups and time.monotonic() - last_read > DHT_REREAD_S:
                last_read = time.monotonic()
                await asyncio.gather(*(lookup.refresh() for lookup in lookups))
            return merged(sources, where.model_hash)

        source = RecordSource(read, model or (where.model_hash or "every model"), num_layers)
        app = Starlette(routes=dashboard_routes(source))
        key = args.api_key or os.environ.get("LAYERSWARM_API_KEY") or None

        def on_ready(host: str, port: int) -> None:
            url = f"http://{host}:{port}/"
            print(READY_PREFIX + json.dumps({"host": host, "port": port, "url": url}), flush=True)

        await serve_app(app, ApiConfig(api_key=key), args.host, args.serve, on_ready, stop)
