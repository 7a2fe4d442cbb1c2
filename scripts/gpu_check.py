"""The work of scripts/gpu_check.sh: one GPU check of layerswarm, in under 8 minutes, one table.

    scripts/gpu_check.sh                     # on a CUDA machine with layerswarm installed
    scripts/gpu_check.sh --compile-check     # here, no GPU: every kernel variant it launches,
                                             # compiled for sm_80 and sm_90
    scripts/gpu_check.sh --dry-run           # the script itself on the CPU (tiny shapes)

On the GPU, in this order, each step in a subprocess with a time cap (a step past its cap, or
starting past the budget, is a row that says so):

1. the kernel tests (`tests/kernels`) on CUDA, bf16 included;
2. `bench_kernels.py` at SmolLM2 and Llama-8B shapes, bf16: decode attention and the int8/int4
   GEMVs against torch, in GB/s and as a share of the GPU's peak memory bandwidth;
3. `bench_gpu_decode.py` on SmolLM2 (real weights if cached, else random ones of its shape):
   2 peers on the GPU (two processes) against the local engine's greedy tokens; CUDA graphs
   against eager steps; local decode tok/s against transformers, batch 1 and 8, bf16/int8/int4;
   a mixed swarm (a CPU peer, then a GPU peer) against the local engine's tokens (info);
4. `gpu_check_scheduler.py`: mixed batches through Triton against the CPU twins;
5. `bench_gpu_decode.py` decode at Llama-3.2-1B shapes, if time is left.

Targets: decode attention and the int4 GEMV at 70% or more of peak bandwidth and faster than
torch's path; local decode at batch 1 at least 2x transformers' eager decode.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

SCRIPTS = Path(__file__).resolve().parent
ROOT = SCRIPTS.parent
sys.path.insert(0, str(SCRIPTS))
PEAK_TARGET = 0.70  # share of peak memory bandwidth for decode attention and the int4 GEMV
DECODE_TARGET = 2.0  # local decode at batch 1 against transformers' eager decode


@dataclass
class Table:
    rows: list[tuple[str, str, str, str]] = field(default_factory=list)

    def add(self, check: str, result: str, target: str = "", verdict: str = "info") -> None:
        self.rows.append((check, result, target, verdict))
        print(f"[gpu_check] {verdict:7} {check}: {result}", file=sys.stderr, flush=True)

    def print(self, header: str) -> None:
        print(header + "\n")
        print("| check | result | target | verdict |")
        print("|---|---|---|---|")
        for row in self.rows:
            print("| " + " | ".join(row) + " |")

    @property
    def failed(self) -> bool:
        return any(v in ("FAIL", "error", "timeout") for *_, v in self.rows)


@dataclass
class Runner:
    """Runs steps as subprocesses within an overall budget; logs go to `logs`."""

    table: Table
    logs: Path
    deadline: float
    env: dict[str, str]

    def run(self, name: str, cmd: list[str], cap: float, extra_env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str] | None:  # fmt: skip
        left = self.deadline - time.monotonic()
        if left < 20:
            self.table.add(name, "not started: the time budget is spent", verdict="skipped")
            return None
        log = self.logs / (re.sub(r"\W+", "-", name).strip("-") + ".log")
        print(
            f"[gpu_check] running {name} (cap {min(cap, left):.0f} s, log {log})", file=sys.stderr
        )
        try:
            out = subprocess.run(
                cmd, cwd=ROOT, env={**self.env, **(extra_env or {})}, capture_output=True,
                text=True, timeout=min(cap, left),
            )  # fmt: skip
        except subprocess.TimeoutExpired as e:
            log.write_text(f"{e.stdout or ''}\n{e.stderr or ''}")
            self.table.add(name, f"timed out after {min(cap, left):.0f} s", verdict="timeout")
            return None
        log.write_text(out.stdout + "\n" + out.stderr)
        return out


def check_kernel_tests(r: Runner, dry: bool) -> None:
    env = {} if dry else {"LAYERSWARM_TEST_DEVICE": "cuda"}
    out = r.run("kernel tests", [sys.executable, "-m", "pytest", "-q", "tests/kernels"], 150, env)
    if out is None:
        return
    tail = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else out.stderr[-200:]
    where = "interpreter (dry run)" if dry else "CUDA, fp32/fp16/bf16"
    verdict = "pass" if out.returncode == 0 else "FAIL"
    r.table.add(f"kernel tests, {where}", tail.strip("= "), "all pass", verdict)


def check_bench_kernels(r: Runner, dry: bool) -> None:
    path = r.logs / "bench_kernels.json"
    args = ["--dry-run"] if dry else ["--model", "smollm2,llama-8b", "--dtype", "bf16"]
    cmd = [sys.executable, "scripts/bench_kernels.py", *args, "--only", "attention,quant"]
    out = r.run("bench_kernels", [*cmd, "--json", str(path)], 180)
    if out is None:
        return
    if out.returncode != 0 or not path.exists():
        r.table.add("bench_kernels", f"exit {out.returncode}: {out.stderr[-200:]}", verdict="error")
        return
    rows = json.loads(path.read_text())
    for model in dict.fromkeys(row["model"] for row in rows):
        mine = [row for row in rows if row["model"] == model]
        decode = [row for row in mine if row["op"].startswith("decode_attention")]
        gemv4 = [row for row in mine if row["op"].startswith("int4") and row["shape"][:2] == "1x"]
        gemv8 = [row for row in mine if row["op"].startswith("int8") and row["shape"][:2] == "1x"]
        for label, group, target in (
            ("decode attention", decode, True),
            ("int4 GEMV", gemv4, True),
            ("int8 GEMV", gemv8, False),
        ):
            _bandwidth_row(r.table, f"{label}, {model}", group, target)


def _bandwidth_row(table: Table, label: str, rows: list[dict], target: bool) -> None:  # type: ignore[type-arg]
    if not rows:
        return
    peak = rows[0]["peak_gbps"]
    worst_share, worst_speed, cells = 1e9, 1e9, []
    for row in rows:
        gbps = row["nbytes"] / row["ours_ms"] / 1e6
        share = gbps / peak if peak else 0.0
        speed = row["torch_ms"] / row["ours_ms"]
        worst_share, worst_speed = min(worst_share, share), min(worst_speed, speed)
        of_peak = f"{share:.0%} of peak" if peak else "no peak known"
        cells.append(f"{row['shape']}: {gbps:.0f} GB/s ({of_peak}), {speed:.2f}x torch")
    ok = peak and worst_share >= PEAK_TARGET and worst_speed > 1.0
    verdict = ("pass" if ok else "FAIL") if target and peak else "info"
    goal = f">= {PEAK_TARGET:.0%} of peak, faster than torch" if target else ""
    table.add(label, "; ".join(cells), goal, verdict)


def check_decode(r: Runner, dry: bool, model: str, checks: str, cap: float) -> None:
    cmd = [sys.executable, "scripts/bench_gpu_decode.py", "--model", model, "--checks", checks]
    out = r.run(f"decode {model}", cmd + (["--dry-run"] if dry else []), cap)
    if out is None:
        return
    results = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0:
        r.table.add(
            f"decode {model}", f"exit {out.returncode}: {out.stderr[-300:]}", verdict="error"
        )
    peak = _peak()
    for x in results:
        if x["check"] == "swarm":
            same = "identical" if x["same_tokens"] else f"differ from token {x['first_difference']}"
            r.table.add(
                f"2 peers on the GPU vs the local engine, {x['model']} {x['dtype']}",
                f"{x['tokens']} greedy tokens {same}", "identical",
                "pass" if x["same_tokens"] else "FAIL",
            )  # fmt: skip
        elif x["check"] == "mixed":
            r.table.add(
                f"mixed swarm: a CPU peer (fp32) then a GPU peer, bf16 wire, {x['model']}",
                f"{x['agree']} of {x['tokens']} greedy tokens as the local engine's on the GPU "
                f"(first difference: {x['first_difference']})",
            )
        elif x["check"] == "graphs":
            speed = x["graphs_tok_s"] / x["eager_tok_s"]
            same = "same tokens" if x["same_tokens"] else "DIFFERENT tokens"
            r.table.add(
                f"CUDA graphs vs eager decode, {x['model']} batch 1",
                f"{same}; {x['graphs_tok_s']:.0f} vs {x['eager_tok_s']:.0f} tok/s ({speed:.2f}x)",
                "same tokens", "pass" if x["same_tokens"] else "FAIL",
            )  # fmt: skip
        elif x["engine"] == "layerswarm":
            ratio = x["vs_transformers"]
            gbps = x["weight_bytes"] * x["tok_s"] / x["batch"] / 1e9
            share = f", weights read at {gbps:.0f} GB/s ({gbps / peak:.0%} of peak)" if peak else ""
            targeted = x["batch"] == 1 and x["quant"] == "none"
            verdict = ("pass" if ratio >= DECODE_TARGET else "FAIL") if targeted else "info"
            r.table.add(
                f"local decode, {x['model']} {x['quant']} batch {x['batch']}",
                f"{x['tok_s']:.0f} tok/s = {ratio:.2f}x transformers{share}",
                f">= {DECODE_TARGET:.0f}x transformers" if targeted else "", verdict,
            )  # fmt: skip
        else:
            r.table.add(
                f"transformers eager decode, {x['model']} batch {x['batch']}",
                f"{x['tok_s']:.0f} tok/s",
            )


def check_scheduler(r: Runner, dry: bool) -> None:
    cmd = [sys.executable, "scripts/gpu_check_scheduler.py", "--device", "cpu" if dry else "cuda"]
    out = r.run("scheduler", cmd, 90)
    if out is None:
        return
    rows = [line for line in out.stdout.splitlines() if re.match(r"\| (float|bfloat)", line)]
    errors = ", ".join(f"{c[1].strip()} {c[5].strip()}" for c in (row.split("|") for row in rows))
    r.table.add(
        "mixed batches through Triton vs the CPU twins (gpu_check_scheduler.py)",
        f"max abs error {errors}" if rows else out.stderr[-200:],
        "within tolerance",
        "pass" if out.returncode == 0 else "FAIL",
    )


def _peak() -> float | None:
    if not torch.cuda.is_available():
        return None
    from bench_kernels import peak_gbps

    return peak_gbps(torch.device("cuda", 0))[0]


def gpu_check(dry: bool, budget: float, logs: Path) -> int:
    if not dry and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here (try --dry-run or --compile-check)", file=sys.stderr)
        return 2
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(SCRIPTS)])}
    env.pop("TRITON_INTERPRET", None)
    table = Table()
    runner = Runner(table, logs, time.monotonic() + budget, env)
    steps: list[Callable[[], None]] = [
        lambda: check_kernel_tests(runner, dry),
        lambda: check_bench_kernels(runner, dry),
        lambda: check_decode(runner, dry, "smollm2", "swarm,graphs,decode,mixed", 200),
        lambda: check_scheduler(runner, dry),
    ]
    if not dry:  # the dry run's model is the same tiny one either way
        steps.append(lambda: check_decode(runner, dry, "llama-1b", "decode", 120))
    for step in steps:
        step()
    name = torch.cuda.get_device_name(0) if not dry else "dry run on the CPU"
    table.print(f"layerswarm GPU check: {name}, torch {torch.__version__}; logs in {logs}")
    return 1 if table.failed else 0


def compile_check(archs: list[int], logs: Path) -> int:
    """Compile every kernel variant gpu_check launches for each arch (no GPU needed)."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("--compile-check needs TRITON_INTERPRET unset: it compiles real kernels")
    import bench_kernels
    from compile_workloads import model_workload
    from triton_variants import Results, compile_recorded

    record = logs / "kernel-tests-launches.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "LAYERSWARM_TRITON_RECORD": str(record)}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(SCRIPTS)])
    print("[compile-check] recording the kernel tests' launches (interpreter)", file=sys.stderr)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "triton_variants", "tests/kernels"]
    tests = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    sources: list[tuple[str, Callable[[Results], object]]] = [
        ("kernel wrappers at SmolLM2 and Llama-8B shapes, fp16/bf16/fp32 (bench_kernels.py)",
         lambda res: _within(archs, res, bench_kernels.compile_workload)),
        ("model steps: SmolLM2, Llama-1B (bf16; int8, int4), the scheduler check's model "
         "(fp32/fp16/bf16): prefill, decode of 1 and 8, mixed",
         lambda res: _within(archs, res, model_workload)),
        ("the kernel tests' launches (tests/kernels, recorded; their GPU flags and bf16 twins)",
         lambda res: compile_recorded(str(record), archs, res) if record.exists() else None),
    ]  # fmt: skip
    table = Table()
    done: dict[int, set[object]] = {}
    for label, work in sources:
        res = Results(ok={a: set() for a in archs}, failed={a: {} for a in archs})
        work(res)
        cells = []
        for a in archs:
            new = res.ok[a] - done.setdefault(a, set())
            done[a] |= res.ok[a]
            cells.append(
                f"sm_{a}: {len(res.ok[a])} ok ({len(new)} new), {len(res.failed[a])} failed"
            )
        failed = any(res.failed[a] for a in archs)
        table.add(label, "; ".join(cells), "0 failed", "FAIL" if failed else "pass")
    if tests.returncode != 0:
        table.add("kernel tests in the interpreter", tests.stdout[-300:], "pass", "FAIL")
    totals = ", ".join(f"sm_{a}: {len(done[a])}" for a in archs)
    table.print(f"Triton compile check (Triton ptxas, no GPU): distinct variants compiled {totals}")
    return 1 if table.failed else 0


def _within(archs: list[int], res: object, workload: Callable[[], None]) -> None:
    from triton_variants import compiling_instead

    with compiling_instead(archs, res):  # type: ignore[arg-type]
        workload()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--compile-check", metavar="ARCHS", help="e.g. 80,90: compile, no GPU")
    ap.add_argument("--dry-run", action="store_true", help="the script itself on the CPU")
    ap.add_argument("--budget", type=float, default=420, help="seconds for all steps")
    ap.add_argument("--logs", type=Path, default=None, help="keep the steps' logs here")
    args = ap.parse_args()
    logs = args.logs or Path(tempfile.mkdtemp(prefix="layerswarm-gpu-check-"))
    logs.mkdir(parents=True, exist_ok=True)
    if args.compile_check:
        return compile_check([int(a) for a in args.compile_check.split(",")], logs)
    return gpu_check(args.dry_run, args.budget, logs)


if __name__ == "__main__":
    sys.exit(main())
