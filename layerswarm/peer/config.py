"""What a peer daemon is told at start, checked when it is made.

Each field that `swarm-peer start` offers as a flag carries its help in its metadata
(`layerswarm.cli.config_flags` turns them into flags); the others are library-only knobs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from layerswarm.errors import ConfigError
from layerswarm.shards.config import DTYPES, Span
from layerswarm.shards.device import KERNEL_CHOICES
from layerswarm.shards.scheduler_config import (
    DEFAULT_PREFILL_CHUNK,
    DEFAULT_TOKEN_BUDGET,
    SchedulerConfig,
)
from layerswarm.swarm.limits import ListenLimits
from layerswarm.swarm.traversal import NatConfig

QUANTS = ("none", "int8", "int4")
# as `kernels.cpu_tuning.PLAN_MODES` (config imports no torch)
CPU_PLANS = ("measure", "remeasure", "fixed")
LIMITS = "limits on strangers (each refusal tells the client why)"  # flag groups
DHT = "WAN discovery (DHT) and private swarms"
SUPPRESS = "==SUPPRESS=="  # argparse.SUPPRESS: a flag left out of --help


def parse_layers(text: str) -> Span | None:
    """`--layers`: `A:B`, or `auto` (None: chosen from the swarm)."""
    return None if text == "auto" else Span.parse(text)


def parse_mib(text: str) -> int:
    """A size in MiB (fractions allowed) as bytes."""
    return int(float(text) * 2**20)


def show_mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:g}"


def _opt(help: str, **more: Any) -> dict[str, Any]:
    return {"help": help, **more}


def _mib(help: str, flag: str) -> dict[str, Any]:
    return _opt(help, flag=flag, metavar="MIB", parse=parse_mib, show=show_mib)


@dataclass(frozen=True)
class PeerConfig:
    """One peer: what it serves, where it listens, and the limits it keeps."""

    model_dir: Path  # a Hugging Face style model folder (already resolved)
    model_name: str  # what the peer announces; clients check it matches theirs
    # the layers served, half-open; None: chosen from the swarm at start (and moved later)
    span: Span | None = field(
        default=None,
        metadata=_opt(
            "serve layers A up to (not including) B; auto (the default): as many as the memory "
            "budget holds, where the swarm is weakest",
            flag="--layers",
            metavar="A:B|auto",
            parse=parse_layers,
        ),
    )
    # address to listen on. Every interface by default: a peer is there to be reached from
    # the LAN (the README's commands), and it admits strangers only within `limits`
    host: str = field(
        default="0.0.0.0",
        metadata=_opt(
            "address to listen on (default: every interface, so LAN clients can reach it)"
        ),
    )
    port: int = field(default=0, metadata=_opt("TCP port (0: pick a free one)"))
    # compute dtype: float32, bfloat16 or float16 (the command line picks one for the device)
    dtype: str = "float32"
    device: str = "cpu"  # where the span runs: cpu or cuda:N (the command line resolves auto)
    kernels: str = field(
        default="auto",
        metadata=_opt(
            "auto: Triton on CUDA, torch on a CPU; triton on a CPU runs Triton's interpreter "
            "(slow: for checking the Triton path end to end)",
            choices=list(KERNEL_CHOICES),
        ),
    )
    # replay decode steps from CUDA graphs (CUDA with Triton only)
    cuda_graphs: bool = field(
        default=True,
        metadata=_opt(
            "run decode steps eagerly on a GPU instead of replaying captured CUDA graphs",
            flag="--no-cuda-graphs",
        ),
    )
    # the folder where peers sharing a GPU coordinate (`peer.gpu_share`); None: they do not
    gpu_share_dir: Path | None = None
    quant: str = field(
        default="none",
        metadata=_opt("weight-only quantization of the span at load time", choices=list(QUANTS)),
    )
    # how the CPU linears' layouts are chosen: "measure" times them at load (`kernels.cpu_tuning`,
    # kept per CPU, torch and shape; "remeasure" times them again and replaces what was kept),
    # "fixed" the rule of `kernels.cpu_linear.default_plan`.
    # Processes that keep their plans in one folder get the same bits for a shape (exact-match
    # tests compare peers with the local engine); a fixed and a measuring one may differ
    cpu_plans: str = field(
        default="measure",
        metadata=_opt(
            "measure: time each CPU linear's layouts at load, once per CPU, torch and shape "
            "(kept in --cpu-plans-dir); remeasure: time them again and replace what was kept "
            "(on a quiet machine); fixed: a fixed rule, no timing",
            choices=list(CPU_PLANS),
        ),
    )
    # the folder of the measured CPU plans' file; None: the user's cache (~/.cache/layerswarm;
    # the command line gives its cache dir, $LAYERSWARM_CACHE if set)
    cpu_plans_dir: Path | None = field(
        default=None,
        metadata=_opt(
            "folder where the CPU layouts measured at load are kept (default: the model cache)",
            metavar="DIR",
            parse=Path,
        ),
    )
    # unit: inputs per int4 scale (32 matches a Q4 GGUF's grid)
    quant_group_size: int = field(
        default=32,
        metadata=_opt(
            "inputs per int4 scale (32 suits models converted from a Q4 GGUF)", metavar="N"
        ),
    )
    # bytes: KV-cache budget for all sessions together
    cache_memory_bytes: int = field(
        default=256 * 2**20,
        metadata=_mib("KV-cache budget for all sessions together, in MiB", "--cache-memory"),
    )
    # tokens: the longest session one client may open
    max_session_length: int = field(
        default=8192,
        metadata=_opt("the longest session one client may open, in tokens", metavar="TOKENS"),
    )
    # s: a session with no request this long is dropped
    session_idle_timeout: float = field(
        default=300.0,
        metadata=_opt("drop a session with no request for this long", metavar="S"),
    )
    # s: a step still running this long after its first chunk ran is cancelled (waiting behind
    # other sessions' work does not count: a busy peer is not a dead one)
    step_timeout: float = field(
        default=30.0,
        metadata=_opt(
            "a step running this long (from its first chunk; waiting in line is free) fails",
            metavar="S",
        ),
    )
    # s: a pushed step may take this long to go down the rest of its route, and a client's
    # collect waits this long for its step to arrive
    push_timeout: float = 600.0
    # sessions: steps of this many sessions run as one batch
    max_batch: int = field(default=16, metadata=_opt("sessions in one batch at most", metavar="N"))
    # tokens a batch: decode steps + prefill chunks
    token_budget: int = field(
        default=DEFAULT_TOKEN_BUDGET,
        metadata=_opt(
            "tokens a batch: every decode step, then prefill chunks up to this", metavar="TOKENS"
        ),
    )
    # tokens a batch when no session decodes
    prefill_chunk: int = field(
        default=DEFAULT_PREFILL_CHUNK,
        metadata=_opt(
            "tokens a batch takes of a prompt while no session decodes", metavar="TOKENS"
        ),
    )
    cache_reserve: float = 0.1  # fraction of KV pages new sessions leave for open ones to grow
    admission_queue: int = 32  # sessions: opens that may wait for KV memory at once
    # s: an open waits this long for memory, then cache_full
    admission_timeout: float = field(
        default=10.0,
        metadata=_opt(
            "a new session waits this long for KV memory before 'cache full'", metavar="S"
        ),
    )
    # sessions one client (peer ID) may hold open here
    max_sessions_per_client: int = field(
        default=64,
        metadata=_opt(
            "sessions one client may hold open here; more are refused with 'busy'", metavar="N"
        ),
    )
    # fraction of KV pages one client's sessions may hold
    max_client_cache_fraction: float = field(
        default=0.5,
        metadata=_opt(
            "share of the KV cache one client's sessions may hold while others want room",
            metavar="F",
            group=LIMITS,
        ),
    )
    # bytes for weights and KV cache with `span` None; 0: half the free memory
    memory_budget_bytes: int = field(
        default=0,
        metadata=_mib(
            "memory for weights and KV cache when --layers auto (default: half the free memory)",
            "--memory-budget",
        ),
    )
    mdns_interfaces: tuple[str, ...] | None = None  # announce on these (() = every one); None: off
    announce_refresh: float = 10.0  # unit: s between record refreshes (free cache, load)
    # unit: s between looks at the swarm (auto spans); 0: never
    rebalance_interval: float = field(
        default=30.0,
        metadata=_opt(
            "with --layers auto: look at the swarm this often and move where layers are "
            "missing (0: never)",
            metavar="S",
        ),
    )
    discovery_wait: float = 3.0  # unit: s to gather the swarm's records before choosing a span
    # the peer's Ed25519 key file; created if missing
    key_path: Path | None = field(
        default=None,
        metadata=_opt(
            "the peer's Ed25519 key (created if missing; default: in the config dir)",
            flag="--key",
            metavar="FILE",
            parse=Path,
        ),
    )
    # no TLS; trusted LANs and measurements only
    insecure_plaintext: bool = field(
        default=False,
        metadata=_opt("serve without encryption (trusted LANs and measurements only)"),
    )
    # run a DHT node, so that others can bootstrap from this peer
    dht: bool = field(
        default=False,
        metadata=_opt(
            "run a DHT node even without --bootstrap, so that others can bootstrap from this "
            "peer (its multiaddr is logged and in the ready line)",
            group=DHT,
        ),
    )
    # DHT members' multiaddrs to join through (implies `dht`)
    bootstrap: tuple[str, ...] = field(
        default=(),
        metadata=_opt(
            "join the DHT through this member, /ip4/A/tcp/P/p2p/PEERID (repeat for more; "
            "implies --dht)",
            metavar="MULTIADDR",
            group=DHT,
        ),
    )
    # TCP port of the DHT node; 0 picks a free one
    dht_port: int = field(
        default=0, metadata=_opt("TCP port of the DHT node (0: free)", metavar="N", group=DHT)
    )
    # unit: s each signed DHT record is valid; re-put every third of it
    record_ttl: float = field(
        default=60.0,
        metadata=_opt(
            "how long this peer's DHT record stays valid: a peer that stops answering drops "
            "out of others' view after this; re-announced every third of it",
            metavar="S",
            group=DHT,
        ),
    )
    # 32 bytes: a private swarm's key, for the DHT and the data plane; None: an open swarm
    swarm_key: bytes | None = field(default=None, repr=False)
    # caps on strangers' connections
    limits: ListenLimits = field(default_factory=ListenLimits, metadata={"group": LIMITS})
    # unit: s for a new connection's TLS handshake, then its Hello
    handshake_timeout: float = field(
        default=5.0,
        metadata=_opt(
            "a new connection's TLS handshake, then its Hello, must each finish within this",
            metavar="S",
            group=LIMITS,
        ),
    )
    # tests only: `fault_injection.FaultInjector`'s SPEC; "": behave
    test_faults: str = field(
        default="",
        metadata=_opt(SUPPRESS, flag="--test-fault-injector", group=LIMITS),
    )
    # reachability checks, relays and port mapping behind home routers (`swarm/traversal.py`)
    nat: NatConfig = field(default_factory=NatConfig)

    def __post_init__(self) -> None:
        _check_peer(self)

    @property
    def uses_dht(self) -> bool:
        return self.dht or bool(self.bootstrap)

    def serving(self) -> ServingConfig:
        """The part of the config the session table keeps."""
        return ServingConfig(
            SchedulerConfig(self.token_budget, self.max_batch, prefill_chunk=self.prefill_chunk),
            self.cache_reserve,
            self.admission_queue,
            self.admission_timeout,
            self.max_sessions_per_client,
            self.max_client_cache_fraction,
        )


@dataclass(frozen=True)
class ServingConfig:
    """How a peer's session table admits sessions and batches their steps."""

    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)  # budget, batch size
    cache_reserve: float = 0.1  # fraction of KV pages new sessions leave for open ones to grow
    admission_queue: int = 32  # sessions: opens that may wait for KV memory at once
    admission_timeout: float = 10.0  # s: an open waits this long for memory, then cache_full
    max_sessions_per_client: int = 64  # sessions one client (peer ID) may hold open here
    max_client_cache_fraction: float = 0.5  # fraction of KV pages one client's sessions may hold


def _check_peer(c: PeerConfig) -> None:
    """Raises ConfigError for the first field of `c` that holds a value it cannot take."""
    for name in ("port", "dht_port"):
        if not 0 <= getattr(c, name) <= 65535:
            raise ConfigError(name, "must be a TCP port, 0 to 65535 (0: a free one)")
    if c.dtype not in DTYPES:
        raise ConfigError("dtype", f"unknown dtype {c.dtype!r}: use {', '.join(DTYPES)}")
    if c.kernels not in KERNEL_CHOICES:
        raise ConfigError("kernels", f"must be one of {', '.join(KERNEL_CHOICES)}")
    if c.quant not in QUANTS:
        raise ConfigError("quant", f"must be one of {', '.join(QUANTS)}")
    if c.cpu_plans not in CPU_PLANS:
        raise ConfigError("cpu_plans", f"must be one of {', '.join(CPU_PLANS)}")
    for name in POSITIVE:
        if not getattr(c, name) > 0:
            raise ConfigError(name, "must be positive")
    for name in ("memory_budget_bytes", "rebalance_interval", "discovery_wait", "admission_queue"):
        if getattr(c, name) < 0:
            raise ConfigError(name, "must not be negative")
    if not 0 < c.max_client_cache_fraction <= 1:
        raise ConfigError("max_client_cache_fraction", "must be in (0, 1]")
    if not 0 <= c.cache_reserve < 1:
        raise ConfigError("cache_reserve", "must be in [0, 1)")
    if c.swarm_key is not None:
        from layerswarm.swarm.dht import SWARM_KEY_BYTES

        if len(c.swarm_key) != SWARM_KEY_BYTES:
            raise ConfigError("swarm_key", f"must be {SWARM_KEY_BYTES} bytes")
        if c.insecure_plaintext:
            raise ConfigError("swarm_key", "needs TLS, not insecure_plaintext")
    if c.bootstrap:
        from layerswarm.swarm.kad_service import check_bootstrap  # imports py-libp2p: only here

        try:
            check_bootstrap(list(c.bootstrap))
        except ValueError as e:
            raise ConfigError("bootstrap", str(e)) from None
    if c.test_faults:
        from layerswarm.peer.fault_injection import FaultInjector

        try:
            FaultInjector(c.test_faults)  # a bad SPEC fails here, not at the first step
        except ValueError as e:
            raise ConfigError("test_faults", str(e)) from None


POSITIVE = (
    "quant_group_size",
    "cache_memory_bytes",
    "max_session_length",
    "session_idle_timeout",
    "step_timeout",
    "push_timeout",
    "max_batch",
    "token_budget",
    "prefill_chunk",
    "admission_timeout",
    "max_sessions_per_client",
    "announce_refresh",
    "record_ttl",
    "handshake_timeout",
)
