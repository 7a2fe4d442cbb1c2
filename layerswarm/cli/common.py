"""What every command shares: the cache directory, model resolution with progress, logging."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

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


class ProgressLine:
    """Shows long work (download, conversion, loading) on stderr, one line rewritten in place."""

    def __init__(self, stream=sys.stderr) -> None:  # type: ignore[no-untyped-def]
        self.stream = stream
        self.tty = stream.isatty()
        self.last = ""

    def __call__(self, message: str, fraction: float | None = None) -> None:
        text = message if fraction is None else f"{message} ({fraction:.0%})"
        if self.tty:
            self.stream.write("\r\x1b[2K" + text)
            if fraction is not None and fraction >= 1.0:
                self.stream.write("\n")
        elif text != self.last and (
            fraction is None or fraction >= 1.0 or _step(fraction, self.last)
        ):
            self.stream.write(text + "\n")
        self.stream.flush()
        self.last = text


def _step(fraction: float, last: str) -> bool:
    # Without a terminal, print a line each 10% so logs stay short.
    return int(fraction * 100) % 10 == 0


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
    """Call `main_fn(argv)`, turning our errors into one line instead of a traceback."""
    try:
        main_fn(argv)
    except LayerswarmError as e:
        fail(str(e))
    except KeyboardInterrupt:
        print(file=sys.stderr)
        raise SystemExit(130) from None
