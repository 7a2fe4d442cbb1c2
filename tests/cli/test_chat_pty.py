"""`swarm-chat` driven through a pseudo-terminal, as a person types into it.

Each test starts `python -m layerswarm.cli.chat` on a pty (so Ctrl-C is a real `\\x03` keystroke
that the terminal turns into SIGINT), types lines, and reads the streamed output with timeouts.
Prompts are ones SmolLM2-135M answers right greedily.
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import signal
import struct
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from layerswarm.peer.launch import even_spans, start_peers
from layerswarm.shards.config import Span

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class Terminal:
    """A child process on a pty: type into it, wait for what it prints."""

    def __init__(self, args: list[str]) -> None:
        env = dict(os.environ, TERM="dumb", PYTHONUNBUFFERED="1")
        pid, fd = pty.fork()
        if pid == 0:  # the child: its controlling terminal is the pty
            os.execve(sys.executable, [sys.executable, "-m", "layerswarm.cli.chat", *args], env)
        self.pid, self.fd = pid, fd
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
        self.out = ""  # everything read, escape sequences removed
        self.mark = 0  # `expect` looks from here on

    def _read(self, deadline: float) -> bool:
        ready, _, _ = select.select([self.fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            return False
        try:
            data = os.read(self.fd, 65536)
        except OSError:  # EIO: the child closed the terminal
            return False
        if not data:
            return False
        self.out += ANSI.sub("", data.decode("utf-8", "replace").replace("\r", ""))
        return True

    def expect(self, text: str, timeout: float = 30.0) -> str:
        """Wait until `text` appears after the mark; move the mark past it; return what came."""
        deadline = time.monotonic() + timeout
        while (at := self.out.find(text, self.mark)) == -1:
            if time.monotonic() > deadline or not self._read(deadline):
                raise AssertionError(f"no {text!r} in {timeout} s; got:\n{self.out[self.mark :]}")
        seen, self.mark = self.out[self.mark : at + len(text)], at + len(text)
        return seen

    def type(self, line: str) -> None:
        """Type a line and press Enter; wait for its echo, so replies are read after it."""
        os.write(self.fd, line.encode() + b"\r")
        self.expect(line, 10)

    def ask(self, line: str, timeout: float = 60.0) -> str:
        """Type a line and return everything printed up to the next prompt."""
        self.type(line)
        return self.expect("\n> ", timeout)

    def wait_exit(self, timeout: float = 20.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            self._read(time.monotonic() + 0.1)
        raise AssertionError(f"still running after {timeout} s; got:\n{self.out[self.mark :]}")

    def close(self) -> None:
        try:
            if os.waitpid(self.pid, os.WNOHANG) == (0, 0):
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass
        os.close(self.fd)


@pytest.fixture
def open_chat() -> Iterator[object]:
    terminals: list[Terminal] = []

    def start(*args: str) -> Terminal:
        term = Terminal(["--temperature", "0", "--max-new-tokens", "64", *args])
        terminals.append(term)
        term.expect("> ", 120)  # the model is loaded
        return term

    yield start
    for term in terminals:
        term.close()


def test_answers_and_remembers_the_previous_turn(open_chat, smollm2_dir: Path) -> None:  # type: ignore[no-untyped-def]
    chat = open_chat("--local", "--model", str(smollm2_dir))
    assert "Paris" in chat.ask("What is the capital of France?")
    assert "local: every layer in this process" in chat.ask("/route")
    stats = chat.ask("/stats")
    assert "tokens/s" in stats and "first token after" in stats
    chat.ask("/reset")
    # Alone, the second question gets a made-up word; the answer must come from the first turn.
    assert "banana" in chat.ask("The secret word is 'banana'.")
    assert "banana" in chat.ask("What is the secret word?")
    assert "already in the session" in chat.ask("/stats")
    os.write(chat.fd, b"\x04")  # Ctrl-D at the prompt: leave
    assert chat.wait_exit() == 0
    assert "Traceback" not in chat.out


def test_ctrl_c_stops_a_reply_and_the_chat_goes_on(open_chat, smollm2_dir: Path) -> None:  # type: ignore[no-untyped-def]
    chat = open_chat("--local", "--model", str(smollm2_dir), "--max-new-tokens", "400")
    chat.type("Write a long story about a dragon who learns to bake bread.")
    first = chat.out[chat.mark :]
    while len(chat.out) - chat.mark < 40 + len(first):  # some of the reply has streamed
        assert chat._read(time.monotonic() + 30), chat.out
    os.write(chat.fd, b"\x03")
    chat.expect("(stopped", 20)
    chat.expect("> ", 20)
    assert "Paris" in chat.ask("What is the capital of France?")
    # A SIGINT that lands before readline waits for a key is only seen at the next key (CPython
    # checks signals when its select() is interrupted), so give it the moment a person takes.
    time.sleep(0.5)
    os.write(chat.fd, b"\x03")  # Ctrl-C at the prompt: leave
    assert chat.wait_exit() == 0
    assert "Traceback" not in chat.out


def test_route_lists_both_peers(open_chat, smollm2_dir: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with start_peers(smollm2_dir, even_spans(30, 2), tmp_path) as swarm:
        peers = [arg for address in swarm.addresses for arg in ("--peer", address)]
        chat = open_chat("--model", str(smollm2_dir), *peers)
        assert "Paris" in chat.ask("What is the capital of France?")
        route = chat.ask("/route")
        for address, span in zip(swarm.addresses, ("0:15", "15:30"), strict=True):
            assert f"layers {span}: {address.split('/')[0]} (peer" in route
        chat.type("/quit")
        assert chat.wait_exit() == 0


def test_lost_peer_is_one_quiet_line_and_the_reply_comes(
    open_chat, smollm2_dir: Path, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    spans = [Span(0, 15), Span(15, 30), Span(15, 30)]
    with start_peers(smollm2_dir, spans, tmp_path) as swarm:
        peers = [arg for address in swarm.addresses for arg in ("--peer", address)]
        chat = open_chat("--model", str(smollm2_dir), *peers)
        assert "banana" in chat.ask("The secret word is 'banana'.")
        route = chat.ask("/route")
        used = next(p for p in swarm.peers[1:] if f"15:30: {p.address.split('/')[0]}" in route)
        used.stop(signal.SIGKILL)  # between turns: the open session has lost a hop
        reply = chat.ask("What is the secret word?")
        assert "[rerouted layers 15:30" in reply
        assert "banana" in reply  # the new hop got the conversation replayed
        assert "Traceback" not in chat.out and "error:" not in chat.out
        chat.type("/quit")
        assert chat.wait_exit() == 0
