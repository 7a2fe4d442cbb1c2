"""A peer's push to the next hop of a route (`peer/forward.py`), without a model."""

from __future__ import annotations

import asyncio

import pytest
import torch

from layerswarm.errors import RemoteError
from layerswarm.peer.forward import Forwarder
from layerswarm.swarm.identity import generate_identity
from layerswarm.swarm.messages import ErrorCode, PushHop, Step
from layerswarm.swarm.push import parse_forward_failure
from layerswarm.swarm.transport import TransportConfig


def test_a_push_failing_at_a_relayed_hop_names_that_hops_peer_not_its_relay() -> None:
    """The client blames the hop the error names; a relayed address names its relay's ID
    first (`host:port/RELAYID/p2p-circuit/PEERID`), and the hop is the last ID."""
    relay, target = generate_identity().peer_id, generate_identity().peer_id
    hop = PushHop(f"127.0.0.1:9/{relay}/p2p-circuit/{target}", "s1", b"t" * 32)
    step = Step("s0", torch.zeros(1, 1, 8), 0, route=(hop,))
    out = (torch.zeros(1, 1, 8), None)

    async def main() -> None:
        forwarder = Forwarder(generate_identity(), TransportConfig(connect_timeout=1.0), 2.0)
        sent = asyncio.get_running_loop().create_future()
        try:
            with pytest.raises(RemoteError) as info:
                await forwarder.push(step, out, sent)
        finally:
            await forwarder.aclose()
        assert info.value.code == ErrorCode.FORWARD_FAILED
        peer_id, code, _ = parse_forward_failure(info.value.message)
        assert (peer_id, code) == (target, "unreachable")

    asyncio.run(main())
