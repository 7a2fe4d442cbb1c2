"""Every Triton kernel variant a workload launches, compiled for NVIDIA GPUs on a machine with none.

Triton ships `ptxas`, so `triton.compile(ASTSource(kernel, signature, constexprs),
target=GPUTarget("cuda", 80 or 90, 32))` turns a kernel into a cubin without a GPU. That catches
what Triton's CPU interpreter cannot: a `tl.dot` under 16 wide, a global that is not a constexpr,
shared memory past a GPU's limit.

Two ways to find the variants (a variant: a kernel, its argument types, its constexprs and its
launch options):

- `compiling_instead(archs)`: with TRITON_INTERPRET unset, every launch compiles for each arch
  instead of running (outputs stay uninitialised). For workloads that assert nothing: the kernel
  wrappers at model shapes, a model's forward pass.
- As a pytest plugin (`-p triton_variants`, with TRITON_INTERPRET=1 and
  LAYERSWARM_TRITON_RECORD=FILE): tests run in the interpreter as usual, and every launch is
  written to FILE; `compile_recorded(FILE, archs)` compiles them. So the kernel tests, which
  assert values, run whole.

On a GPU, kernels whose loads are fp16/bf16 multiply on tensor cores (`dot_flags`: UPCAST off,
PREC "tf32"); on CPU tensors they upcast. `gpu_variants` adds the GPU's choice of each recorded
variant, and a bf16 twin of each fp16 one (the kernel tests add bf16 on a GPU). Not covered:
Triton's specialisation of integer arguments equal to 1 or divisible by 16, which a real launch
adds (it changes addressing, not the kernel's structure).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
TYPES |= {torch.int8: "i8", torch.uint8: "u8", torch.int32: "i32", torch.int64: "i64"}


@dataclass(frozen=True)
class Variant:
    module: str  # where the kernel is defined, e.g. "layerswarm.kernels.triton_ops"
    kernel: str  # its name in that module
    signature: tuple[tuple[str, str], ...]  # (parameter, type) in order; "constexpr" for those
    constexprs: tuple[tuple[str, Any], ...]
    options: tuple[tuple[str, int], ...]  # num_warps, num_stages

    def describe(self) -> str:
        consts = ", ".join(f"{k}={v}" for k, v in self.constexprs)
        ptrs = ",".join(t for _, t in self.signature if t.startswith("*"))
        return f"{self.kernel}({ptrs}; {consts})"


def variant_of(fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Variant:
    """The variant a launch `fn[grid](*args, **kwargs)` asks for (fn: a JITFunction or an
    InterpretedFunction)."""
    py = fn.fn
    opts = tuple(
        sorted((k, int(kwargs.pop(k))) for k in ("num_warps", "num_stages") if k in kwargs)
    )
    params = inspect.signature(py).parameters
    bound = inspect.signature(py).bind(*args, **kwargs).arguments
    sig, consts = [], []
    for name, p in params.items():
        v = bound[name]
        if "constexpr" in str(p.annotation):
            sig.append((name, "constexpr"))
            consts.append((name, v))
        elif isinstance(v, torch.Tensor):
            sig.append((name, "*" + TYPES[v.dtype]))
        elif isinstance(v, bool):
            sig.append((name, "i1"))
        elif isinstance(v, float):
            sig.append((name, "fp32"))
        else:
            sig.append((name, "i64" if not -(2**31) <= int(v) < 2**31 else "i32"))
    return Variant(py.__module__, py.__name__, tuple(sig), tuple(consts), opts)


def gpu_variants(v: Variant) -> list[Variant]:
    """`v`, the variant a GPU launches for the same call (tensor cores for fp16/bf16 loads), and
    bf16 twins of fp16 ones."""
    out = [v]
    consts = dict(v.constexprs)
    if "UPCAST" in consts:
        first = next(t for _, t in v.signature if t in ("*fp16", "*bf16", "*fp32"))
        upcast = first == "*fp32"
        consts |= {"UPCAST": upcast, "PREC": "ieee" if upcast else "tf32"}
        out.append(Variant(v.module, v.kernel, v.signature, tuple(consts.items()), v.options))
    for w in list(out):
        if any(t == "*fp16" for _, t in w.signature):
            sig = tuple((n, "*bf16" if t == "*fp16" else t) for n, t in w.signature)
            out.append(Variant(w.module, w.kernel, sig, w.constexprs, w.options))
    return out


@dataclass
class Results:
    """Compiled variants and failures, per arch."""

    ok: dict[int, set[Variant]] = field(default_factory=dict)
    failed: dict[int, dict[Variant, str]] = field(default_factory=dict)

    def compile(self, v: Variant, archs: list[int]) -> None:
        """Compile `v` for each arch (once a process: later calls reuse the outcome)."""
        for arch in archs:
            done, bad = self.ok.setdefault(arch, set()), self.failed.setdefault(arch, {})
            if (v, arch) not in _COMPILED:
                _COMPILED[(v, arch)] = _compile(v, arch)
            error = _COMPILED[(v, arch)]
            if error is None:
                done.add(v)
            else:
                bad[v] = error


_COMPILED: dict[tuple[Variant, int], str | None] = {}  # (variant, arch) -> None or the error


def _compile(v: Variant, arch: int) -> str | None:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = getattr(importlib.import_module(v.module), v.kernel)
    if not hasattr(kernel, "params"):
        raise RuntimeError("compiling needs TRITON_INTERPRET unset (real kernels)")
    try:
        triton.compile(
            ASTSource(kernel, dict(v.signature), dict(v.constexprs)),
            target=GPUTarget("cuda", arch, 32),
            options=dict(v.options),
        )
    except Exception as e:  # every failure is reported, then fails the run
        error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}"
        print(f"FAIL sm_{arch} {v.describe()}: {error}", flush=True)
        return error
    return None


@contextlib.contextmanager
def compiling_instead(archs: list[int], results: Results) -> Iterator[Results]:
    """Within: every Triton launch compiles for `archs` instead of running, with the flags a
    GPU would choose (see the module's docstring)."""
    from triton.runtime.jit import JITFunction

    from layerswarm.kernels import triton_attention, triton_common, triton_quant

    def compile_instead(self: Any, *args: Any, grid: Any, warmup: bool, **kw: Any) -> None:
        for v in gpu_variants(variant_of(self, args, kw)):
            results.compile(v, archs)

    def gpu_flags(t: torch.Tensor) -> tuple[bool, str]:
        return t.dtype == torch.float32, "ieee" if t.dtype == torch.float32 else "tf32"

    saved = (
        JITFunction.run,
        triton_attention.dot_flags,
        triton_quant.dot_flags,
        triton_common.programs_wanted,
    )
    JITFunction.run = compile_instead  # type: ignore[method-assign]
    triton_attention.dot_flags = triton_quant.dot_flags = gpu_flags  # type: ignore[attr-defined]
    sms = 132  # an H100's SMs: decode splits as a big GPU cuts them
    triton_common.programs_wanted = lambda device: 2 * sms  # type: ignore[assignment]
    triton_attention.programs_wanted = triton_common.programs_wanted  # type: ignore[attr-defined]
    try:
        yield results
    finally:
        JITFunction.run = saved[0]  # type: ignore[method-assign]
        triton_attention.dot_flags, triton_quant.dot_flags = saved[1], saved[2]  # type: ignore[attr-defined]
        triton_common.programs_wanted = saved[3]  # type: ignore[assignment]
        triton_attention.programs_wanted = saved[3]  # type: ignore[attr-defined]


def compile_recorded(path: str, archs: list[int], results: Results) -> int:
    """Compile the variants a recorded run launched (and their GPU twins). Returns how many
    launches the file held."""
    with open(path) as f:
        rows = json.load(f)
    for row in rows:
        recorded = Variant(
            row["module"],
            row["kernel"],
            tuple(tuple(x) for x in row["signature"]),
            tuple(tuple(x) for x in row["constexprs"]),
            tuple(tuple(x) for x in row["options"]),
        )
        for v in gpu_variants(recorded):
            results.compile(v, archs)
    return len(rows)


# --- the pytest plugin: record every launch of an interpreted run ---------------------------

_recorded: set[Variant] = set()


def pytest_configure(config: Any) -> None:
    if not os.environ.get("LAYERSWARM_TRITON_RECORD"):
        return
    from triton.runtime.interpreter import InterpretedFunction

    original = InterpretedFunction.run

    def record(self: Any, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> Any:
        _recorded.add(variant_of(self, args, dict(kwargs)))
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = record  # type: ignore[method-assign]


def pytest_unconfigure(config: Any) -> None:
    path = os.environ.get("LAYERSWARM_TRITON_RECORD")
    if not path:
        return
    rows = [
        {
            "module": v.module,
            "kernel": v.kernel,
            "signature": v.signature,
            "constexprs": v.constexprs,
            "options": v.options,
        }
        for v in sorted(_recorded, key=repr)
    ]
    with open(path, "w") as f:
        json.dump(rows, f)
