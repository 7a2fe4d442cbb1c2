"""Real peer processes on loopback serve the new families: the same greedy tokens as the local
engine.

Two families, chosen so that between them every new part crosses the wire: Qwen3-MoE (Qwen3's
q/k norms, softmax-top-k routing as Mixtral's, a dense layer among sparse ones) and gpt-oss
(sinks, a sliding window that the 32 tokens pass, biases, top-k-softmax routing). Each family's
math on the peers' own path (`forward_flat`, mixed batches) is checked in test_families.py;
four families here would cost ~80 s of peer start-up on a 2-core machine.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from layerswarm.peer.launch import even_spans, start_peers
from layerswarm.routing.local import open_local_generator
from layerswarm.routing.sampling import SamplingConfig
from layerswarm.routing.swarm_client import open_swarm_generator

GREEDY = SamplingConfig(max_new_tokens=12, temperature=0.0)


@pytest.mark.parametrize("kind", ["gpt_oss", "qwen3_moe"])
def test_two_peers_give_the_local_engines_greedy_tokens(
    tiny_family: Callable[[str], Path], kind: str, tmp_path: Path
) -> None:
    model_dir = tiny_family(kind)
    prompt = list(range(40, 60))  # 20 tokens, then 12 more: past gpt-oss's window of 8
    expected = list(open_local_generator(model_dir).tokens(prompt, GREEDY))
    assert len(expected) == 12
    with start_peers(model_dir, even_spans(4, 2), tmp_path) as swarm:
        swarm_gen = open_swarm_generator(model_dir, swarm.addresses)
        assert list(swarm_gen.tokens(prompt, GREEDY)) == expected
