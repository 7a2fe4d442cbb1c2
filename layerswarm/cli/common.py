"""What every command shares: the cache directory, model resolution with progress, logging."""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from layerswarm.errors import LayerswarmError


def default_cache_dir() -> Path:
    """`$LAYERSWARM_CACHE`, else `$XDG_CACHE_HOME/layerswarm`, else `~/.cache/layerswarm`."""
    if env := os.environ.get("LAYERSWARM_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "layerswarm"


def default_config_dir() -> Path:
    """`$LAYERSWARM_CONFIG`, else `$XDG_CONFIG_HOME/layerswarm`, else `~/.config/layerswarm`."""
    if env := os.environ.get("LAYERSWARM_CONFIG"):
        return Path(env)
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "layerswarm"


def runtime_dir() -> Path:
    """Where processes of this user meet while they run: `$XDG_RUNTIME_DIR/layerswarm`, else a
    folder of the user's in the temp dir (peers sharing a GPU register there)."""
    if env := os.environ.get("XDG_RUNTIME_DIR"):
        return Path(env) / "layerswarm"
    import tempfile

    return Path(tempfile.gettempdir()) / f"layerswarm-{os.getuid()}"


class ProgressLine:
    """Shows long work (download, conversion, loading) on stderr: a progress bar on a terminal
    (tqdm's, already here through gguf), plain lines in a log (one each 10%)."""

    def __init__(self, stream=sys.stderr) -> None:  # type: ignore[no-untyped-def]
        self.stream = stream
        self.tty = stream.isatty()
        self.decile = -1  # the last tenth of the work reported (no terminal)
        self.bar: Any = None  # the tqdm bar of the work in progress (terminal)
        self.task = ""  # its name: the message's first word ("loading", "converting", ...)

    def __call__(self, message: str, fraction: float | None = None) -> None:
        if self.tty:
            self._draw(message, fraction)
            return
        if fraction is None or fraction >= 1.0 or int(fraction * 10) > self.decile:
            text = message if fraction is None else f"{message} ({fraction:.0%})"
            self.stream.write(text + "\n")
            self.decile = -1 if fraction is None or fraction >= 1.0 else int(fraction * 10)
            self.stream.flush()

    def _draw(self, message: str, fraction: float | None) -> None:
        from tqdm import tqdm

        task = message.split(" ", 1)[0]
        if self.bar is not None and (fraction is None or task != self.task):
            self._close()
        if fraction is None:
            self.stream.write(message + "\n")
            self.stream.flush()
            return
        if self.bar is None:
            self.task = task
            fmt = "{desc} {bar} {percentage:3.0f}% {elapsed}"
            self.bar = tqdm(desc=message, total=1000, file=self.stream, bar_format=fmt)
        self.bar.set_description_str(message, refresh=False)
        self.bar.update(max(0, round(fraction * 1000) - self.bar.n))
        if fraction >= 1.0:
            self._close()

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def resolve_model_cli(name_or_path: str, cache_dir: Path) -> Path:
    """Resolve a model name, folder or GGUF file, showing progress on stderr."""
    from layerswarm.shards.registry import resolve_model

    return resolve_model(name_or_path, cache_dir, progress=ProgressLine())


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def quiet_logging(say: Callable[[str], None]) -> None:
    """For commands a person reads (swarm-chat, swarm-demo): warnings and errors only, each as
    one quiet line through `say`, which puts it on a line of its own even mid-reply (no
    library's INFO line lands in the middle of the chat)."""

    class Quiet(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            try:
                say(f"{record.levelname.lower()}: {record.getMessage()}")
            except Exception:
                self.handleError(record)

    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(Quiet())
    root.setLevel(logging.WARNING)


def route_libp2p_logs(verbose: bool) -> None:
    """Send py-libp2p's log through ours: errors only, warnings too with --verbose.

    py-libp2p 0.8.1 detaches its logger when imported, and warns at every DHT stream a remote
    closes early ("Failed to read DHT message from stream"): a peer got ~6 a second, which
    Python's last-resort handler printed raw. So: import it, then reattach its logger.
    """
    import libp2p  # noqa: F401  # its import resets its logger, so this goes after it

    logger = logging.getLogger("libp2p")
    logger.propagate = True
    logger.setLevel(logging.WARNING if verbose else logging.ERROR)


def fail(message: str, code: int = 1) -> None:
    """Print a one-line error for the user and exit."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def run_main(main_fn, argv: list[str] | None = None) -> None:  # type: ignore[no-untyped-def]
    """Call `main_fn(argv)`, turning our errors into one line instead of a traceback, then exit
    at once (`exit_now`)."""
    code: int | str | None = 0
    try:
        main_fn(argv)
    except LayerswarmError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        code = 130
    except SystemExit as e:
        code = e.code
    exit_now(code)


def exit_now(code: int | str | None) -> None:
    """Exit with `code` (a string is printed, as `SystemExit` does, and exits 1) without the
    interpreter's teardown.

    Why: torch imports Triton where it is installed (torch._dynamo does, even for building an
    `nn.Embedding`), and at teardown Triton's nanobind bindings print ~30 lines of "nanobind:
    leaked N instances / types / functions" on every exit. Every resource of ours is closed by
    `main_fn` itself before this (peers, connections, threads), so only the streams and the log
    handlers are left to flush.
    """
    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    atexit._run_exitfuncs()  # what was registered to run at exit still runs (CPython's own call)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        # a closed pipe: nothing more reaches the reader anyway
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code or 0)


def mdns_interfaces(values: list[str] | None, private: bool = False) -> tuple[str, ...] | None:
    """`--mdns-interface` values: None (the flag not given) means every interface, `none` off.

    In a private swarm (`private`), not given means off: mDNS announcements are not encrypted.
    """
    if values is None:
        return None if private else ()
    if "none" in values:
        return None
    return tuple(values)


def read_swarm_key(path: Path) -> bytes:
    """A private swarm's 32-byte key from `path`: the raw bytes, or 64 hex digits."""
    from layerswarm.swarm.dht import SWARM_KEY_BYTES

    try:
        data = path.read_bytes()
    except OSError as e:
        raise SystemExit(f"error: --swarm-key: {e}") from None
    if len(data) == SWARM_KEY_BYTES:
        return data
    try:
        key = bytes.fromhex(data.decode().strip())
    except ValueError:
        key = b""
    if len(key) != SWARM_KEY_BYTES:
        raise SystemExit(
            f"error: --swarm-key: {path} holds neither {SWARM_KEY_BYTES} bytes "
            f"nor {2 * SWARM_KEY_BYTES} hex digits"
        )
    return key
