"""`swarm-chat`'s interactive mode: the prompt, its slash commands, Ctrl-C, and quiet events.

The conversation's session stays open between turns (`routing.conversation.ChatSession`), so a
turn sends only its new tokens. Ctrl-C during a reply stops it: the part already shown stays in
the conversation as the assistant's turn (the model sees what the person saw). Ctrl-C at the
prompt, EOF or /quit end the chat.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import TextIO

from layerswarm.errors import LayerswarmError
from layerswarm.routing.conversation import ChatSession, Route
from layerswarm.routing.generate import GenerationStats, Generator
from layerswarm.routing.sampling import SamplingConfig
from layerswarm.routing.text import Message

COMMANDS = """commands:
  /route        the peers and layers of the session in use (or the last one)
  /stats        speed, time to first token and route of the last reply
  /system TEXT  set the system message (the conversation goes on)
  /reset        forget the conversation (the system message stays)
  /save FILE    write the conversation to FILE as JSON
  /help         this list
  /quit         leave (so do Ctrl-D and Ctrl-C at the prompt)
Ctrl-C during a reply stops it; what was shown stays in the conversation."""


def dim(text: str, stream: TextIO) -> str:
    return f"\x1b[2m{text}\x1b[0m" if stream.isatty() else text


def say(text: str) -> None:
    """A quiet line for the person (stderr, dim on a terminal)."""
    print(dim(text, sys.stderr), file=sys.stderr, flush=True)


def error(text: str) -> None:
    print(f"error: {text}", file=sys.stderr, flush=True)


class Events:
    """Swarm events (reroutes, peers leaving) as one dim line each, on their own line."""

    def __init__(self) -> None:
        self.mid_line = False  # a reply is being printed and its line is not finished

    def __call__(self, text: str) -> None:
        prefix = "\n" if self.mid_line else ""
        self.mid_line = False
        print(prefix + dim(f"[{text}]", sys.stderr), file=sys.stderr, flush=True)


def show(pieces: Iterable[str], events: Events | None = None) -> str:
    """Print pieces as they come; return the whole reply. A Ctrl-C stops reading and is raised
    again with what was shown so far (as `Stopped`).

    The Ctrl-C is also noted, and looked for after each piece: Python raises it wherever the
    main thread is, and one raised inside a finalizer (`__del__`, a weakref callback, the
    collector) is printed as ignored and lost, so the reply would run on to its end."""
    reply: list[str] = []
    pressed = threading.Event()

    def on_ctrl_c(signum: int, frame: object) -> None:
        pressed.set()
        raise KeyboardInterrupt

    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, on_ctrl_c) if in_main else None
    try:
        for piece in pieces:
            if pressed.is_set():
                raise KeyboardInterrupt
            sys.stdout.write(piece)
            sys.stdout.flush()
            reply.append(piece)
            if events is not None:
                events.mid_line = not piece.endswith("\n")
        if pressed.is_set():
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        close = getattr(pieces, "close", None)
        if close is not None:
            close()
        raise Stopped("".join(reply)) from None
    finally:
        if in_main:
            signal.signal(signal.SIGINT, previous or signal.default_int_handler)
        if events is not None:
            events.mid_line = False
    sys.stdout.write("\n")
    sys.stdout.flush()
    return "".join(reply)


class Stopped(Exception):
    """Ctrl-C during a reply; `partial` is what had been shown."""

    def __init__(self, partial: str) -> None:
        super().__init__(partial)
        self.partial = partial


def describe_route(route: Route | None, local: bool) -> str:
    """One line per hop: its layers, its address and its peer ID, shortened."""
    if local:
        return "local: every layer in this process"
    if not route:
        return "no session yet"
    return "\n".join(f"  layers {span}: {describe_peer(address)}" for address, span in route)


def describe_peer(address: str) -> str:
    where, _, peer_id = address.partition("/")
    # As `swarm_client.short` does; importing it would load zeroconf for --local chats too.
    return f"{where} (peer …{peer_id[-8:]})" if peer_id else where


def describe_stats(stats: GenerationStats, route: str) -> str:
    return (
        f"last reply: {stats.new_tokens} tokens, first token after {stats.prefill_seconds:.2f} s, "
        f"{stats.decode_tokens_per_second:.1f} tokens/s; prompt {stats.prompt_tokens} tokens "
        f"({stats.reused_tokens} already in the session)"
        + (
            f"; {stats.tokens_per_pass:.2f} tokens a pass through the layers "
            f"({stats.accepted_tokens} of {stats.drafted_tokens} guesses stood)"
            if stats.drafted_tokens
            else ""
        )
        + f"\nroute:\n{route}"
    )


class Chat:
    """One person's conversation with a generator."""

    def __init__(
        self,
        gen: Generator,
        sampling: SamplingConfig,
        system: str | None,
        max_context: int | None = None,
        events: Events | None = None,
    ) -> None:
        self.gen = gen
        self.sampling = sampling
        self.session = ChatSession(gen, max_context)
        self.events = events
        self.local = getattr(gen, "client", None) is None
        self.messages: list[Message] = [{"role": "system", "content": system}] if system else []
        self.replies = 0  # unit: replies generated (finished or stopped)

    def run(self) -> None:
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  # line editing and history for input()
        # Ctrl-C stops a reply or leaves, even where the chat was started with SIGINT ignored
        # (a shell's `cmd &` without job control does that, and Python then leaves it so).
        signal.signal(signal.SIGINT, signal.default_int_handler)
        say("chat with the model; /help lists the commands")
        try:
            while True:
                try:
                    line = input("> ").strip()
                except (EOFError, KeyboardInterrupt):
                    print(file=sys.stderr)
                    return
                if line and not self.handle(line):
                    return
        finally:
            self.session.close()

    def handle(self, line: str) -> bool:
        """Act on one line; False when the chat should end."""
        if not line.startswith("/"):
            self.ask(line)
            return True
        command, _, arg = line.partition(" ")
        arg = arg.strip()
        if command in ("/quit", "/exit"):
            return False
        if command == "/help":
            say(COMMANDS)
        elif command == "/reset":
            self.messages = [m for m in self.messages if m["role"] == "system"]
            self.session.close()
            say("(the conversation is forgotten)")
        elif command == "/system" and arg:
            self.messages = [{"role": "system", "content": arg}] + [
                m for m in self.messages if m["role"] != "system"
            ]
            say("(system message set)")
        elif command == "/route":
            print(self.route(), flush=True)
        elif command == "/stats":
            self.stats()
        elif command == "/save" and arg:
            self.save(Path(arg).expanduser())
        else:
            error(f"unknown command or missing argument: {line} (/help lists the commands)")
        return True

    def ask(self, text: str) -> None:
        self.messages.append({"role": "user", "content": text})
        try:
            reply = show(self.session.chat(self.messages, self.sampling), self.events)
        except Stopped as stop:
            self.replies += 1
            sys.stdout.write("\n")
            if stop.partial:
                say("(stopped; the part shown stays in the conversation)")
                self.messages.append({"role": "assistant", "content": stop.partial})
            else:
                say("(stopped before any text; the question is dropped)")
                self.messages.pop()
            return
        except (LayerswarmError, ValueError) as e:
            self.messages.pop()  # unanswered: the question can be asked again
            error(str(e))
            return
        self.replies += 1
        self.messages.append({"role": "assistant", "content": reply})

    def route(self) -> str:
        route = self.session.route or self.session.last_route
        if route or self.local:
            return describe_route(route, self.local)
        views = self.gen.client.views()  # type: ignore[attr-defined]
        known = "".join(f"\n  layers {v.span}: {describe_peer(v.address)}" for v in views)
        return f"no session yet; peers known:{known or ' none'}"

    def stats(self) -> None:
        if not self.replies:
            say("no reply yet")
            return
        route = describe_route(self.session.last_route, self.local)
        print(describe_stats(self.gen.last_stats, route), flush=True)

    def save(self, path: Path) -> None:
        try:
            path.write_text(json.dumps(self.messages, indent=2, ensure_ascii=False) + "\n")
        except OSError as e:
            error(f"cannot write {path}: {e.strerror or e}")
            return
        say(f"(saved {len(self.messages)} messages to {path})")
