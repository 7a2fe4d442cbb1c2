"""layerswarm: run a large language model on a swarm of machines, each serving a span of layers."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["AsyncClient", "Client", "__version__"]


def __getattr__(name: str) -> Any:
    # The client pulls in torch; `import layerswarm` alone stays light (nothing at import time).
    if name in ("Client", "AsyncClient"):
        from layerswarm.routing import client

        return getattr(client, name)
    raise AttributeError(f"module 'layerswarm' has no attribute {name!r}")
