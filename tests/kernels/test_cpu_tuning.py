"""Choosing CPU linear plans by timing: every candidate gives the reference's outputs, the pick
follows the times, and the choices are kept per CPU model, torch version and shape."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from layerswarm.kernels import cpu_tuning
from layerswarm.kernels.cpu_linear import ArenaLinear, LinearPlan, PackedLinear, pack_linears
from layerswarm.kernels.cpu_tuning import Machine, Tuner, TuningConfig, cache_key, candidates, pick

QUICK = TuningConfig(rounds=1, rows=3, prefill_rows=6, pool_bytes=1 << 16)
HERE = Machine("Test CPU [0]", "2.13.0", 2)


def linears(dtype: torch.dtype, n: int = 3, bias: bool = True) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(40, 128, bias=bias) for _ in range(n)]).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_candidate_gives_the_references_outputs(dtype: torch.dtype) -> None:
    model = linears(dtype)
    lin = model[0]
    x = torch.randn(9, 40, dtype=dtype)
    ref = lin(x)
    tol = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 3e-3}[dtype]
    bag_outputs: list[torch.Tensor] = []
    plans = candidates(dtype, 128, threads=2)
    assert ("onednn" in plans) == (dtype == torch.bfloat16 and cpu_tuning._onednn())
    for name, plan in plans.items():
        full = LinearPlan(plan.layout, plan.bags * 5)  # bags, if any, for 1..5 tokens
        laid = pack_linears(copy.deepcopy(model), lambda _w, _b, p=full: p)[0]
        assert isinstance(laid, PackedLinear if plan.layout == "onednn" else ArenaLinear)
        for rows in (1, 2, 3, 5, 9):
            got = laid(x[:rows])
            torch.testing.assert_close(got.float(), ref[:rows].float(), rtol=tol, atol=tol)
        if plan.bags:  # the bag GEMVs: the same bits for any block count, alone or batched
            alone = torch.cat([laid(x[i : i + 1]) for i in range(5)])
            assert torch.equal(laid(x[:5]), alone), name
            bag_outputs.append(alone)
    assert len(bag_outputs) == (0 if dtype == torch.float16 else 3)  # 1, 2 and 8 blocks
    assert all(torch.equal(b, bag_outputs[0]) for b in bag_outputs)


def test_the_cache_key_changes_with_the_cpu_model_torch_version_threads_and_shape() -> None:
    base = cache_key(HERE, torch.float32, 96, 40)
    others = [
        cache_key(Machine("Other CPU [0]", "2.13.0", 2), torch.float32, 96, 40),
        cache_key(Machine("Test CPU [1]", "2.13.0", 2), torch.float32, 96, 40),  # other flags
        cache_key(Machine("Test CPU [0]", "2.14.0", 2), torch.float32, 96, 40),
        cache_key(Machine("Test CPU [0]", "2.13.0", 4), torch.float32, 96, 40),
        cache_key(HERE, torch.bfloat16, 96, 40),
        cache_key(HERE, torch.float32, 40, 96),
    ]
    assert len({base, *others}) == 7
    assert cache_key(Machine("Test CPU [0]", "2.13.0", 2), torch.float32, 96, 40) == base
    assert cpu_tuning.cpu_model() == cpu_tuning.cpu_model()  # stable on one machine


def test_a_second_load_reuses_the_cached_choices_without_timing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = TuningConfig(**{**QUICK.__dict__, "cache_dir": tmp_path})
    first = Tuner(config, HERE)
    model = nn.Sequential(linears(torch.float32), nn.Linear(40, 24))  # two shapes
    x = torch.randn(2, 40)
    want = model[1](x)
    pack_linears(model, first)
    assert first.timed == 2 and len(first.report()) == 2
    torch.testing.assert_close(model[1](x), want)
    saved = json.loads((tmp_path / cpu_tuning.CACHE_FILE).read_text())
    assert sorted(saved) == sorted(first.chosen)

    def no_timing(*args: object) -> None:
        raise AssertionError("timed again")

    monkeypatch.setattr(cpu_tuning, "time_candidates", no_timing)
    second = Tuner(config, HERE)
    pack_linears(nn.Sequential(linears(torch.float32), nn.Linear(40, 24)), second)
    assert second.timed == 0 and second.chosen == first.chosen
    monkeypatch.undo()
    elsewhere = Tuner(config, Machine("Other CPU [0]", "2.13.0", 2))  # another CPU: measured
    pack_linears(linears(torch.float32), elsewhere)
    assert elsewhere.timed == 1
    assert len(json.loads((tmp_path / cpu_tuning.CACHE_FILE).read_text())) == 3


def test_a_damaged_cache_file_is_measured_again(tmp_path: Path) -> None:
    (tmp_path / cpu_tuning.CACHE_FILE).write_text("{not json")
    tuner = Tuner(TuningConfig(**{**QUICK.__dict__, "cache_dir": tmp_path}), HERE)
    pack_linears(linears(torch.float32, n=1), tuner)
    assert tuner.timed == 1


INF = float("inf")


@pytest.mark.parametrize(
    ("times", "want"),
    [
        # the bags win at 1 and 2 tokens, F.linear at 3: bags for 1..2, blocks by time
        (
            {"rows": [9, 9, 9, 50], "trans": [8, 8, 8, 50], "bags1": [5, 5, 9, INF],
             "bags2": [3, 6, 9, INF]},
            LinearPlan("trans", (2, 1)),
        ),
        # bags lose at 1 token: none at all, even where they would win at 2
        ({"rows": [9, 9, 9, 50], "trans": [8, 8, 8, 50], "bags1": [8, 1, 1, INF]},
         LinearPlan("trans")),
        # the rows' layout is fastest
        ({"rows": [2, 2, 2, 50], "trans": [8, 8, 8, 50], "bags1": [5, 5, 5, INF]},
         LinearPlan("rows")),
        # oneDNN's few-token GEMVs are fastest, but its prefill is too slow
        ({"rows": [9, 9, 9, 50], "trans": [8, 8, 8, 50], "onednn": [1, 1, 1, 70]},
         LinearPlan("trans")),
        ({"rows": [9, 9, 9, 50], "trans": [8, 8, 8, 50], "onednn": [1, 1, 1, 60]},
         LinearPlan("onednn")),
    ],
)  # fmt: skip
def test_the_pick_follows_the_times(times: dict[str, list[float]], want: LinearPlan) -> None:
    assert pick(times, rows=3) == want


def test_a_plan_is_checked() -> None:
    with pytest.raises(ValueError, match="layout"):
        LinearPlan("diagonal")
    with pytest.raises(ValueError, match="bags"):
        LinearPlan("rows", (1,))
    lin = pack_linears(nn.Sequential(nn.Linear(8, 6)), lambda _w, _b: LinearPlan("trans"))[0]
    with pytest.raises(ValueError, match="blocks"):
        lin.set_weight(lin.weight, (4,))  # 6 outputs do not split in 4


def test_a_cached_plan_no_longer_offered_is_measured_again(tmp_path: Path) -> None:
    key = cache_key(HERE, torch.float32, 128, 40)
    kept = {key: {"layout": "onednn", "bags": []}}  # fp32 oneDNN: once a candidate, now not
    (tmp_path / cpu_tuning.CACHE_FILE).write_text(json.dumps(kept))
    tuner = Tuner(TuningConfig(**{**QUICK.__dict__, "cache_dir": tmp_path}), HERE)
    pack_linears(linears(torch.float32, n=1), tuner)
    assert tuner.timed == 1 and tuner.chosen[key].layout != "onednn"


def test_two_tuners_sharing_a_folder_keep_each_others_choices(tmp_path: Path) -> None:
    config = TuningConfig(**{**QUICK.__dict__, "cache_dir": tmp_path})
    a, b = Tuner(config, HERE), Tuner(config, HERE)  # both read the (empty) file first
    pack_linears(linears(torch.float32, n=1), a)
    pack_linears(nn.Sequential(nn.Linear(40, 24)), b)
    assert len(json.loads((tmp_path / cpu_tuning.CACHE_FILE).read_text())) == 2


def test_a_tuner_reads_what_another_timed_since_it_started(tmp_path: Path) -> None:
    config = TuningConfig(**{**QUICK.__dict__, "cache_dir": tmp_path})
    a, b = Tuner(config, HERE), Tuner(config, HERE)  # two peers starting together
    pack_linears(linears(torch.float32, n=1), a)
    pack_linears(linears(torch.float32, n=1), b)
    assert (a.timed, b.timed) == (1, 0) and b.chosen == a.chosen  # the same bits on both
    assert "0 timed now, 1 read" in b.summary() and str(tmp_path) in b.summary()


def test_another_thread_count_keeps_the_bits_of_the_first_choice(tmp_path: Path) -> None:
    config = TuningConfig(**{**QUICK.__dict__, "cache_dir": tmp_path})
    key = cache_key(HERE, torch.float32, 128, 40)
    first = LinearPlan("trans", (1, 1))  # bags for 1 and 2 tokens: F.linear from 3
    (tmp_path / cpu_tuning.CACHE_FILE).write_text(
        json.dumps({key: {"layout": "trans", "bags": [1, 1]}})
    )
    four = Tuner(config, Machine(HERE.cpu, HERE.torch_version, 4))
    pack_linears(linears(torch.float32, n=1), four)
    (plan,) = four.chosen.values()
    assert four.timed == 1  # the blocks, timed for 4 threads
    assert plan.layout == first.layout and len(plan.bags) == len(first.bags)
    other_torch = Tuner(config, Machine(HERE.cpu, "9.9.9", 2))  # another torch: its own pick
    pack_linears(linears(torch.float32, n=1), other_torch)
    assert other_torch.timed == 1


def test_a_retiming_replaces_the_kept_plans_at_every_thread_count(tmp_path: Path) -> None:
    config = TuningConfig(**{**QUICK.__dict__, "cache_dir": tmp_path})
    key = cache_key(HERE, torch.float32, 128, 40)
    at_four = cache_key(Machine(HERE.cpu, HERE.torch_version, 4), torch.float32, 128, 40)
    other = cache_key(HERE, torch.float32, 24, 40)
    stale = {"layout": "rows", "bags": []}
    kept = {key: stale, at_four: stale, other: stale}
    (tmp_path / cpu_tuning.CACHE_FILE).write_text(json.dumps(kept))
    tuner = Tuner(config, HERE, retime=True)
    pack_linears(linears(torch.float32, n=2), tuner)
    assert tuner.timed == 1  # two linears of one shape: timed once
    saved = json.loads((tmp_path / cpu_tuning.CACHE_FILE).read_text())
    assert at_four not in saved  # its bits were the old pick's: measured again when loaded
    assert saved[other] == stale and key in saved  # another shape: kept
    assert cpu_tuning.open_chooser("remeasure", tmp_path).retime  # type: ignore[union-attr]
    assert cpu_tuning.open_chooser("fixed", tmp_path) is None
