"""Benchmark the Triton kernels against their torch equivalents, and the CPU quantized matmuls.

On a CUDA GPU (the default mode), each kernel runs against what torch would do instead (eager
ops, SDPA, cuBLAS `F.linear` on a bf16 weight) at the shapes of a 7-8B Llama and of SmolLM2,
timed with `triton.testing.do_bench`, and a markdown table gives the time, the bytes each moves
per second and that rate as a share of the GPU's peak memory bandwidth (from a table of known
GPUs, else measured with a large copy).

    python scripts/bench_kernels.py [--model llama-8b,smollm2] [--dtype bf16]
    python scripts/bench_kernels.py --dry-run     # tiny shapes in Triton's CPU interpreter
    python scripts/bench_kernels.py --cpu-quant   # int8/int4 vs bf16 F.linear on this CPU
    python scripts/bench_kernels.py --compile-check 90  # compile every kernel for sm_90, no GPU
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

# Peak memory bandwidth, GB/s (vendor data sheets), matched against the device name.
PEAK_GBPS = {
    "H200": 4800,
    "H100 SXM": 3350,
    "H100 NVL": 3900,
    "H100 PCIe": 2000,
    "H100": 3350,
    "GH200": 4000,
    "B200": 8000,
    "A100-SXM4-80GB": 2039,
    "A100 80GB PCIe": 1935,
    "A100": 1555,
    "L40S": 864,
    "L40": 864,
    "L4": 300,
    "A10G": 600,
    "A10": 600,
    "T4": 320,
    "V100": 900,
    "RTX 4090": 1008,
    "RTX 3090": 936,
    "RTX A6000": 768,
}


@dataclass(frozen=True)
class Shapes:
    """The sizes of one model that the kernels see."""

    name: str
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    tokens: int  # unit: prefill tokens (and rows for the elementwise kernels)
    sessions: int  # unit: sessions batched in one decode step
    context: int  # unit: tokens of context per decoding session


MODELS = {
    "llama-8b": Shapes("llama-8b", 4096, 32, 8, 128, 14336, 2048, 16, 4096),
    "smollm2": Shapes("smollm2", 576, 9, 3, 64, 1536, 2048, 16, 4096),
}
TINY = Shapes("tiny", 96, 4, 2, 24, 160, 40, 3, 70)  # --dry-run: every mask in play
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class Row:
    op: str
    shape: str
    ours_ms: float
    torch_ms: float
    nbytes: int  # bytes the op must move at least once (what GB/s is computed from)
    diff: float  # max |ours - torch|


class Timer:
    """`do_bench` on a GPU; one warm call then one timed call in the interpreter (dry run)."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda

    def __call__(self, fn: Callable[[], object]) -> float:
        if self.cuda:
            import triton.testing

            return float(triton.testing.do_bench(fn, warmup=25, rep=100))
        fn()
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3


def peak_gbps(device: torch.device) -> tuple[float, str]:
    """(peak GB/s, where the number came from) for a CUDA device."""
    name = torch.cuda.get_device_name(device)
    for key, gbps in PEAK_GBPS.items():
        if key in name:
            return float(gbps), f"data sheet ({name})"
    x = torch.empty(2**30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    import triton.testing

    ms = triton.testing.do_bench(lambda: y.copy_(x))
    return 2 * x.numel() / ms / 1e6, f"measured 1 GiB copy ({name})"


def nbytes(*ts: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def bench_elementwise(s: Shapes, dtype: torch.dtype, dev: str, timer: Timer) -> list[Row]:
    from layerswarm.kernels import reference as ref
    from layerswarm.kernels import triton_ops as ops

    t, d = s.tokens, s.hidden
    x, r = torch.randn(t, d, dtype=dtype, device=dev), torch.randn(t, d, dtype=dtype, device=dev)
    w = torch.randn(d, dtype=dtype, device=dev)
    q = torch.randn(t, s.heads, s.head_dim, dtype=dtype, device=dev)
    k = torch.randn(t, s.kv_heads, s.head_dim, dtype=dtype, device=dev)
    ang = torch.randn(t, s.head_dim // 2, device=dev)
    cos, sin = torch.cat((ang, ang), -1).cos(), torch.cat((ang, ang), -1).sin()  # (t, hd) fp32
    gate_up = torch.randn(t, 2 * s.intermediate, dtype=dtype, device=dev)
    g, u = gate_up.chunk(2, dim=-1)
    rows = [
        Row(
            "rms_norm",
            f"{t}x{d}",
            timer(lambda: ops.rms_norm(x, w, 1e-5)),
            timer(lambda: ref.rms_norm(x, w, 1e-5)),
            2 * nbytes(x) + nbytes(w),
            _diff(ops.rms_norm(x, w, 1e-5), ref.rms_norm(x, w, 1e-5)),
        ),
        Row(
            "add_rms_norm",
            f"{t}x{d}",
            timer(lambda: ops.add_rms_norm(x, r, w, 1e-5)),
            timer(lambda: ref.add_rms_norm(x, r, w, 1e-5)),
            4 * nbytes(x) + nbytes(w),
            _diff(ops.add_rms_norm(x, r, w, 1e-5)[0], ref.add_rms_norm(x, r, w, 1e-5)[0]),
        ),
        Row(
            "apply_rope (in place)",
            f"{t}x({s.heads}+{s.kv_heads})x{s.head_dim}",
            timer(lambda: ops.apply_rope(q, k, cos, sin)),
            timer(lambda: ref.apply_rope(q, k, cos, sin)),
            2 * nbytes(q, k) + nbytes(cos, sin),
            _rope_diff(q, k, cos, sin),
        ),
        Row(
            "swiglu",
            f"{t}x{s.intermediate}",
            timer(lambda: ops.swiglu(g, u)),
            timer(lambda: ref.swiglu(g, u)),
            nbytes(gate_up) + nbytes(g),
            _diff(ops.swiglu(g, u), ref.swiglu(g, u)),
        ),
    ]
    return rows


def _rope_diff(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> float:
    from layerswarm.kernels import reference as ref
    from layerswarm.kernels import triton_ops as ops

    a, b, c, d = q.clone(), k.clone(), q.clone(), k.clone()
    ops.apply_rope(a, b, cos, sin)
    ref.apply_rope(c, d, cos, sin)
    return max(_diff(a, c), _diff(b, d))


def bench_attention(s: Shapes, dtype: torch.dtype, dev: str, timer: Timer) -> list[Row]:
    from layerswarm.kernels import triton_ops as ops

    hd, scale = s.head_dim, s.head_dim**-0.5
    q = torch.randn(s.tokens, s.heads, hd, dtype=dtype, device=dev)
    k = torch.randn(s.tokens, s.kv_heads, hd, dtype=dtype, device=dev)
    v = torch.randn_like(k)

    def sdpa_prefill() -> torch.Tensor:
        qh, kh, vh = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # (heads, seq, hd)
        out = F.scaled_dot_product_attention(
            qh, kh, vh, is_causal=True, scale=scale, enable_gqa=True
        )
        return out.transpose(0, 1)

    rows = [
        Row(
            "prefill_attention vs SDPA",
            f"{s.tokens} tok, {s.heads}/{s.kv_heads} heads x {hd}",
            timer(lambda: ops.prefill_attention(q, k, v, 0, scale)),
            timer(sdpa_prefill),
            2 * nbytes(q) + nbytes(k, v),
            _diff(ops.prefill_attention(q, k, v, 0, scale), sdpa_prefill()),
        ),
    ]
    for sessions, context in ((s.sessions, s.context), (1, 4 * s.context)):
        rows.append(_decode_row(s, sessions, context, dtype, dev, timer))
    return rows


def _decode_row(
    s: Shapes, sessions: int, context: int, dtype: torch.dtype, dev: str, timer: Timer
) -> Row:
    """Decode over a scattered page pool vs SDPA over the same keys already laid out densely."""
    from layerswarm.kernels import triton_ops as ops

    page, hd, scale = 16, s.head_dim, s.head_dim**-0.5
    per = -(-context // page)
    pool = torch.randn(sessions * per, page, s.kv_heads, hd, dtype=dtype, device=dev)
    vpool = torch.randn_like(pool)
    table = torch.randperm(sessions * per, device=dev).to(torch.int32).reshape(sessions, per)
    lengths = torch.full((sessions,), context, dtype=torch.int32, device=dev)
    q = torch.randn(sessions, s.heads, hd, dtype=dtype, device=dev)
    kd = pool[table.long()].flatten(1, 2)[:, :context].transpose(1, 2)  # (b, kv_heads, ctx, hd)
    vd = vpool[table.long()].flatten(1, 2)[:, :context].transpose(1, 2)

    def sdpa() -> torch.Tensor:
        out = F.scaled_dot_product_attention(q[:, :, None], kd, vd, scale=scale, enable_gqa=True)
        return out[:, :, 0]

    def ours() -> torch.Tensor:
        return ops.decode_attention(q, pool, vpool, table, lengths, scale)

    kv_bytes = 2 * sessions * context * s.kv_heads * hd * pool.element_size()
    return Row(
        "decode_attention vs dense SDPA",
        f"{sessions} x {context} ctx",
        timer(ours),
        timer(sdpa),
        kv_bytes + 2 * nbytes(q),
        _diff(ours(), sdpa()),
    )


def bench_quant(s: Shapes, dtype: torch.dtype, dev: str, timer: Timer) -> list[Row]:
    from layerswarm.kernels import quant

    q_out = s.heads * s.head_dim + 2 * s.kv_heads * s.head_dim
    layers = {
        "qkv": (q_out, s.hidden),
        "o_proj": (s.hidden, s.heads * s.head_dim),
        "gate_up": (2 * s.intermediate, s.hidden),
        "down_proj": (s.hidden, s.intermediate),
    }
    group = 128 if s.hidden % 128 == 0 and s.intermediate % 128 == 0 else 32
    rows = []
    for name, (n, k) in layers.items():
        w = torch.randn(n, k, dtype=dtype, device=dev) / k**0.5
        q8, s8 = quant.quantize_int8(w)
        q4, sz = quant.quantize_int4(w, group)
        for m in (1, 16, s.tokens):
            x = torch.randn(m, k, dtype=dtype, device=dev)
            base = timer(partial(F.linear, x, w))
            io = nbytes(x) + m * n * x.element_size()
            shape = f"{m}x{k} @ {n}x{k}"
            int8 = partial(quant.int8_linear, x, q8, s8, backend="triton")
            want8 = F.linear(x, quant.dequantize_int8(q8, s8))
            label = f"vs {dtype_name(dtype)} F.linear"
            rows.append(
                Row(
                    f"int8 {name} {label}",
                    shape,
                    timer(int8),
                    base,
                    nbytes(q8, s8) + io,
                    _diff(int8(), want8),
                )
            )
            int4 = partial(quant.int4_linear, x, q4, sz, group, backend="triton")
            want4 = F.linear(x, quant.dequantize_int4(q4, sz, group))
            rows.append(
                Row(
                    f"int4 g{group} {name} {label}",
                    shape,
                    timer(int4),
                    base,
                    nbytes(q4, sz) + io,
                    _diff(int4(), want4),
                )
            )
    return rows


def dtype_name(dtype: torch.dtype) -> str:
    return next(k for k, v in DTYPES.items() if v == dtype)


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def print_table(rows: list[Row], peak: float | None) -> None:
    cols = ["op", "shape", "triton ms", "torch ms", "speedup", "triton GB/s", "% of peak"]
    cols += ["torch GB/s", "max abs diff"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        ours_gbps, torch_gbps = r.nbytes / r.ours_ms / 1e6, r.nbytes / r.torch_ms / 1e6
        share = f"{ours_gbps / peak:.0%}" if peak else "n/a"
        speedup = r.torch_ms / r.ours_ms
        print(
            f"| {r.op} | {r.shape} | {r.ours_ms:.4f} | {r.torch_ms:.4f} | {speedup:.2f}x "
            f"| {ours_gbps:.0f} | {share} | {torch_gbps:.0f} | {r.diff:.2g} |"
        )


def cpu_quant(threads: int | None) -> None:
    """int8/int4 decode- and prefill-shaped matmuls vs F.linear at SmolLM2 shapes on this CPU."""
    from layerswarm.kernels import quant

    if threads:
        torch.set_num_threads(threads)
    shapes = {
        "qkv": (960, 576),
        "o_proj": (576, 576),
        "gate_up": (3072, 576),
        "down_proj": (576, 1536),
    }
    print(f"CPU, {torch.get_num_threads()} threads; microseconds, the fastest of many runs\n")
    cols = ["layer (out x in)", "rows", "fp32 F.linear", "bf16 F.linear", "int8 (bf16 act.)"]
    cols += ["int4 g64 (bf16 act.)", "int8 / bf16"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for name, (n, k) in shapes.items():
        w = torch.randn(n, k) / k**0.5
        wb = w.bfloat16()
        q8, s8 = quant.quantize_int8(wb)
        q4, sz = quant.quantize_int4(wb, 64)
        cpu4 = quant.to_cpu_int4_layout(q4)
        for m in (1, 4, 16, 128):
            x = torch.randn(m, k)
            xb = x.bfloat16()
            t = [
                _cpu_time(partial(F.linear, x, w)),
                _cpu_time(partial(F.linear, xb, wb)),
                _cpu_time(partial(quant.int8_linear, xb, q8, s8)),
                _cpu_time(partial(quant.int4_linear, xb, cpu4, sz, 64, layout="cpu")),
            ]
            cells = " | ".join(f"{v:.0f}" for v in t)
            print(f"| {name} ({n} x {k}) | {m} | {cells} | {t[2] / t[1]:.2f} |", flush=True)


def compile_workload() -> None:
    """Launch every kernel variant the wrappers have, at the benchmark's model shapes, in each
    dtype: with `triton_variants.compiling_instead`, each compiles instead of running."""
    from layerswarm.kernels import quant
    from layerswarm.kernels import triton_ops as ops

    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for s in MODELS.values():
            t, hd = 70, s.head_dim
            x, w = torch.ones(t, s.hidden, dtype=dtype), torch.ones(s.hidden, dtype=dtype)
            ops.rms_norm(x, w, 1e-5)
            ops.add_rms_norm(x, x, w, 1e-5)
            q = torch.ones(t, s.heads, hd, dtype=dtype)
            k = torch.ones(t, s.kv_heads, hd, dtype=dtype)
            ops.apply_rope(q, k, torch.ones(t, hd), torch.ones(t, hd))
            ops.swiglu(*torch.ones(t, 2 * s.intermediate, dtype=dtype).chunk(2, dim=-1))
            ops.prefill_attention(q, k, k, 0, 0.1)
            pool = torch.ones(8, 16, s.kv_heads, hd, dtype=dtype)
            table, lengths = torch.zeros(3, 8, dtype=torch.int32), torch.ones(3, dtype=torch.int32)
            for split in (None, 32):
                ops.decode_attention(q[:3], pool, pool, table, lengths, 0.1, split_tokens=split)
            for rows in (1, 16, 33, 100):
                xq, wq = torch.ones(rows, 256, dtype=dtype), torch.ones(64, 256, dtype=dtype)
                quant.int8_linear(xq, *quant.quantize_int8(wq), wq[:, 0], backend="triton")
                for group in (32, 64, 128):
                    q4, sz = quant.quantize_int4(wq, group)
                    quant.int4_linear(xq, q4, sz, group, backend="triton")


def compile_check(arch: int) -> int:
    """Compile every kernel variant the wrappers launch for CUDA sm_<arch>, on a machine with no
    GPU (Triton ships ptxas): catches what the interpreter cannot, such as a `tl.dot` too small
    for tensor cores or a global that is not a constexpr. Returns the number of failures."""
    from triton_variants import Results, compiling_instead

    results = Results()
    with compiling_instead([arch], results):
        compile_workload()
    ok, failed = len(results.ok.get(arch, ())), len(results.failed.get(arch, {}))
    print(f"\n{ok} kernel variants compiled for sm_{arch}, {failed} failed")
    return failed


def _cpu_time(fn: Callable[[], object], seconds: float = 0.4) -> float:
    """Fastest run in microseconds: the minimum is what survives a busy shared machine."""
    for _ in range(3):
        fn()
    best, t_end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--model", default="llama-8b,smollm2", help=f"comma-separated: {', '.join(MODELS)}"
    )
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--only", default="elementwise,attention,quant", help="which groups to run")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes, CPU, Triton interpreter")
    p.add_argument("--cpu-quant", action="store_true", help="CPU int8/int4 vs F.linear")
    p.add_argument("--threads", type=int, default=None, help="torch threads for --cpu-quant")
    p.add_argument("--compile-check", type=int, metavar="ARCH", help="compile for sm_ARCH, no GPU")
    p.add_argument("--json", metavar="FILE", help="also write every row to FILE as JSON")
    args = p.parse_args()
    if args.cpu_quant:
        cpu_quant(args.threads)
        return
    if args.compile_check:
        if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
            sys.exit("--compile-check needs TRITON_INTERPRET unset: it compiles real kernels")
        sys.exit(1 if compile_check(args.compile_check) else 0)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before the first import of a triton_* module
        dev, models, dtype = "cpu", [TINY], torch.float32
    elif not torch.cuda.is_available():
        sys.exit(
            "bench_kernels.py needs a CUDA GPU (try --dry-run to check it runs, or --cpu-quant)"
        )
    else:
        dev, models, dtype = "cuda", [MODELS[m] for m in args.model.split(",")], DTYPES[args.dtype]
    peak, source = (None, "n/a") if args.dry_run else peak_gbps(torch.device(dev))
    print(f"peak memory bandwidth: {peak or 'n/a'} GB/s ({source}); dtype {dtype_name(dtype)}\n")
    groups = {"elementwise": bench_elementwise, "attention": bench_attention, "quant": bench_quant}
    timer = Timer(dev == "cuda")
    every: list[dict[str, object]] = []
    for s in models:
        print(f"### {s.name}\n")
        rows = [r for g in args.only.split(",") for r in groups[g](s, dtype, dev, timer)]
        print_table(rows, peak)
        print()
        every += [{"model": s.name, "peak_gbps": peak, **vars(r)} for r in rows]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(every, f)


if __name__ == "__main__":
    main()
