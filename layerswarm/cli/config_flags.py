"""Command-line flags generated from config dataclasses: each option is declared once, on its field.

A field becomes a flag when its `metadata` holds a `help` (plain dict keys, so that configs in
`swarm/` and `peer/` need nothing from `cli/`):

    port: int = field(default=0, metadata={"help": "TCP port (0: pick a free one)"})

The flag's name (`--port`), type, default and dest come from the field; these keys adjust it:

- `flag`: another name (`--cache-memory` for `cache_memory_bytes`);
- `metavar`, `choices`, `group` (an argument group's title): as argparse takes them;
- `parse`: text to the field's value (MiB to bytes, `auto` to None); `show`: the default as the
  user writes it, for the help.

A bool field is a switch: `--flag` sets False where the default is True (`--relay` for
`push`). A `tuple[str, ...]` field is a repeatable flag. A field whose type is a dataclass is a
sub-config: its own fields' flags join the parser (dest `limits.max_connections`). The help
gets `(default: X)` unless it speaks of the default itself.

`config_from_args` builds the config back from the parsed flags. Configs check their values in
`__post_init__` and raise `ConfigError(field, problem)`; it becomes one line for the user,
`error: --flag: problem`.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from layerswarm.errors import ConfigError

C = TypeVar("C")
KEYS = frozenset({"help", "flag", "metavar", "choices", "group", "parse", "show"})


@dataclass(frozen=True)
class ConfigFlag:
    """One field's flag: where the field sits, and how argparse takes it."""

    path: tuple[str, ...]  # field names from the top config down: ("limits", "idle_timeout")
    name: str  # the flag: --connection-idle-timeout
    default: Any  # the field's default (a tuple field's is its default tuple)
    kind: type  # the field's type, Optional unwrapped
    repeated: bool  # a tuple[X, ...] field: one value per use of the flag
    meta: dict[str, Any]

    @property
    def dest(self) -> str:
        return ".".join(self.path)

    def argparse_kwargs(self) -> dict[str, Any]:
        help_text = self.meta["help"]
        if help_text == argparse.SUPPRESS:
            help_text = argparse.SUPPRESS  # argparse tells it by identity, not by value
        elif "default" not in help_text:
            shown = self.meta.get("show", str)(self.default) if self.default is not None else ""
            if self.kind is not bool and shown not in ("", "()"):
                help_text = f"{help_text} (default: {shown})"
        kwargs: dict[str, Any] = {"dest": self.dest, "help": help_text}
        if self.kind is bool:
            kwargs["action"] = "store_false" if self.default else "store_true"
            return kwargs
        kwargs["type"] = _parser(self.meta["parse"]) if "parse" in self.meta else self.kind
        kwargs["default"] = None if self.repeated else self.default
        if self.repeated:
            kwargs["action"] = "append"
        for key in ("metavar", "choices"):
            if key in self.meta:
                kwargs[key] = self.meta[key]
        return kwargs


def config_flags(
    cls: type, prefix: tuple[str, ...] = (), group: str | None = None
) -> Iterator[ConfigFlag]:
    """The flags of `cls`'s fields (with `help` in their metadata), sub-configs' included (in
    their field's `group`, unless they name their own)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind, optional = _unwrap(hints[f.name])
        if dataclasses.is_dataclass(kind) and not optional:
            inner = f.metadata.get("group", group)
            yield from config_flags(kind, (*prefix, f.name), inner)  # type: ignore[arg-type]
            continue
        if "help" not in f.metadata:
            continue
        unknown = set(f.metadata) - KEYS
        if unknown:
            raise TypeError(f"{cls.__name__}.{f.name}: unknown flag metadata {sorted(unknown)}")
        repeated = typing.get_origin(kind) is tuple
        if repeated:
            kind = typing.get_args(kind)[0]
        name = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
        meta = {"group": group, **f.metadata} if group else dict(f.metadata)
        yield ConfigFlag((*prefix, f.name), name, _default(f), kind, repeated, meta)


def add_config_flags(
    parser: argparse.ArgumentParser, cls: type, groups: dict[str, Any] | None = None
) -> None:
    """Add a flag to `parser` for each of `cls`'s fields that has a `help` (see the module)."""
    groups = {} if groups is None else groups
    for flag in config_flags(cls):
        target: Any = parser
        if title := flag.meta.get("group"):
            if title not in groups:
                groups[title] = parser.add_argument_group(title)
            target = groups[title]
        target.add_argument(flag.name, **flag.argparse_kwargs())


def config_from_args(
    cls: Callable[..., C],
    args: argparse.Namespace,
    flag_names: dict[str, str] | None = None,
    **given: Any,
) -> C:
    """`cls` built from the flags `add_config_flags` added, and `given` (fields set by the
    caller: values the command line reads from files or the machine); `flag_names` names the
    flag behind a given field, for the error.

    Raises:
        SystemExit: the config refused a value: `error: --flag: problem` (`error: problem`
            where the field has no flag of its own).
    """
    assert isinstance(cls, type)
    flags = {flag.path: flag for flag in config_flags(cls)}
    try:
        return typing.cast(C, _build(cls, (), flags, args, given))
    except ConfigError as e:
        flag = flags.get(tuple(e.field.split(".")))
        name = flag.name if flag else (flag_names or {}).get(e.field)
        raise SystemExit(f"error: {name}: {e.problem}" if name else f"error: {e}") from None
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def _build(
    cls: type,
    prefix: tuple[str, ...],
    flags: dict[tuple[str, ...], ConfigFlag],
    args: argparse.Namespace,
    given: dict[str, Any],
) -> Any:
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        path = (*prefix, f.name)
        kind, optional = _unwrap(hints[f.name])
        if not prefix and f.name in given:
            values[f.name] = given[f.name]
        elif dataclasses.is_dataclass(kind) and not optional:
            try:
                values[f.name] = _build(kind, path, flags, args, {})  # type: ignore[arg-type]
            except ConfigError as e:  # name the field from the top config down
                raise ConfigError(f"{f.name}.{e.field}", e.problem) from None
        elif (flag := flags.get(path)) is not None and hasattr(args, flag.dest):
            value = getattr(args, flag.dest)
            if flag.repeated:
                value = flag.default if value is None else tuple(value)
            values[f.name] = value
    unknown = set(given) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise TypeError(f"{cls.__name__} has no fields {sorted(unknown)}")
    return cls(**values)


def _parser(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """`parse`, its ValueError told as argparse tells a bad value: `argument --flag: why`."""

    def parsed(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parsed.__name__ = getattr(parse, "__name__", "value")
    return parsed


def _unwrap(hint: Any) -> tuple[Any, bool]:
    """`X | None` -> (X, True); anything else -> (it, False)."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        rest = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(rest) == 1:
            return rest[0], True
    return hint, False


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None
