"""A verifier's shadow session: a replica's (or this client's own) run of a hop's span."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from layerswarm.routing.paths import PeerView
from layerswarm.shards.config import Span

LOCAL = "local"  # the peer ID that this client's own computation goes by in checks


@dataclass
class Shadow:
    """A verifier's session on a replica (or in this client): fed the hop's inputs when a check
    needs them."""

    run: Callable[[torch.Tensor, int], Awaitable[torch.Tensor]]  # one step: (hidden, start)
    close: Callable[[], Awaitable[None]]
    fed: int = 0  # unit: tokens of context it holds
    last: tuple[int, int, torch.Tensor] | None = None  # (start, tokens, output) of its last step


class LocalChecker(Protocol):
    """This client's own computation of spans, to check peers on (`verify_local.LocalSpans`)."""

    def view(self, span: Span) -> PeerView: ...

    async def open_shadow(self, span: Span, max_length: int) -> Shadow: ...
