"""How much work each turn of a span's compute loop takes on, and the steps it queues.

`scheduler.StepScheduler` runs them; the defaults below are what its measurements chose.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import torch

from layerswarm.errors import LayerswarmError
from layerswarm.shards.config import Span
from layerswarm.shards.kv_cache import SessionCache

# Measured with scripts/bench_scheduler.py on this project's 2-core CPU machine (shared with other
# work: sizes interleaved, 3 rounds, median [min..max]), SmolLM2-135M fp32, all 30 layers.
# Token budget, while sessions decode: 4 sessions decoding beside a chunk of a 2,000-token prompt,
# 1,000 tokens in; a decode-only step took 84 ms (an earlier run: 83 ms; 64: 3.5x, 128: 5.8x).
#   budget 16: step 162 [115..] ms (1.9x), prefill  74 tok/s
#   budget 32: step 197 [137..] ms (2.3x), prefill 142 tok/s
#   budget 64: step 289 [192..] ms (3.4x), prefill 208 tok/s
# 32 is the largest budget that keeps a decoding session's gap under 3x while a prompt prefills.
# Prefill chunk, when no session decodes: the same prompt alone, and the longest pause of a decoder
# whose step arrives as the last (slowest) chunk starts: that chunk, then a budget-32 step.
#   chunk   32: 234 [ 12..249] tok/s, pause  325 ms ( 1.7x the 197 ms budget-32 gap)
#   chunk  128: 363 [304..373] tok/s, pause  542 [473..581] ms ( 2.8x)
#   chunk  256: 361 [336..373] tok/s, pause 1027 [1023..1085] ms ( 5.2x)
#   chunk  512: 334 [300..365] tok/s, pause 2032 ms (10.3x)
#   chunk 1024: 241 [229..279] tok/s, pause 5328 ms (27.1x): attention over a long chunk costs more
# Prefill speed flattens at 128-256 tokens and falls past 256; 128 is where it flattens and the
# largest size measured whose pause stays under 3x the gap, so a lone prompt prefills 1.55x faster
# than in budget-sized chunks. A peer that serves prompts more than chats can raise both
# (`token_budget`, `prefill_chunk`).
DEFAULT_TOKEN_BUDGET = 32
DEFAULT_PREFILL_CHUNK = 128
# A session counts as decoding for this long after its last decode step, so that the small budget
# holds between its steps (its next one arrives after the client samples and other hops run): with
# only queued steps counting, each turn would start while the decoders' next steps are on their
# way, and every gap would hold a big chunk.
DEFAULT_DECODE_LINGER = 1.0


@dataclass(frozen=True)
class SchedulerConfig:
    """How much work one turn of the compute loop takes on."""

    token_budget: int = DEFAULT_TOKEN_BUDGET  # unit: tokens per iteration while sessions decode
    max_batch: int = 16  # unit: sessions per iteration
    decode_threads: int = 0  # unit: threads for a one-session one-token step; 0: all of torch's
    # unit: tokens per iteration when no session decodes (token_budget if that is larger)
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK
    # unit: s after its last decode step that a session still counts as decoding (its next
    # step is on its way: the client samples, other hops run); 0: only a queued step counts
    decode_linger: float = DEFAULT_DECODE_LINGER
    # unit: s to wait, before a batch, for sessions that decoded in the last one and come back
    # at once (`_regroup`); 0: never wait. The local engine sets it: there the next steps come
    # after the head samples on this same compute thread. A peer leaves it 0: its sessions'
    # next steps come after other hops, and taking turns with them is the pipelining.
    regroup_wait: float = 0.0

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.token_budget <= self.max_batch:
            raise ValueError(
                f"need max_batch >= 1 and token_budget > max_batch (so that prefills advance "
                f"beside a full batch of decode steps), got {self.max_batch}, {self.token_budget}"
            )
        if self.decode_linger < 0:
            raise ValueError(f"need decode_linger >= 0, got {self.decode_linger}")


class PositionGap(LayerswarmError):
    """A step starts past the end of what its session holds (an earlier step of it failed)."""


@dataclass(eq=False)
class Job:
    """One step of a session, queued or running, possibly in several chunks."""

    seq: SessionCache
    hidden: torch.Tensor  # (tokens, hidden) in the model's dtype
    start: int
    layers: Span
    out_dtype: torch.dtype
    timeout: float | None  # unit: s from the first chunk's start; None: no limit
    order: int  # arrival number: older work goes first
    done: asyncio.Future[torch.Tensor] = field(repr=False)
    ran: int = 0  # unit: tokens computed so far
    deadline: float | None = None  # unit: monotonic s; set when the first chunk runs
    parts: list[torch.Tensor] = field(default_factory=list)

    @property
    def total(self) -> int:
        return int(self.hidden.shape[0])

    @property
    def remaining(self) -> int:
        return self.total - self.ran
