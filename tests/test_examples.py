"""The runnable examples in examples/ run, and say what they should."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        ("local_generate.py", ["Paris", "banana"]),
        ("swarm_generate.py", ["Paris", "Berlin"]),
    ],
)
def test_example_runs(smollm2_dir: Path, script: str, expected: list[str]) -> None:
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / script)],
        capture_output=True,
        text=True,
        timeout=400,
        check=True,
    )
    for word in expected:
        assert word in out.stdout, out.stdout
