"""GGUF tensors to safetensors: dequantizing, undoing llama.cpp's q/k row order, tensors built
from several GGUF tensors, and writing layer by layer in a chosen order."""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, ReaderTensor, quants

from layerswarm.errors import ModelFormatError

Progress = Callable[[str, float | None], None]


def meta_int(meta: dict[str, Any], key: str, path: Path, default: int | None = None) -> int:
    """The integer metadata `key`, or `default`; a clear error when missing or not one number."""
    value = meta.get(key, default)
    if value is None:
        raise ModelFormatError(f"{path} lacks the GGUF metadata {key!r}")
    if not isinstance(value, int):
        raise ModelFormatError(f"{path}: {key!r} is {value!r}; layerswarm needs one number here")
    return value


def as_float32(value: float) -> float:
    # GGUF stores float32: 1e-5 is 9.999999747e-06 there; keep the shortest float32 spelling.
    return float(str(np.float32(value)))


@dataclass(frozen=True)
class Entry:
    """One tensor to write: its Hugging Face name, its GGUF source, and how to undo llama.cpp."""

    name: str
    source: ReaderTensor
    unpermute_heads: int | None = None  # unit: heads of the Q/K row interleave to undo
    expert: int | None = None  # which expert of a stacked `(experts, out, in)` source to write

    @property
    def shape(self) -> tuple[int, ...]:
        # GGUF lists dimensions fastest first, the reverse of torch: [576, 49152] is (49152, 576).
        shape = tuple(int(d) for d in reversed(self.source.shape.tolist()))
        return shape if self.expert is None else shape[1:]


@dataclass(frozen=True)
class Derived:
    """A tensor built from GGUF tensors: `chunks()` yields its data in order, piece by piece
    (one expert at a time), so memory stays bounded. `dtype` is safetensors' (`F32`, `U8`)."""

    name: str
    shape: tuple[int, ...]
    sources: tuple[ReaderTensor, ...]  # read through dequantize_rows when dtype is F32
    chunks: Callable[[], Iterator[np.ndarray]]
    dtype: str = "F32"


Planned = Entry | Derived
_DTYPES: dict[str, np.dtype[Any]] = {"F32": np.dtype("<f4"), "U8": np.dtype("u1")}


def source_names(entries: list[Planned]) -> set[str]:
    """The GGUF tensors the entries read."""
    names: set[str] = set()
    for e in entries:
        names.update(s.name for s in (e.sources if isinstance(e, Derived) else (e.source,)))
    return names


def check_types(entries: list[Planned]) -> None:
    """Fail before writing anything if a tensor type cannot be dequantized (one row is tried)."""
    seen = set()
    for e in entries:
        if isinstance(e, Derived) and e.dtype != "F32":
            continue  # raw bytes, not dequantized
        for source in e.sources if isinstance(e, Derived) else (e.source,):
            if source.tensor_type not in seen:
                seen.add(source.tensor_type)
                dequantize_rows(source, source.data[:1])


def dequantize(tensor: ReaderTensor) -> np.ndarray:
    """The tensor as float32 in torch's dimension order."""
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    return dequantize_rows(tensor, tensor.data).reshape(shape)


def dequantize_rows(tensor: ReaderTensor, data: np.ndarray) -> np.ndarray:
    """`data`, a slice of `tensor.data` along its leading axes, as float32."""
    try:
        values = quants.dequantize(data, GGMLQuantizationType(tensor.tensor_type))
    except NotImplementedError:
        raise ModelFormatError(
            f"tensor {tensor.name!r} is stored as {tensor.tensor_type.name}, which the gguf "
            "package cannot dequantize"
        ) from None
    return np.asarray(values, dtype=np.float32)


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo the Q/K row interleave of llama.cpp's convert_hf_to_gguf (its `LlamaModel.permute`).

    llama.cpp's RoPE rotates adjacent pairs, Hugging Face's rotates the two halves of each head, so
    the converter reorders each head's rows `w.reshape(n_heads, 2, d, ...).swapaxes(1, 2)`.
    """
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise ModelFormatError(f"{rows} rows do not split into {n_heads} heads of pairs")
    # (n_heads, head_dim // 2, 2, ...) -> (n_heads, 2, head_dim // 2, ...)
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_safetensors(path: Path, entries: list[Planned], progress: Progress | None) -> None:
    """Write tensors in the given order, dequantizing one at a time to bound memory.

    `safetensors.save_file` sorts tensors by name (layer 10 before layer 2); the format itself
    allows any order, so the header is written by hand.
    """
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for e in entries:
        dtype = e.dtype if isinstance(e, Derived) else "F32"
        size = _DTYPES[dtype].itemsize * math.prod(e.shape)
        header[e.name] = {
            "dtype": dtype,
            "shape": list(e.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    stacked: tuple[str, np.ndarray] | None = None  # the last expert stack, dequantized once
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for n, e in enumerate(entries, 1):
            if isinstance(e, Derived):
                _write_derived(f, e)
            else:
                stacked = _write_entry(f, e, stacked)
            if progress is not None:
                progress(f"converting {n}/{len(entries)} tensors", n / len(entries))


def _write_entry(
    f: Any, e: Entry, stacked: tuple[str, np.ndarray] | None
) -> tuple[str, np.ndarray] | None:
    """Write one float32 tensor; returns the expert stack dequantized for the next entry."""
    if e.expert is None:
        w = dequantize(e.source)
    else:  # experts of one stack are written one after another
        if stacked is None or stacked[0] != e.source.name:
            stacked = (e.source.name, dequantize(e.source))
        w = stacked[1][e.expert]
    if w.shape != e.shape:
        raise ModelFormatError(f"tensor {e.source.name!r} has shape {w.shape}, expected {e.shape}")
    if e.unpermute_heads is not None:
        w = _unpermute(w, e.unpermute_heads)
    f.write(np.ascontiguousarray(w, dtype="<f4").tobytes())
    return stacked


def _write_derived(f: Any, e: Derived) -> None:
    dtype = _DTYPES[e.dtype]
    expected, written = dtype.itemsize * math.prod(e.shape), 0
    for chunk in e.chunks():
        data = np.ascontiguousarray(chunk, dtype=dtype).tobytes()
        written += len(data)
        if written > expected:
            break
        f.write(data)
    if written != expected:  # a bug in the plan, not in the file: fail rather than misalign
        raise ModelFormatError(f"{e.name}: built {written} bytes, expected {expected}")
