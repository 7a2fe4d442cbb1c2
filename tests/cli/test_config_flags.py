"""Flags made from config fields: the defaults are the config's, and a bad value is one line."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from layerswarm.cli.config_flags import add_config_flags, config_flags, config_from_args
from layerswarm.cli.peer_args import build_parser
from layerswarm.errors import ConfigError
from layerswarm.peer.config import PeerConfig
from layerswarm.shards.config import Span
from layerswarm.swarm.limits import ListenLimits

# Every flag `swarm-peer start` had before its flags came from PeerConfig (README, tests).
PEER_FLAGS = [
    "--model",
    "--layers",
    "--rebalance-interval",
    "--memory-budget",
    "--mdns-interface",
    "--host",
    "--port",
    "--device",
    "--dtype",
    "--kernels",
    "--no-cuda-graphs",
    "--quant",
    "--quant-group-size",
    "--cache-memory",
    "--max-session-length",
    "--session-idle-timeout",
    "--step-timeout",
    "--max-batch",
    "--token-budget",
    "--prefill-chunk",
    "--admission-timeout",
    "--max-sessions-per-client",
    "--max-client-cache-fraction",
    "--max-connections",
    "--max-connections-per-ip",
    "--handshake-timeout",
    "--connection-idle-timeout",
    "--test-fault-injector",
    "--key",
    "--insecure-plaintext",
    "--metrics-port",
    "--metrics-host",
    "--dht",
    "--bootstrap",
    "--dht-port",
    "--record-ttl",
    "--swarm-key",
    "--verbose",
]


def start_parser() -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["start"]


def peer_config(argv: list[str]) -> PeerConfig:
    args = build_parser().parse_args(["start", *argv])
    return config_from_args(PeerConfig, args, model_dir=Path("m"), model_name="m")


def test_peer_start_keeps_every_flag() -> None:
    names = {s for a in start_parser()._actions for s in a.option_strings}
    assert set(PEER_FLAGS) <= names


def test_flag_defaults_are_the_configs() -> None:
    assert peer_config([]) == PeerConfig(Path("m"), "m")
    assert PeerConfig(Path("m"), "m").host == "0.0.0.0"  # one default, the one the CLI shows


@pytest.mark.parametrize(
    ("argv", "field_name", "value"),
    [
        (["--layers", "0:15"], "span", Span(0, 15)),
        (["--layers", "auto"], "span", None),
        (["--cache-memory", "0.0625"], "cache_memory_bytes", 65536),
        (["--memory-budget", "2"], "memory_budget_bytes", 2 * 2**20),
        (["--no-cuda-graphs"], "cuda_graphs", False),
        (["--key", "k.key"], "key_path", Path("k.key")),
        (["--host", "127.0.0.1", "--port", "7000"], "port", 7000),
    ],
)
def test_flags_reach_their_fields(argv: list[str], field_name: str, value: object) -> None:
    assert getattr(peer_config(argv), field_name) == value


def test_sub_config_flags_reach_the_sub_config() -> None:
    config = peer_config(["--max-connections", "4", "--connection-idle-timeout", "9"])
    assert config.limits == ListenLimits(max_connections=4, idle_timeout=9.0)


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--record-ttl", "0"], "error: --record-ttl: must be positive"),
        (["--max-client-cache-fraction", "2"], "error: --max-client-cache-fraction: must be in"),
        (["--connection-idle-timeout", "0"], "error: --connection-idle-timeout: must be positive"),
        (["--max-connections-per-ip", "0"], "error: --max-connections-per-ip: must be at least 1"),
        (["--port", "70000"], "error: --port: must be a TCP port"),
        (["--test-fault-injector", "x=1"], "error: --test-fault-injector: fault injector: 'x=1'"),
    ],
)
def test_a_bad_value_is_one_line_naming_its_flag(argv: list[str], says: str) -> None:
    with pytest.raises(SystemExit) as e:
        peer_config(argv)
    message = str(e.value.code)
    assert message.startswith(says) and "\n" not in message


def test_library_callers_get_the_same_checks() -> None:
    with pytest.raises(ConfigError, match="record_ttl: must be positive"):
        PeerConfig(Path("m"), "m", record_ttl=0)
    with pytest.raises(ConfigError, match="swarm_key: needs TLS"):
        PeerConfig(Path("m"), "m", swarm_key=bytes(32), insecure_plaintext=True)
    with pytest.raises(ValueError, match="idle_timeout"):  # a ConfigError is a ValueError
        ListenLimits(idle_timeout=0)


def test_a_given_fields_error_names_the_flag_behind_it() -> None:
    args = build_parser().parse_args(["start", "--insecure-plaintext"])
    with pytest.raises(SystemExit, match=r"^error: --swarm-key: needs TLS"):
        config_from_args(
            PeerConfig,
            args,
            {"swarm_key": "--swarm-key"},
            model_dir=Path("m"),
            model_name="m",
            swarm_key=bytes(32),
        )


def test_a_bad_span_is_refused_by_argparse_with_its_reason(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["start", "--layers", "5:2"])
    assert "argument --layers: a span is written START:END" in capsys.readouterr().err


@dataclass(frozen=True)
class Inner:
    depth: int = field(default=3, metadata={"help": "how deep", "metavar": "N"})


@dataclass(frozen=True)
class Toy:
    loud: bool = field(default=True, metadata={"help": "be quiet", "flag": "--quiet"})
    names: tuple[str, ...] = field(default=("a",), metadata={"help": "a name"})
    size: int = field(
        default=2**20,
        metadata={"help": "in MiB", "parse": lambda t: int(float(t) * 2**20), "show": str},
    )
    hidden: float = 1.5  # no help: no flag
    inner: Inner = field(default_factory=Inner, metadata={"group": "inner things"})

    def __post_init__(self) -> None:
        if self.inner.depth > 9:
            raise ConfigError("inner.depth", "too deep")


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], Toy()),
        (["--quiet"], Toy(loud=False)),
        (["--names", "x", "--names", "y"], Toy(names=("x", "y"))),
        (["--size", "2"], Toy(size=2 * 2**20)),
        (["--depth", "5"], Toy(inner=Inner(5))),
    ],
)
def test_generated_flags_by_field_kind(argv: list[str], expected: Toy) -> None:
    ap = argparse.ArgumentParser()
    add_config_flags(ap, Toy)
    assert config_from_args(Toy, ap.parse_args(argv)) == expected


def test_help_shows_the_configs_default_and_groups() -> None:
    ap = argparse.ArgumentParser()
    add_config_flags(ap, Toy)
    text = ap.format_help()
    assert "a name (default: ('a',))" in text and "(default: 3)" in text
    assert "inner things:" in text and "--hidden" not in text
    assert [f.name for f in config_flags(Toy)] == ["--quiet", "--names", "--size", "--depth"]


def test_a_nested_error_names_the_nested_flag() -> None:
    ap = argparse.ArgumentParser()
    add_config_flags(ap, Toy)
    with pytest.raises(SystemExit, match=r"^error: --depth: too deep$"):
        config_from_args(Toy, ap.parse_args(["--depth", "10"]))
