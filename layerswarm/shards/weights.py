"""Load a span's weights, or the client's, from memory-mapped safetensors, reading nothing else."""

from __future__ import annotations

import gc
import json
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, cast

import torch
from safetensors import safe_open

from layerswarm.errors import ModelFormatError
from layerswarm.shards.blocks import ClientHead, DecoderLayer, SpanModel
from layerswarm.shards.config import ModelConfig, Span
from layerswarm.shards.families import client_tensor_names, family_of, layer_tensor_names
from layerswarm.shards.hub import INDEX, fetch_weight_files

Progress = Callable[[str, float | None], None]


def freeze_heap() -> None:
    """Move every object alive now (the loaded model, the imported libraries) out of the
    garbage collector's sight (`gc.freeze`), once loading is done.

    A process serving a model holds ~340k objects, and a decode step makes hundreds of tensors:
    the collector's periodic full passes walked all of them, in the middle of steps. Frozen,
    a pass sees only what was made since. The synthetic MoE's one-thread fp32 decode, 150
    steps each way, interleaved: 38.1-39.1 ms a token against 40.4-41.1, and the slowest
    step 45-47 ms against 54. Objects made later are still collected as before.
    """
    gc.collect()
    gc.freeze()


class WeightFiles:
    """The tensors of a model folder: which file holds each name, opened lazily with mmap."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = model_dir
        self.where = _tensor_locations(model_dir)
        self.read: list[str] = []  # names read so far, in order (tests check what a span touches)
        self._stack = ExitStack()
        self._open: dict[str, Any] = {}

    def get(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """Read one tensor and cast it.

        Raises:
            ModelFormatError: no file in the folder holds `name`.
        """
        file = self.where.get(name)
        if file is None:
            raise ModelFormatError(f"the model in {self.model_dir} lacks the tensor {name!r}")
        if file not in self._open:
            path = str(self.model_dir / file)
            self._open[file] = self._stack.enter_context(safe_open(path, framework="pt"))
        self.read.append(name)
        tensor: torch.Tensor = self._open[file].get_tensor(name)
        return tensor.to(dtype)

    def has(self, name: str) -> bool:
        return name in self.where

    def close(self) -> None:
        self._stack.close()
        self._open.clear()


@contextmanager
def open_weights(model_dir: str | Path) -> Iterator[WeightFiles]:
    files = WeightFiles(Path(model_dir))
    try:
        yield files
    finally:
        files.close()


def _tensor_locations(model_dir: Path) -> dict[str, str]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        return dict(json.loads(index.read_text())["weight_map"])
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelFormatError(f"no *.safetensors weights in {model_dir}")
    where: dict[str, str] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():  # noqa: SIM118 (safe_open is not a dict)
                where[name] = f.name
    return where


def load_span(
    model_dir: str | Path,
    span: Span,
    dtype: torch.dtype = torch.float32,
    config: ModelConfig | None = None,
    files: WeightFiles | None = None,
    progress: Progress | None = None,
) -> SpanModel:
    """Build the layers `[span.start, span.end)` of the model in `model_dir`.

    Only those layers' tensors are read, so memory grows with the span, not the model. In a
    Hugging Face cache snapshot, the shards holding them are downloaded first if missing.

    Raises:
        ModelFormatError: the folder lacks config.json, weights, or one of the span's tensors.
    """
    config = config or ModelConfig.from_file(model_dir)
    if files is None:
        names = layer_tensor_names(config, range(span.start, span.end))
        fetch_weight_files(Path(model_dir), names, progress)
    with ExitStack() as stack:
        if files is None:
            files = stack.enter_context(open_weights(model_dir))
        with torch.device("meta"):
            model = SpanModel(config, span)
        for i, layer in enumerate(model.layers):
            _fill_layer(cast(DecoderLayer, layer), files, config, span.start + i, dtype)
            if progress:
                progress(
                    f"loading layer {span.start + i + 1}/{config.num_layers}", (i + 1) / len(span)
                )
    return model


def _fill_layer(
    layer: DecoderLayer, files: WeightFiles, config: ModelConfig, index: int, dtype: torch.dtype
) -> None:
    """Read layer `index`'s tensors, in the family's names, into `layer`."""
    state = family_of(config).layer_state(lambda name: files.get(name, dtype), config, index)
    layer.load_state_dict(state, strict=True, assign=True)


def load_client_head(
    model_dir: str | Path, dtype: torch.dtype = torch.float32, config: ModelConfig | None = None
) -> ClientHead:
    """Build the embedding, final norm and head: the parts a client holds (in a Hugging Face
    cache snapshot, only the shards holding them are downloaded)."""
    config = config or ModelConfig.from_file(model_dir)
    fetch_weight_files(Path(model_dir), client_tensor_names(config))
    with torch.device("meta"):
        head = ClientHead(config)
    with open_weights(model_dir) as files:
        params = {
            "embed.weight": files.get("model.embed_tokens.weight", dtype),
            "norm": files.get("model.norm.weight", dtype),
        }
        if not config.tie_word_embeddings:
            params["head.weight"] = files.get("lm_head.weight", dtype)
        head.load_state_dict(params, strict=False, assign=True)
    if config.tie_word_embeddings:
        head.head.weight = head.embed.weight
    return head


def model_fingerprint(model_dir: str | Path) -> str:
    """A short hash of a model's identity: its config and the names and sizes of its weights.

    Peers announce it and clients compare it, so that peers of different models or revisions
    never mix in one pipeline. Cheap: it reads no tensor data.
    """
    import hashlib

    model_dir = Path(model_dir)
    h = hashlib.sha256((model_dir / "config.json").read_bytes())
    index = model_dir / INDEX
    if index.is_file():  # a Hub snapshot holds only its span's shards: the index names all
        h.update(index.read_bytes())
        return h.hexdigest()[:16]
    for f in sorted(model_dir.glob("*.safetensors")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()[:16]
