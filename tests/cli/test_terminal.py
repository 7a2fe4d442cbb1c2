"""Tidy terminals: log lines never land mid-reply, progress is a bar on a terminal and plain lines
in a log."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest

from layerswarm.cli.chat import show
from layerswarm.cli.common import ProgressLine, quiet_logging
from layerswarm.cli.repl import Events


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_a_library_log_line_during_a_reply_gets_its_own_line(
    restore_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    events = Events()
    quiet_logging(events)
    library = logging.getLogger("layerswarm.swarm.dht")

    def reply() -> Iterator[str]:
        yield "The capital"
        library.info("DHT node 12D3KooW listening at /ip4/127.0.0.1/tcp/1")  # not shown
        library.warning("bootstrap peer unreachable")  # shown, on a line of its own
        yield " of France is Paris."

    assert show(reply(), events) == "The capital of France is Paris."
    out, err = capsys.readouterr()
    assert out == "The capital of France is Paris.\n"
    assert "DHT node" not in err
    assert err == "\n[warning: bootstrap peer unreachable]\n"  # a newline first: mid-reply


def test_progress_is_plain_lines_in_a_log() -> None:
    log = io.StringIO()
    progress = ProgressLine(log)
    for layer in range(1, 31):
        progress(f"loading layer {layer}/30", layer / 30)
    lines = log.getvalue().splitlines()
    assert lines[0] == "loading layer 1/30 (3%)" and lines[-1] == "loading layer 30/30 (100%)"
    assert len(lines) == 11  # one each tenth, and the end
    assert "\r" not in log.getvalue()


def test_progress_is_a_bar_on_a_terminal() -> None:
    term = Tty()
    progress = ProgressLine(term)
    progress("fetching smollm2-135m", None)
    for n in range(1, 11):
        progress(f"converting {n}/10 tensors", n / 10)
    progress("loading layer 1/1", 1.0)
    text = term.getvalue()
    assert text.startswith("fetching smollm2-135m\n")
    assert "\r" in text and "#####" in text  # redrawn in place, as a bar (ASCII: no UTF-8 here)
    assert "converting 10/10 tensors" in text and "100%" in text
    assert text.count("\n") == 3  # one line per task: the message, the two bars
