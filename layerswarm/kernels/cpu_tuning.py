"""Choose each CPU linear's plan by timing the candidates on this machine, once, and keep it.

The candidates (`kernels.cpu_linear.LinearPlan`): `F.linear` over the usual rows or over the
transposed layout, oneDNN's packed weights (bf16), and the `embedding_bag` GEMVs over
the transposed layout in 1, threads, 2 x threads ... column blocks (one bag runs on one thread,
so the blocks are how a GEMV uses every core). Each is timed on the span's own weights of that
shape (up to `TuningConfig.pool_bytes` of them, so that a GEMV streams from memory as the span's
step does), for inputs of 1 to `TuningConfig.rows` tokens and for a prefill-sized input, the
candidates taking turns (A B C A B C ...). The layout with the fastest sum over those few-token
GEMVs wins, unless its prefill is more than `PREFILL_SLACK` slower than the best layout's.
Within the transposed layout, the bags take the inputs of 1 .. R tokens where they beat
`F.linear` for every count up to R, so that a token of a batch of up to R gets the bits it
gets alone (the block count does not change bits; `F.linear` of another row count does).

A time is the fastest of the turns: on a shared machine another process holding a core stalls a
two-thread GEMV for a whole time slice (one-thread candidates far less), and the fastest turn is
the closest to what the kernel does on the cores it was given.

Choices are kept in memory and, where `TuningConfig.cache_dir` is set, in a JSON file there,
under a key of the CPU model (and its flags), the torch version, the thread count, the dtype
and the shape: a restart, or a second peer on the same machine, times nothing.

The contract with the exact-match tests (the swarm's tokens against the local engine's, bit for
bit): processes on one machine that keep their plans in one folder run each shape with the same
bits. The plans differ in bits by layout and by the token counts the bags take (the bag block
count does not change them), so:
- a shape missing from the file is timed under an exclusive lock of the file, after reading it
  again: peers starting together do not each time and pick, the first times and the others
  read its choice;
- a shape already chosen on this CPU and torch for another thread count keeps that choice's
  layout and bag token counts; only the blocks are timed again (`within`).
A process that keeps no file (`cache_dir` None) or the fixed rule (`cpu_linear.default_plan`)
may get other bits than one that measures.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from layerswarm.kernels.cpu_linear import ArenaLinear, LinearPlan, PackedLinear, pack_linears

log = logging.getLogger(__name__)

CACHE_FILE = "cpu-linear-plans.json"
LOCK_FILE = "cpu-linear-plans.lock"
PREFILL_SLACK = 1.25  # a layout whose prefill GEMM is this much slower than the best's loses


# A peer's and the local engine's choice: a Tuner that reads what was kept ("measure") or times
# every shape again and replaces what was kept ("remeasure"), or `default_plan` ("fixed").
PLAN_MODES = ("measure", "remeasure", "fixed")


def default_plans_dir() -> Path:
    """Where plans are kept when no folder is given: the user's cache, the one the models are
    converted into (`~/.cache/layerswarm`; the command line passes its `$LAYERSWARM_CACHE`)."""
    return Path.home() / ".cache" / "layerswarm"


def open_chooser(mode: str, cache_dir: Path | None) -> Tuner | None:
    """The chooser of `mode`: a `Tuner` keeping its plans in `cache_dir` (None: the default
    folder) for "measure" and "remeasure" (its `retime`), None (the fixed rule) for "fixed".

    Raises:
        ValueError: another mode.
    """
    if mode not in PLAN_MODES:
        raise ValueError(f"unknown CPU plan mode {mode!r}; choose one of {PLAN_MODES}")
    if mode == "fixed":
        return None
    config = TuningConfig(cache_dir=cache_dir or default_plans_dir())
    return Tuner(config, retime=mode == "remeasure")


@dataclass(frozen=True)
class TuningConfig:
    """How `Tuner` measures, and where it keeps what it chose."""

    cache_dir: Path | None = None  # folder of the choices' JSON file; None: this process only
    rounds: int = 3  # turns of every candidate, interleaved; the fastest turn counts
    rows: int = 4  # unit: tokens; the few-token GEMVs timed are of 1..rows tokens
    prefill_rows: int = 32  # unit: tokens; the prefill-sized input that guards the layout
    pool_bytes: int = 32 << 20  # bytes: the most of a shape's weights one candidate streams


@dataclass(frozen=True)
class Machine:
    """What a choice depends on besides the shape: it is part of the cache's key."""

    cpu: str  # the CPU model and a digest of its flags
    torch_version: str
    threads: int

    @classmethod
    def here(cls) -> Machine:
        """This machine, as torch runs on it now."""
        return cls(cpu_model(), torch.__version__, torch.get_num_threads())


def cpu_model() -> str:
    """The CPU's model name and a digest of its instruction-set flags (from /proc/cpuinfo on
    Linux; the platform's processor string elsewhere)."""
    name, flags = platform.processor() or platform.machine(), ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and name != value.strip():
                name = value.strip()
            elif key.strip() in ("flags", "Features") and not flags:
                flags = " ".join(sorted(value.split()))
    digest = hashlib.sha256(flags.encode()).hexdigest()[:12]
    return f"{name} [{digest}]"


def cache_key(machine: Machine, dtype: torch.dtype, out_features: int, in_features: int) -> str:
    """The key of one choice: the machine, the dtype and the `(out, in)` shape."""
    return (
        f"{machine.cpu} | torch {machine.torch_version} | {machine.threads} threads"
        f" | {str(dtype).removeprefix('torch.')} {out_features}x{in_features}"
    )


class Tuner:
    """A `kernels.cpu_linear.Chooser` that times the candidates once per machine and shape.

    `timed` counts the shapes it had to time (the rest came from its memory or the file);
    `chosen` maps each key it answered to the plan, for a peer to report. With `retime`, every
    shape is timed once again and replaces what was kept, for this and every other thread
    count (a choice timed on a loaded machine stays otherwise: the pick of this machine's first
    load, during other sessions' tests, ran fp32 at 0.41x transformers); processes that loaded
    the old plans give other bits until they load again.
    """

    def __init__(
        self,
        config: TuningConfig | None = None,
        machine: Machine | None = None,
        retime: bool = False,
    ):
        self.config = config or TuningConfig()
        self.machine = machine or Machine.here()
        self.retime = retime
        self.timed = 0
        self.chosen: dict[str, LinearPlan] = {}
        self._dropped: set[str] = set()  # keys replaced by a retiming, left out when written
        self._plans = self._read()

    def __call__(self, weights: Sequence[torch.Tensor], has_bias: bool) -> LinearPlan:
        w = weights[0]
        key = cache_key(self.machine, w.dtype, w.shape[0], w.shape[1])
        plan = self._kept(key, w)
        if self.retime and key not in self.chosen:
            with self._locked():
                self._drop_shape(key)
                plan = self._time(key, weights)
        elif plan is None:
            with self._locked():
                self._plans.update(self._read())  # another process may have timed it meanwhile
                plan = self._kept(key, w)
                if plan is None:
                    plan = self._time(key, weights)
        self.chosen[key] = plan
        return plan

    def _drop_shape(self, key: str) -> None:
        """Forget this shape's kept plans at every thread count (`retime`)."""
        self._plans.update(self._read())
        shape = _shape_part(key)
        for other in [k for k in self._plans if _shape_part(k) == shape]:
            del self._plans[other]
            self._dropped.add(other)

    def _kept(self, key: str, w: torch.Tensor, plan: LinearPlan | None = None) -> LinearPlan | None:
        """The kept plan of `key` (or `plan`), if its layout is still a candidate here."""
        plan = plan or self._plans.get(key)
        layouts = {p.layout for p in candidates(w.dtype, w.shape[0], self.machine.threads).values()}
        return plan if plan is not None and plan.layout in layouts else None

    def _time(self, key: str, weights: Sequence[torch.Tensor]) -> LinearPlan:
        t0 = time.perf_counter()
        w = weights[0]
        within = self._sibling(key)
        if within is not None and self._kept(key, w, within) is None:
            within = None  # a layout no longer offered: measured afresh
        plan, times = time_candidates(weights, self.config, within)
        self.timed += 1
        self._plans[key] = plan
        self._write()
        log.info(
            "CPU linear %s: %s (timed in %.2f s%s; fastest us by rows: %s)",
            key, plan.describe(), time.perf_counter() - t0,
            f", the bits of {within.describe()} kept" if within else "", _brief(times),
        )  # fmt: skip
        return plan

    def _sibling(self, key: str) -> LinearPlan | None:
        """The plan this CPU and torch keep for the shape at another thread count, if any."""
        cpu, version, _threads, shape = key.split(" | ")
        for other, plan in sorted(self._plans.items()):
            o_cpu, o_version, _, o_shape = other.split(" | ")
            if other != key and (o_cpu, o_version, o_shape) == (cpu, version, shape):
                return plan
        return None

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """An exclusive lock of the plans' folder (Linux and macOS; elsewhere none)."""
        d = self.config.cache_dir
        try:
            import fcntl
        except ImportError:  # Windows: no flock; peers starting together may pick apart
            fcntl = None  # type: ignore[assignment]
        if d is None or fcntl is None:
            yield
            return
        try:
            d.mkdir(parents=True, exist_ok=True)
            f = open(d / LOCK_FILE, "a")  # noqa: SIM115  # closed below
        except OSError as e:
            log.warning("could not lock the CPU linear plans in %s: %s", d, e)
            yield
            return
        with f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def report(self) -> list[str]:
        """One line a shape: what this tuner chose, for a start-up log."""
        return [f"{key.rsplit(' | ', 1)[-1]}: {p.describe()}" for key, p in self.chosen.items()]

    def summary(self) -> str:
        """One line for a start-up log: every shape's plan, and how many were timed now."""
        kept = len(self.chosen) - self.timed
        where = f"kept in {self._path()}" if self._path() else "in memory"
        return f"{'; '.join(self.report())} ({self.timed} timed now, {kept} read; {where})"

    def _path(self) -> Path | None:
        d = self.config.cache_dir
        return None if d is None else d / CACHE_FILE

    def _read(self) -> dict[str, LinearPlan]:
        path = self._path()
        if path is None or not path.exists():
            return {}
        try:
            raw = json.loads(path.read_text())
            return {k: LinearPlan(v["layout"], tuple(v["bags"])) for k, v in raw.items()}
        except (OSError, ValueError, KeyError, TypeError) as e:  # damaged or unreadable: measure
            log.warning("ignoring the CPU linear plans in %s: %s", path, e)
            return {}

    def _write(self) -> None:
        path = self._path()
        if path is None:
            return
        try:
            self._write_to(path)
        except OSError as e:  # a read-only folder: the choices still hold for this process
            log.warning("could not keep the CPU linear plans in %s: %s", path, e)

    def _write_to(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        plans = {**self._read(), **self._plans}  # what another peer kept meanwhile, and ours
        plans = {k: p for k, p in plans.items() if k not in self._dropped or k in self._plans}
        raw = {k: {"layout": p.layout, "bags": list(p.bags)} for k, p in plans.items()}
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # another peer may write too
        tmp.write_text(json.dumps(raw, indent=1, sort_keys=True))
        tmp.replace(path)


def _shape_part(key: str) -> tuple[str, ...]:
    """A key without its thread count: the CPU, torch, dtype and shape."""
    cpu, version, _threads, shape = key.split(" | ")
    return cpu, version, shape


Times = dict[str, list[float]]  # candidate name -> seconds a linear for rows 1..n, then prefill


def candidates(dtype: torch.dtype, out_features: int, threads: int) -> dict[str, LinearPlan]:
    """The plans worth timing for a weight of this dtype and width (bags with one block each,
    and with no bags: the per-row mix is decided after timing)."""
    plans = {"rows": LinearPlan("rows")}
    if dtype == torch.float16:
        return plans  # see `cpu_linear.default_plan`: no fast transposed fp16 GEMM
    plans["trans"] = LinearPlan("trans")
    # Not fp32: oneDNN's packed fp32 moved SmolLM2's logits by 2e-4 (docs/design.md), past the
    # 1e-4 to transformers that fp32 holds to.
    if dtype == torch.bfloat16 and _onednn():
        plans["onednn"] = LinearPlan("onednn")
    for blocks in sorted({1, threads, 4 * threads}):
        if out_features % blocks == 0 and out_features // blocks >= 16:
            plans[f"bags{blocks}"] = LinearPlan("trans", (blocks,))
    return plans


def time_candidates(
    weights: Sequence[torch.Tensor], config: TuningConfig, within: LinearPlan | None = None
) -> tuple[LinearPlan, Times]:
    """Time every candidate on (a pool of) `weights`; the chosen plan and the times.

    `within`: a plan whose bits must stay (its layout, and its bags' token counts): then only
    the candidates of its layout are timed, and only the bags' blocks are chosen."""
    w = weights[0]
    out_features, in_features = w.shape
    nbytes = w.numel() * w.element_size()
    pool = list(weights[: max(1, config.pool_bytes // nbytes)])
    plans = candidates(w.dtype, out_features, torch.get_num_threads())
    if within is not None:
        plans = {n: p for n, p in plans.items() if p.layout == within.layout}
        if not within.bags:
            return within, {}
    rows = list(range(1, max(config.rows, len(within.bags) if within else 0) + 1))
    counts = [*rows, config.prefill_rows]
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(r, in_features, generator=gen).to(w.dtype) for r in counts]
    times: Times = {name: [float("inf")] * len(counts) for name in plans}
    # One copy of the pool a layout (the bag candidates share the transposed one), so that
    # the candidates can take turns: a burst of load on the machine then hits them all.
    laid = {p.layout: _laid_out(pool, p) for p in plans.values() if not p.bags}
    runs = {n: _with_bags(laid[p.layout], p.bags * len(rows)) for n, p in plans.items()}
    with torch.inference_mode():
        for j, x in enumerate(inputs):
            names = [n for n, p in plans.items() if not (p.bags and j == len(rows))]
            for name in names:  # warm: first-touch faults, JIT-compiled bag kernels
                _run(runs[name], x)
            for _ in range(config.rounds):
                for name in names:  # prefill is the same F.linear for "trans" and its bags
                    t0 = time.perf_counter()
                    _run(runs[name], x)
                    dt = (time.perf_counter() - t0) / len(pool)
                    times[name][j] = min(times[name][j], dt)
    if within is not None:
        return pick_blocks(times, len(within.bags)), times
    return pick(times, len(rows)), times


def pick(times: Times, rows: int) -> LinearPlan:
    """The plan the times say: see the module's docstring. `times[name]` holds a linear's
    seconds for 1..rows tokens, then the prefill's; names as `candidates` gives them."""
    bag_names = [n for n in times if n.startswith("bags")]
    layouts = [n for n in times if not n.startswith("bags")]

    def few(n: str) -> list[float]:  # the best few-token times of a layout
        own = [n, *bag_names] if n == "trans" else [n]
        return [min(times[m][r] for m in own) for r in range(rows)]

    best_prefill = min(times[n][rows] for n in layouts)
    fair = [n for n in layouts if times[n][rows] <= PREFILL_SLACK * best_prefill]
    layout = min(fair, key=lambda n: sum(few(n)))
    bags: list[int] = []
    if layout == "trans":
        for r in range(rows):
            fastest = min(bag_names, key=lambda n: times[n][r], default=None)
            if fastest is None or times[fastest][r] >= times["trans"][r]:
                break
            bags.append(int(fastest.removeprefix("bags")))
    return LinearPlan(layout, tuple(bags))


def pick_blocks(times: Times, bag_rows: int) -> LinearPlan:
    """A "trans" plan with bags for 1..`bag_rows` tokens, each of the fastest block count."""
    bag_names = [n for n in times if n.startswith("bags")]
    blocks = [min(bag_names, key=lambda n: times[n][r]) for r in range(bag_rows)]
    return LinearPlan("trans", tuple(int(n.removeprefix("bags")) for n in blocks))


def _laid_out(pool: Sequence[torch.Tensor], plan: LinearPlan) -> list[nn.Module]:
    """Copies of the pool's weights laid out by `plan`."""
    model = nn.Sequential(*[_linear(w) for w in pool])
    pack_linears(model, lambda _weights, _bias: plan)
    return [m for m in model if isinstance(m, ArenaLinear | PackedLinear)]


def _with_bags(linears: list[nn.Module], bags: tuple[int, ...]) -> list[nn.Module]:
    """`linears` themselves without bags; else shallow copies (the same weights) with them."""
    if not bags:
        return linears
    out: list[nn.Module] = []
    for m in linears:
        assert isinstance(m, ArenaLinear)  # a "trans" layout's linears are all ArenaLinears
        twin = copy.copy(m)  # its own attributes, the same parameters
        twin.bag_blocks, twin.bag_rows = bags, len(bags)
        out.append(twin)
    return out


def _linear(w: torch.Tensor) -> nn.Linear:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
    lin.weight = nn.Parameter(w, requires_grad=False)  # copied by the layout, not kept
    return lin


def _run(runs: Sequence[Callable[[torch.Tensor], torch.Tensor]], x: torch.Tensor) -> None:
    for f in runs:
        f(x)


def _onednn() -> bool:
    mkldnn = bool(torch.backends.mkldnn.is_available())  # type: ignore[no-untyped-call]
    return mkldnn and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _brief(times: Times) -> str:
    return ", ".join(f"{n} " + "/".join(f"{t * 1e6:.0f}" for t in ts) for n, ts in times.items())
