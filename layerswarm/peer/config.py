"""What a peer daemon is told at start."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from layerswarm.shards.config import Span
from layerswarm.shards.scheduler import (
    DEFAULT_PREFILL_CHUNK,
    DEFAULT_TOKEN_BUDGET,
    SchedulerConfig,
)
from layerswarm.swarm.limits import ListenLimits


@dataclass(frozen=True)
class PeerConfig:
    """One peer: what it serves, where it listens, and the limits it keeps."""

    model_dir: Path  # a Hugging Face style model folder (already resolved)
    model_name: str  # what the peer announces; clients check it matches theirs
    span: Span | None  # the layers served, half-open; None: chosen from the swarm at start
    host: str = "127.0.0.1"  # address to listen on
    port: int = 0  # TCP port; 0 picks a free one (see the ready line)
    dtype: str = "float32"  # compute dtype: float32, bfloat16 or float16
    device: str = "cpu"  # where the span runs: auto, cpu, cuda or cuda:N (see shards.device)
    kernels: str = "auto"  # auto (Triton on CUDA, torch elsewhere), torch or triton
    cuda_graphs: bool = True  # replay decode steps from CUDA graphs (CUDA with Triton only)
    # the folder where peers sharing a GPU coordinate (`peer.gpu_share`); None: they do not
    gpu_share_dir: Path | None = None
    quant: str = "none"  # weight-only quantization at load: none, int8 or int4
    quant_group_size: int = 32  # unit: inputs per int4 scale (32 matches a Q4 GGUF's grid)
    cache_memory_bytes: int = 256 * 2**20  # bytes: KV-cache budget for all sessions together
    max_session_length: int = 8192  # tokens: the longest session one client may open
    session_idle_timeout: float = 300.0  # s: a session with no request this long is dropped
    # s: a step still running this long after its first chunk ran is cancelled (waiting behind
    # other sessions' work does not count: a busy peer is not a dead one)
    step_timeout: float = 30.0
    # s: a pushed step may take this long to go down the rest of its route, and a client's
    # collect waits this long for its step to arrive
    push_timeout: float = 600.0
    max_batch: int = 16  # sessions: steps of this many sessions run as one batch
    token_budget: int = DEFAULT_TOKEN_BUDGET  # tokens a batch: decode steps + prefill chunks
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK  # tokens a batch when no session decodes
    cache_reserve: float = 0.1  # fraction of KV pages new sessions leave for open ones to grow
    admission_queue: int = 32  # sessions: opens that may wait for KV memory at once
    admission_timeout: float = 10.0  # s: an open waits this long for memory, then cache_full
    max_sessions_per_client: int = 64  # sessions one client (peer ID) may hold open here
    max_client_cache_fraction: float = 0.5  # fraction of KV pages one client's sessions may hold
    memory_budget_bytes: int = 0  # bytes for weights and KV cache with `span` None; 0: half free
    mdns_interfaces: tuple[str, ...] | None = None  # announce on these (() = every one); None: off
    announce_refresh: float = 10.0  # unit: s between record refreshes (free cache, load)
    rebalance_interval: float = 30.0  # unit: s between looks at the swarm (auto spans); 0: never
    discovery_wait: float = 3.0  # unit: s to gather the swarm's records before choosing a span
    key_path: Path | None = None  # the peer's Ed25519 key file; created if missing
    insecure_plaintext: bool = False  # no TLS; trusted LANs and measurements only
    dht: bool = False  # run a DHT node, so that others can bootstrap from this peer
    bootstrap: tuple[str, ...] = ()  # DHT members' multiaddrs to join through (implies `dht`)
    dht_port: int = 0  # TCP port of the DHT node; 0 picks a free one
    record_ttl: float = 60.0  # unit: s each signed DHT record is valid; re-put every third of it
    # 32 bytes: a private swarm's key, for the DHT and the data plane; None: an open swarm
    swarm_key: bytes | None = field(default=None, repr=False)
    limits: ListenLimits = field(default_factory=ListenLimits)  # caps on strangers' connections
    handshake_timeout: float = 5.0  # unit: s for a new connection's TLS handshake, then its Hello
    test_faults: str = ""  # tests only: `fault_injection.FaultInjector`'s SPEC; "": behave

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
