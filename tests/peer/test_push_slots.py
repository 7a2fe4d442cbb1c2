"""A session's slots for pushed outputs: a long flowing prefill keeps every chunk's, and a
client that never collects cannot pile up finished outputs."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import torch

from layerswarm.peer.forward import KEPT_OUTPUTS, PushSteps


def test_a_flowing_prefill_of_many_chunks_keeps_every_awaited_slot() -> None:
    async def go() -> None:
        push = PushSteps(forwarder=None, collect_timeout=5.0)  # type: ignore[arg-type]
        session = SimpleNamespace(outputs={})
        # 32 chunks, each awaited by its collect before its step ran (an 8,192-token prompt)
        collects = [
            asyncio.ensure_future(push.collect(session, start))  # type: ignore[arg-type]
            for start in range(0, 32 * 256, 256)
        ]
        await asyncio.sleep(0)
        for start in range(0, 32 * 256, 256):
            slot = push._slot(session, start, fresh=True)  # type: ignore[arg-type]
            slot.set_result((torch.ones(1), None))
        done = await asyncio.gather(*collects)
        assert len(done) == 32 and not session.outputs

        # finished outputs nobody collects: the newest KEPT_OUTPUTS stay, and the last one's
        for start in range(100):
            slot = push._slot(session, start, fresh=True)  # type: ignore[arg-type]
            slot.set_result((torch.ones(1), None))
        assert sorted(session.outputs) == list(range(100 - KEPT_OUTPUTS - 1, 100))

    asyncio.run(go())
