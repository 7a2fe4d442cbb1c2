"""Loading a peer's span on a CPU: the linears' layouts are measured once, then read back."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from layerswarm.kernels import cpu_tuning
from layerswarm.peer.config import PeerConfig
from layerswarm.peer.load import load_peer_model
from layerswarm.routing.local import open_local_generator
from layerswarm.shards.config import ModelConfig, Span


def test_a_peer_started_twice_reuses_its_cpu_plans(
    tiny_llama_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = PeerConfig(model_dir=tiny_llama_dir, model_name="tiny", cpu_plans_dir=tmp_path)
    model_config = ModelConfig.from_file(tiny_llama_dir)
    with caplog.at_level(logging.INFO, logger="layerswarm.peer.load"):
        first, _ = load_peer_model(config, model_config, Span(0, 2), None)
    kept = json.loads((tmp_path / cpu_tuning.CACHE_FILE).read_text())
    assert len(kept) == 4  # qkv (128 x 64), o_proj, gate_up and down_proj: four shapes
    assert "CPU linear plans:" in caplog.text and "4 timed now, 0 read" in caplog.text

    def no_timing(*args: object) -> None:
        raise AssertionError("timed again")

    monkeypatch.setattr(cpu_tuning, "time_candidates", no_timing)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="layerswarm.peer.load"):
        second, _ = load_peer_model(config, model_config, Span(0, 2), None)
    assert "0 timed now, 4 read" in caplog.text
    x = torch.randn(1, 5, model_config.hidden_size)
    cache_a, cache_b = first.new_cache(8), second.new_cache(8)
    a, b = cache_a.allocate(8), cache_b.allocate(8)
    assert torch.equal(first(x, [0], cache_a, [a]), second(x, [0], cache_b, [b]))
    fixed, _ = load_peer_model(replace(config, cpu_plans="fixed"), model_config, Span(0, 2), None)
    assert fixed is not None  # the fixed rule reads nothing and times nothing


def test_the_local_engine_reads_the_plans_a_peer_kept(
    smollm2_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = PeerConfig(model_dir=smollm2_dir, model_name="smollm2", cpu_plans_dir=tmp_path)
    load_peer_model(config, ModelConfig.from_file(smollm2_dir), Span(0, 1), None)

    def no_timing(*args: object) -> None:
        raise AssertionError("timed again")

    monkeypatch.setattr(cpu_tuning, "time_candidates", no_timing)
    gen = open_local_generator(smollm2_dir, cpu_plans_dir=tmp_path)  # the same bits
    gen.engine.close()  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="CPU plan mode"):
        open_local_generator(smollm2_dir, cpu_plans="guess")
