"""Hugging Face model names (`ORG/NAME`, `ORG/NAME@REVISION`): only the files this process needs.

`resolve_hub_model` brings the small files into the local Hugging Face cache (config.json,
the tokenizer files, the safetensors index) and returns the snapshot folder; the weights come
later, when a span or the client's head is loaded, and then only the shards that hold those
tensors (`fetch_weight_files`). A peer serving layers 12-23 of a 48-layer model downloads about
a quarter of the weights; a client the shards with the embedding and the head.

The download itself is `huggingface_hub`'s (the user's token, endpoint, proxy and cache settings
apply). An interrupted download resumes shard by shard: every finished shard stays in the
cache and is not fetched again; within a run, a dropped connection resumes with a byte range
(huggingface_hub 2.4 no longer resumes a half-written file across processes: its PR #4228).
What is already in the cache is used without the network, so `HF_HUB_OFFLINE=1` works for
anything fetched before.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from layerswarm.errors import LayerswarmError, ModelFormatError
from layerswarm.shards.gguf_tensors import Progress

INDEX = "model.safetensors.index.json"
SMALL_FILES = (  # fetched at resolution, when the repository has them
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    INDEX,
)
_NAME = re.compile(r"^([A-Za-z0-9][\w.-]*/[\w.-]+)(?:@([\w./-]+))?$")
_SNAPSHOT = re.compile(r"^models--(.+)$")


def parse_hub_name(text: str) -> tuple[str, str | None] | None:
    """`("ORG/NAME", revision or None)` for a Hugging Face model name, else None."""
    m = _NAME.match(text)
    if m is None or text.startswith((".", "/", "~")):
        return None
    return m[1], m[2]


def resolve_hub_model(
    name: str, cache_dir: Path | None = None, progress: Progress | None = None
) -> Path:
    """The snapshot folder of a Hub model in the local HF cache, with its small files.

    Args:
        name: `ORG/NAME` or `ORG/NAME@REVISION` (a branch, tag or commit).
        cache_dir: the Hugging Face hub cache; None: huggingface_hub's (`HF_HUB_CACHE`).
        progress: told what is being downloaded.
    Returns:
        `<cache>/models--ORG--NAME/snapshots/<commit>`, holding config.json at least.
    Raises:
        ModelFormatError: `name` is not a Hub name, or the model is not cached and cannot be
            downloaded (offline, unknown repository or revision, no config.json).
    """
    parsed = parse_hub_name(name)
    if parsed is None:
        raise ModelFormatError(f"{name!r} is not a Hugging Face name (ORG/NAME[@REVISION])")
    repo, revision = parsed
    config = _cached(repo, "config.json", revision, cache_dir)
    if config is not None:
        return config.parent
    from huggingface_hub import constants

    if constants.is_offline_mode():
        raise ModelFormatError(
            f"{name} is not in the Hugging Face cache ({cache_dir or constants.HF_HUB_CACHE}) "
            "and HF_HUB_OFFLINE is set: download it once with the network on"
        )
    present = set(_repo_files(repo, revision))
    if "config.json" not in present:
        raise ModelFormatError(f"{name} has no config.json: not a transformers model")
    folder: Path | None = None
    for file in SMALL_FILES:
        if file in present:
            path = _download(repo, file, revision, cache_dir, progress)
            folder = folder or path.parent
    assert folder is not None  # config.json is in SMALL_FILES and present
    return folder


def shards_for(weight_map: dict[str, str], names: Iterable[str]) -> list[str]:
    """The shard files that hold `names`, sorted (`model-00002-of-00004...` before `-00003`).

    Raises:
        ModelFormatError: the index names no file for one of them.
    """
    missing = [n for n in names if n not in weight_map]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ModelFormatError(f"the safetensors index lacks {', '.join(missing[:3])}{more}")
    return sorted({weight_map[n] for n in names})


def fetch_weight_files(
    model_dir: Path, names: Iterable[str], progress: Progress | None = None
) -> None:
    """Make sure the weight files holding `names` are in `model_dir`, downloading what a Hub
    snapshot lacks (a plain folder must have them already; loading then names what is missing).
    """
    model_dir = Path(model_dir)
    index = model_dir / INDEX
    if index.is_file():
        files = shards_for(dict(json.loads(index.read_text())["weight_map"]), list(names))
    elif not any(model_dir.glob("*.safetensors")):
        files = ["model.safetensors"]  # one-file models carry no index
    else:
        return
    missing = [f for f in files if not (model_dir / f).is_file()]
    origin = snapshot_origin(model_dir)
    if not missing or origin is None:
        return
    cache_dir, repo, commit = origin
    for n, file in enumerate(missing, 1):
        if progress is not None:
            progress(f"downloading {repo} {file} ({n}/{len(missing)})", None)
        _download(repo, file, commit, cache_dir, progress)


def snapshot_origin(model_dir: Path) -> tuple[Path, str, str] | None:
    """`(hub cache, "ORG/NAME", commit)` when `model_dir` is a Hugging Face cache snapshot
    (`<cache>/models--ORG--NAME/snapshots/<commit>`), else None."""
    model_dir = Path(model_dir).absolute()
    repo_dir = model_dir.parent.parent
    m = _SNAPSHOT.match(repo_dir.name)
    if model_dir.parent.name != "snapshots" or m is None:
        return None
    return repo_dir.parent, m[1].replace("--", "/"), model_dir.name


def _cached(repo: str, file: str, revision: str | None, cache_dir: Path | None) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, file, cache_dir=cache_dir, revision=revision)
    return Path(found) if isinstance(found, str) else None


def _repo_files(repo: str, revision: str | None) -> list[str]:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    try:
        return list(HfApi().list_repo_files(repo, revision=revision))
    except RepositoryNotFoundError:
        raise ModelFormatError(
            f"no model {repo} on the Hugging Face Hub (or it is gated: run `hf auth login`)"
        ) from None
    except (HfHubHTTPError, OSError) as e:
        raise LayerswarmError(f"could not list {repo} on the Hugging Face Hub: {e}") from None


def _download(
    repo: str, file: str, revision: str | None, cache_dir: Path | None, progress: Progress | None
) -> Path:
    """One file into the HF cache (resuming a cut-off download), reported to `progress`."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    cached = _cached(repo, file, revision, cache_dir)
    if cached is not None:
        return cached
    if constants.is_offline_mode():
        raise ModelFormatError(
            f"{repo}: {file} is not in the Hugging Face cache and HF_HUB_OFFLINE is set; "
            "run once with the network on to download it"
        )
    try:
        path = hf_hub_download(
            repo,
            file,
            revision=revision,
            cache_dir=cache_dir,
            tqdm_class=_bar_class(f"downloading {repo} {file}", progress),
        )
    except LocalEntryNotFoundError:
        raise ModelFormatError(
            f"{repo}: {file} is not in the Hugging Face cache and cannot be downloaded "
            "(offline?); run once with the network on"
        ) from None
    except (HfHubHTTPError, OSError) as e:
        raise LayerswarmError(
            f"downloading {repo} {file} failed: {e}; run again (finished shards are kept)"
        ) from e
    return Path(str(path))


def _bar_class(label: str, progress: Progress | None) -> Any:
    """A tqdm class whose bars report to `progress` instead of drawing (None: tqdm's own)."""
    if progress is None:
        return None
    report = progress
    from tqdm.auto import tqdm

    class Bar(tqdm):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["file"] = io.StringIO()  # drawn by `progress`, not on stderr
            super().__init__(*args, **kwargs)
            self._decile = -1

        def update(self, n: float | None = 1) -> bool | None:
            shown: bool | None = super().update(n)
            if self.total:
                fraction = min(1.0, self.n / self.total)
                if int(fraction * 100) > self._decile:  # at most one report per percent
                    self._decile = int(fraction * 100)
                    report(label, fraction)
            return shown

    return Bar
