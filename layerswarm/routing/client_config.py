"""How a swarm client talks to peers, checks them, and reacts when they fail."""

from __future__ import annotations

from dataclasses import dataclass, field

from layerswarm.errors import ConfigError


@dataclass(frozen=True)
class ClientConfig:
    """How a client talks to peers and reacts when they fail."""

    connect_timeout: float = 3.0  # unit: s to reach a peer and prove who it is
    request_timeout: float = 10.0  # unit: s for small requests (info, open, close)
    step_timeout_floor: float = 1.0  # unit: s every step may take, whatever the peer's speed
    step_timeout_factor: float = 20.0  # unit: times a step's expected duration before giving up
    max_reroutes: int = 8  # unit: reroutes per step before the step fails
    ban_seconds: float = 5.0  # unit: s of a failed peer's first ban; doubles on each new failure
    max_ban_seconds: float = 60.0  # unit: s, the longest ban (a peer may come back)
    probe_timeout: float = 3.0  # unit: s for a slow step's peer to say it is still busy
    max_step_wait: float = 600.0  # unit: s a busy peer may take for one step, probes answered
    busy_wait_timeout: float = 30.0  # unit: s to wait for room when every replica is full
    # unit: s a step waits for a peer of layers that no live peer serves at the moment (the
    # only replica restarting) before it fails; the swarm is re-read meanwhile
    route_wait: float = field(
        default=30.0,
        metadata={
            "help": "seconds a request waits for a peer of layers that no live peer serves "
            "at the moment (a restarting replica) before it fails",
            "metavar": "S",
        },
    )
    replay_chunk_tokens: int = 4096  # unit: tokens per step when replaying into a new hop
    # Peers hand each step's activations straight to the next hop (N+1 link crossings a token
    # through N hops instead of 2N); False: the client relays every hop's output itself
    push: bool = True
    # Activations travel in this dtype; None: the hops' compute dtype (the widest of them, so
    # an fp32 swarm stays exact and a bf16 one sends half the bytes)
    wire_dtype: str | None = None
    # "int8": a prefill's activations travel as int8 with a scale per token (4x fewer bytes
    # than fp32; not exact: see docs/design.md for its quality), with push only. None: as is
    prefill_compression: str | None = None
    # unit: tokens; with push, a longer prompt goes down the hops in steps of this many, so
    # the second hop computes one while the first computes the next. 0: in one step
    prefill_chunk_tokens: int = 256
    # a session opens on the KV pages that peers keep for its prompt's first tokens (this
    # client's earlier sessions'), sending only the rest; False: every prompt in full
    prefix_cache: bool = field(
        default=True,
        metadata={
            "help": "send every prompt in full instead of starting on the KV pages the peers "
            "keep for its first tokens (a system prompt sent before)",
            "flag": "--no-prefix-cache",
        },
    )
    insecure_plaintext: bool = False  # no TLS; trusted LANs and measurements only
    mdns_interfaces: tuple[str, ...] | None = None  # browse mDNS here (() = every one); None: off
    refresh_interval: float = 5.0  # unit: s; a new session first re-reads the swarm if older
    discovery_timeout: float = 5.0  # unit: s to wait for discovered peers to cover every layer
    bootstrap: tuple[str, ...] = ()  # DHT members' multiaddrs to find peers through; (): no DHT
    # 32 bytes: a private swarm's key (its DHT and its peers admit only holders); None: open
    swarm_key: bytes | None = field(default=None, repr=False)
    verify_fraction: float = 0.02  # unit: share of steps re-run on another replica and compared
    verify_first_steps: int = 2  # unit: steps; each peer's first ones are always checked
    # check on this client's own computation of a span when no other replica serves it (loads
    # that span's weights from the model folder here, on first use)
    verify_locally: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.verify_fraction <= 1.0:
            raise ConfigError("verify_fraction", "must be between 0 and 1")
        for name in ("verify_first_steps", "route_wait", "busy_wait_timeout", "max_reroutes"):
            if getattr(self, name) < 0:
                raise ConfigError(name, "must not be negative")
