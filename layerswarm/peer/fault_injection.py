"""A test-only fault injector: makes a peer lie or misbehave on purpose, to test the client.

Honoured only through `swarm-peer start --test-fault-injector SPEC`, a hidden flag that the
tests and `scripts/bench_verify.py` use; a peer started without it behaves normally. SPEC is a
comma-separated list of `key=value`:

- `perturb=RATE`: on a share RATE of steps, add noise of 10% of the output's RMS (a liar);
- `nan=RATE`: on a share RATE of steps, answer NaN;
- `dtype=NAME`: answer every step in this dtype (float16, bfloat16, float32);
- `claim_s_per_layer=X`: claim this decode time a layer in `InfoReply.extra` (inf, 0, 1e-30...);
- `model=TEXT`: claim to serve this model (a lying `InfoReply`);
- `seed=N`: the seed of the choice of steps (default 0).
"""

from __future__ import annotations

import dataclasses
import logging
import random

import torch

from layerswarm.swarm.protocol import DTYPES, InfoReply

log = logging.getLogger(__name__)

_KEYS = ("perturb", "nan", "dtype", "claim_s_per_layer", "model", "seed")


class FaultInjector:
    """Alters a peer's replies as SPEC says (see the module's docstring)."""

    def __init__(self, spec: str) -> None:
        self.options: dict[str, str] = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            key, sep, value = part.partition("=")
            if not sep or key not in _KEYS:
                raise ValueError(f"fault injector: {part!r} is not one of {', '.join(_KEYS)}=...")
            self.options[key] = value
        if "dtype" in self.options and self.options["dtype"] not in DTYPES:
            raise ValueError(f"fault injector: unknown dtype {self.options['dtype']!r}")
        self.perturb = float(self.options.get("perturb", 0.0))
        self.nan = float(self.options.get("nan", 0.0))
        self.rng = random.Random(int(self.options.get("seed", 0)))
        self.steps = 0  # steps answered
        self.altered = 0  # steps whose output was altered
        log.warning("TEST FAULT INJECTOR ACTIVE: this peer misbehaves on purpose (%s)", spec)

    def step(self, out: torch.Tensor) -> torch.Tensor:
        """A step's output, altered or not."""
        self.steps += 1
        if self.nan and self.rng.random() < self.nan:
            self.altered += 1
            out = torch.full_like(out, float("nan"))
        elif self.perturb and self.rng.random() < self.perturb:
            self.altered += 1
            rms = out.float().pow(2).mean().sqrt()
            noise = torch.randn(out.shape, generator=torch.Generator().manual_seed(self.steps))
            out = (out.float() + 0.1 * rms * noise).to(out.dtype)
        if "dtype" in self.options:
            out = out.to(DTYPES[self.options["dtype"]])
        return out

    def info(self, reply: InfoReply) -> InfoReply:
        """The peer's InfoReply, with the claims SPEC asks for."""
        if "claim_s_per_layer" in self.options:
            extra = {**reply.extra, "decode_s_per_layer": float(self.options["claim_s_per_layer"])}
            reply = dataclasses.replace(reply, extra=extra)
        if "model" in self.options:
            reply = dataclasses.replace(reply, model=self.options["model"])
        return reply
