"""Hugging Face names: resolution from a cache layout the test builds, offline, and the choice
of shards a span or a client needs on a 4-shard index. Nothing here touches the network."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from safetensors.torch import load_file, save_file

from layerswarm.errors import ModelFormatError
from layerswarm.shards.config import ModelConfig, Span
from layerswarm.shards.families import client_tensor_names, layer_tensor_names
from layerswarm.shards.hub import parse_hub_name, shards_for, snapshot_origin
from layerswarm.shards.registry import resolve_model
from layerswarm.shards.weights import load_client_head, load_span, model_fingerprint

COMMIT = "0123456789abcdef0123456789abcdef01234567"
SHARDS = [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
SMALL = ("config.json", "tokenizer.json", "tokenizer_config.json")


def shard_of(name: str) -> int:
    """Shard 1 (index 0): embedding and layer 0; 2 and 3: layers 1 and 2; 4: layer 3, norm
    and head."""
    if name.startswith("model.layers."):
        return int(name.split(".")[2])  # 4 layers, one a shard (0-based)
    return 0 if name == "model.embed_tokens.weight" else 3


def write_hub_cache(
    hub: Path,
    model_dir: Path,
    repo: str = "tiny-org/tiny-moe",
    shards: tuple[int, ...] = (0, 1, 2, 3),
) -> Path:
    """Lay out a Hugging Face cache (`models--ORG--NAME/{refs,snapshots}`) holding the model as
    4 shards with an index, only the shards listed present; returns the snapshot folder."""
    repo_dir = hub / f"models--{repo.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(COMMIT)
    (repo_dir / "refs" / "v1").write_text(COMMIT)
    tensors = load_file(model_dir / "model.safetensors")
    weight_map = {name: SHARDS[shard_of(name)] for name in tensors}
    for i in shards:
        part = {n: t for n, t in tensors.items() if weight_map[n] == SHARDS[i]}
        save_file(part, snapshot / SHARDS[i], metadata={"format": "pt"})
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (snapshot / "model.safetensors.index.json").write_text(json.dumps(index))
    for name in SMALL:
        (snapshot / name).write_bytes((model_dir / name).read_bytes())
    return snapshot


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


SHARD_CHOICE = {  # who: (span or None for the client, the shards it needs)
    "client: embedding and head": (None, [SHARDS[0], SHARDS[3]]),
    "first layer": (Span(0, 1), [SHARDS[0]]),
    "middle span": (Span(1, 3), [SHARDS[1], SHARDS[2]]),
    "last two layers": (Span(2, 4), [SHARDS[2], SHARDS[3]]),
    "all": (Span(0, 4), SHARDS),
}


@pytest.mark.parametrize("case", sorted(SHARD_CHOICE))
def test_only_the_shards_of_a_span_are_chosen(
    tiny_family: Callable[[str], Path], case: str
) -> None:
    model_dir = tiny_family("qwen3_moe")
    config = ModelConfig.from_file(model_dir)
    weight_map = {n: SHARDS[shard_of(n)] for n in load_file(model_dir / "model.safetensors")}
    span, expected = SHARD_CHOICE[case]
    names = (
        client_tensor_names(config)
        if span is None
        else layer_tensor_names(config, range(span.start, span.end))
    )
    assert shards_for(weight_map, names) == expected


def test_a_name_resolves_from_the_cache_offline_and_a_span_loads_from_its_shards(
    tiny_family: Callable[[str], Path], tmp_path: Path, offline: None
) -> None:
    model_dir = tiny_family("qwen3_moe")
    snapshot = write_hub_cache(tmp_path / "hub", model_dir, shards=(1, 2))  # a 1:3 peer's
    for name in ("tiny-org/tiny-moe", "tiny-org/tiny-moe@v1", f"tiny-org/tiny-moe@{COMMIT}"):
        assert resolve_model(name, tmp_path / "cache", hf_cache=tmp_path / "hub") == snapshot
    assert snapshot_origin(snapshot) == (tmp_path / "hub", "tiny-org/tiny-moe", COMMIT)
    hidden = torch.randn(1, 9, 64, generator=torch.Generator().manual_seed(1))
    ours, whole = load_span(snapshot, Span(1, 3)), load_span(model_dir, Span(1, 3))
    theirs = whole.state_dict()
    assert ours.state_dict().keys() == theirs.keys()
    for name, value in ours.state_dict().items():
        assert torch.equal(value, theirs[name]), name  # the same weights, bit for bit
    outs = []
    for m in (ours, whole):
        cache = m.new_cache(9)
        outs.append(m(hidden, [0], cache, [cache.allocate(9)]))
    # The same outputs but for the last bits: on some CPUs (an AMD EPYC) MKL's products depend
    # on where a weight sits in memory, and the two folders' files map tensors at other offsets.
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-5)
    # The same model, whichever shards a peer holds: peers of one model agree on its identity.
    assert model_fingerprint(snapshot) == model_fingerprint(
        write_hub_cache(tmp_path / "hub2", model_dir, shards=(0, 3))
    )
    # The client's shards (1 and 4) are not there, and offline they cannot come.
    with pytest.raises(ModelFormatError, match=r"model-00001-of-00004.*HF_HUB_OFFLINE"):
        load_client_head(snapshot)


def test_a_name_not_in_the_cache_offline_says_so(tmp_path: Path, offline: None) -> None:
    with pytest.raises(ModelFormatError, match=r"not in the Hugging Face cache.*HF_HUB_OFFLINE"):
        resolve_model("tiny-org/absent", tmp_path / "cache", hf_cache=tmp_path / "hub")


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("Qwen/Qwen3-30B-A3B", ("Qwen/Qwen3-30B-A3B", None)),
        ("openai/gpt-oss-20b@main", ("openai/gpt-oss-20b", "main")),
        ("org/name@refs/pr/1", ("org/name", "refs/pr/1")),
        ("smollm2-135m", None),
        ("./models/x", None),
        ("/abs/path", None),
        ("a/b/c", None),
    ],
)
def test_hugging_face_names_are_told_apart_from_paths(
    text: str, parsed: tuple[str, str | None] | None
) -> None:
    assert parse_hub_name(text) == parsed


def test_the_cli_resolves_a_name_through_the_hf_cache_of_its_environment(
    tiny_family: Callable[[str], Path], tmp_path: Path
) -> None:
    """`--model ORG/NAME` as a command gets it: HF_HUB_CACHE and HF_HUB_OFFLINE are honoured."""
    snapshot = write_hub_cache(tmp_path / "hub", tiny_family("qwen3_moe"))
    env = os.environ | {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    code = (
        "import sys; from layerswarm.cli.common import resolve_model_cli; "
        "print(resolve_model_cli(sys.argv[1], __import__('pathlib').Path(sys.argv[2])))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, "tiny-org/tiny-moe@v1", str(tmp_path / "cache")],
        env=env, capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    assert Path(out.stdout.strip()) == snapshot


class FakeHub(http.server.BaseHTTPRequestHandler):
    """A test-only stand-in for the Hub's HTTP API on loopback: the file tree, and files with
    the headers `hf_hub_download` reads (commit, ETag, size) and byte ranges (for resuming)."""

    files: ClassVar[dict[str, bytes]] = {}
    seen: ClassVar[list[tuple[str, str, str]]] = []  # (method, file, Range header)

    def log_message(self, *args: object) -> None:
        pass

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _serve(self, body: bool) -> None:
        path = urllib.parse.unquote(urllib.parse.urlparse(self.path).path)
        if path.startswith("/api/models/tiny-org/tiny-moe/tree/"):
            tree = [
                {"type": "file", "path": n, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                for n, b in self.files.items()
            ]
            self._send(200, json.dumps(tree).encode(), {"Content-Type": "application/json"}, body)
            return
        prefix = "/tiny-org/tiny-moe/resolve/"
        name = path[len(prefix) :].split("/", 1)[-1] if path.startswith(prefix) else ""
        if name not in self.files:
            self._send(404, b"not found", {"X-Error-Code": "EntryNotFound"}, body)
            return
        data = self.files[name]
        self.seen.append((self.command, name, self.headers.get("Range", "")))
        headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}
        status, start = 200, 0
        if rng := self.headers.get("Range"):
            start = int(rng.removeprefix("bytes=").split("-")[0])
            status = 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        self._send(status, data[start:], headers, body)

    def _send(self, status: int, data: bytes, headers: dict[str, str], body: bool) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)


def test_a_peer_downloads_only_its_span_with_progress_and_keeps_the_shards_it_has(
    tiny_family: Callable[[str], Path], tmp_path: Path
) -> None:
    repo_files = write_hub_cache(tmp_path / "source", tiny_family("qwen3_moe"))
    FakeHub.files = {f.name: f.read_bytes() for f in repo_files.iterdir()}
    FakeHub.seen = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    hub = tmp_path / "hub"
    # An earlier run that was cut off after the second shard: that one is in the cache.
    shard = FakeHub.files[SHARDS[1]]
    earlier = hub / "models--tiny-org--tiny-moe" / "snapshots" / COMMIT
    earlier.mkdir(parents=True)
    (earlier / SHARDS[1]).write_bytes(shard)
    (earlier.parent.parent / "refs").mkdir()
    (earlier.parent.parent / "refs" / "main").write_text(COMMIT)
    code = (
        "import sys; from pathlib import Path; from layerswarm.shards.config import Span; "
        "from layerswarm.shards.registry import resolve_model; "
        "from layerswarm.shards.weights import load_span; "
        "say = lambda m, f=None: print(m, f, file=sys.stderr); "
        "d = resolve_model('tiny-org/tiny-moe', Path(sys.argv[1]), say); "
        "load_span(d, Span(1, 3), progress=say); print(d)"
    )
    env = os.environ | {
        "HF_ENDPOINT": f"http://127.0.0.1:{server.server_address[1]}",
        "HF_HUB_CACHE": str(hub),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "NO_PROXY": "127.0.0.1",
    }
    env.pop("HF_HUB_OFFLINE", None)
    try:
        out = subprocess.run(
            [sys.executable, "-c", code, str(tmp_path / "cache")],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    finally:
        server.shutdown()
        server.server_close()
    assert out.returncode == 0, out.stderr
    fetched = [name for method, name, _ in FakeHub.seen if method == "GET"]
    # The small files and the one missing shard of span 1:3: not the client's, not the other.
    assert sorted(fetched) == sorted([*SMALL, "model.safetensors.index.json", SHARDS[2]])
    snapshot = Path(out.stdout.strip())
    assert snapshot == earlier
    assert (snapshot / SHARDS[2]).read_bytes() == FakeHub.files[SHARDS[2]]
    assert f"downloading tiny-org/tiny-moe {SHARDS[2]} (1/1)" in out.stderr  # progress shown
