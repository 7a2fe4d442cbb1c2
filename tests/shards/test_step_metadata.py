"""A step's metadata, built once a step: RoPE tables, write slots, block tables, lengths.

What the CUDA-graph path of a GPU peer reads (`shards.cuda_graphs`) is checked here on the CPU
against what the eager path builds; the graphs themselves run only on a GPU
(`scripts/gpu_check.sh`).
"""

from __future__ import annotations

import pytest
import torch

from layerswarm.shards.blocks import Rotary, SpanModel, StepBatch
from layerswarm.shards.config import ModelConfig, MoEConfig, RopeScaling, Span
from layerswarm.shards.cuda_graphs import capturable, step_metadata, table_width
from layerswarm.shards.kv_cache import PagedKVCache

LLAMA3 = RopeScaling(
    factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
)


@pytest.mark.parametrize(
    "config",
    [
        ModelConfig(head_dim=64, rope_theta=100000.0, max_position_embeddings=8192),
        ModelConfig(head_dim=128, rope_theta=500000.0, rope_scaling=LLAMA3),
        ModelConfig(head_dim=24, max_position_embeddings=40),  # positions past the limit too
    ],
)
def test_rope_tables_hold_the_bits_of_each_positions_own_angles(config: ModelConfig) -> None:
    rotary = Rotary(config, positions=16)
    positions = torch.tensor([0, 1, 15, 16, 17, 300, 299, 5, 4095, 70])  # grows the tables
    cos, sin = rotary.cos_sin(positions)
    want_cos, want_sin = rotary.angles(positions)
    assert torch.equal(cos, want_cos) and torch.equal(sin, want_sin)
    assert cos.dtype == torch.float32 and cos.shape == (10, config.head_dim)
    assert rotary.cos.shape[0] >= 4096


def test_rope_tables_grow_by_doubling_and_never_shrink() -> None:
    rotary = Rotary(ModelConfig(head_dim=16, max_position_embeddings=1000), positions=100)
    assert rotary.cos.shape[0] == 100
    rotary.reserve(101)
    assert rotary.cos.shape[0] == 200
    rotary.reserve(50)
    assert rotary.cos.shape[0] == 200
    rotary.reserve(900)  # doubling would pass the model's limit: just what is asked
    assert rotary.cos.shape[0] == 900
    rotary.reserve(5000)  # past the limit when asked (positions are checked elsewhere)
    assert rotary.cos.shape[0] == 5000


@pytest.mark.parametrize(
    ("pages", "width"), [(1, 4), (4, 4), (5, 8), (8, 8), (9, 16), (100, 128), (512, 512)]
)
def test_graph_tables_round_the_width_up_to_a_power_of_two(pages: int, width: int) -> None:
    assert table_width(pages) == width


def sessions_in_a_fragmented_pool() -> tuple[PagedKVCache, StepBatch]:
    """Three decoding sessions whose pages interleave (runs of one page each)."""
    cache = PagedKVCache(2, 2, 8, num_pages=24, page_size=4)
    a, b, c = (cache.open_session(64) for _ in range(3))
    for length in (4, 8, 12):  # they grow in turns: their pages interleave
        for s in (a, b, c):
            cache.grow(s, length)
    cache.grow(b, 13)
    for s, n in ((a, 10), (b, 13), (c, 3)):
        s.length = n
    return cache, StepBatch([10, 12, 3], [1, 1, 1], [a, b, c])


def test_graph_metadata_matches_what_the_eager_step_builds() -> None:
    cache, batch = sessions_in_a_fragmented_pool()
    eager = cache.step_slots(batch.sessions, batch.starts, batch.counts, paged=True)
    assert eager.decode_rows is None  # every segment decodes: no rows to pick
    assert eager.table is not None and eager.lengths is not None
    width = table_width(eager.table.shape[1])
    meta = step_metadata(cache, batch, width)
    n = 3
    assert meta.dtype == torch.int32 and meta.shape == (n * (3 + width),)
    assert torch.equal(meta[:n].long(), eager.slots)
    assert meta[n : 2 * n].tolist() == batch.starts
    assert torch.equal(meta[2 * n : 3 * n], eager.lengths)
    table = meta[3 * n :].view(n, width)
    assert torch.equal(table[:, : eager.table.shape[1]], eager.table)
    assert not table[:, eager.table.shape[1] :].any()  # padding: page 0, never read


def test_graph_metadata_refuses_prefill_segments_and_narrow_tables() -> None:
    cache, batch = sessions_in_a_fragmented_pool()
    with pytest.raises(ValueError, match="one token a session"):
        step_metadata(cache, StepBatch([8], [2], [batch.sessions[0]]), 4)
    with pytest.raises(ValueError, match="do not fit a table of 2"):
        step_metadata(cache, batch, 2)


def test_a_mixed_step_names_the_rows_of_its_decode_tokens() -> None:
    cache, batch = sessions_in_a_fragmented_pool()
    a, b, c = batch.sessions
    step = cache.step_slots([a, b, c], [10, 9, 3], [1, 4, 1], paged=True)
    assert step.decode_rows is not None and step.lengths is not None and step.table is not None
    assert step.decode_rows.tolist() == [0, 5]  # a's token, then c's after b's four
    assert step.lengths.tolist() == [11, 4]
    assert step.table.tolist() == cache.block_tables([a, c]).tolist()
    assert cache.step_slots([b], [9], [4], paged=True).table is None  # no decode token
    assert cache.step_slots([a], [10], [1]).table is None  # not asked (the CPU path)


@pytest.mark.parametrize(
    ("config", "graphs"),
    [
        (ModelConfig(hidden_size=64, head_dim=16, num_heads=4, num_kv_heads=2), True),
        (ModelConfig(hidden_size=64, head_dim=16, num_heads=4, qk_norm=True), True),
        (ModelConfig(hidden_size=64, head_dim=16, num_heads=4, moe=MoEConfig()), False),
        (ModelConfig(hidden_size=64, head_dim=16, num_heads=4, attention_sinks=True), False),
        (ModelConfig(hidden_size=64, head_dim=16, num_heads=4, sliding_window=8), False),
    ],
)
def test_graphs_are_only_for_decode_steps_that_do_no_host_work(
    config: ModelConfig, graphs: bool
) -> None:
    with torch.device("meta"):
        model = SpanModel(config, Span(0, 2))
    assert capturable(model) is graphs
