"""Checking what peers compute: cheap checks on every reply, and steps re-run on replicas.

Every reply is checked for its shape, its dtype (the one sent: peers answer in the caller's
dtype) and finite values, and its per-token norm against a bound learned from the first outputs
at that layer boundary. A reply that fails the first three is the sender's fault: the peer is
banned for a while and the step is redone elsewhere, so a wrong dtype is never blamed on the
next, honest peer. A norm past the bound is only suspicious: it makes the step checked.

A checked step is also run by another replica of the hop's span (a *shadow session* there), and
the two outputs are compared within a tolerance derived from the dtypes. On a mismatch, a third
replica decides; the one that disagrees with the two others is banned for good with its evidence
(`trust.TrustLedger`), and, when it was the hop's own peer, the step is redone on another one.

KV caches make a decode step impossible to check on a replica that lacks the session's context.
The shadow session gets that context lazily: before a checked step it is fed the inputs kept
since it was last fed (`RemoteSession.history`), merged into one chunked step. Where the
session began on a prefix the peers kept, the hop's boundary lacks those inputs: the hops
before it first compute them again (`Route.fill`, one prefill, once a session). Between checks it
costs nothing; each check costs one chunk of the tokens since the previous check (~50 tokens at
2%, about one decode step's time on a CPU, as decode reads the same weights) plus the step, run
at the same time as the hop's own step. See docs/design.md for the figures.
"""

from __future__ import annotations

import asyncio
import logging
import random
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from layerswarm import metrics
from layerswarm.errors import LayerswarmError
from layerswarm.routing.failures import HopFailed
from layerswarm.routing.hops import ActiveHop
from layerswarm.routing.kept_inputs import context_slice, merge_inputs
from layerswarm.routing.paths import PeerView
from layerswarm.routing.peer_book import token_rms
from layerswarm.routing.route import Route, Swarm
from layerswarm.routing.shadow import LOCAL, LocalChecker, Shadow
from layerswarm.shards.config import Span

log = logging.getLogger(__name__)

# Relative error allowed between two honest replicas: sqrt(eps) of the looser compute dtype.
# Measured (scripts/bench_verify.py --tolerance) on SmolLM2-135M, a shadow fed in one chunk
# against a peer that ran the same tokens one by one: fp32 differs by ~1e-6, bf16 by ~1e-2.
# sqrt(eps) gives fp32 3.5e-4, fp16 3.1e-2, bf16 8.8e-2: room for rounding, none for a liar
# who changes an activation by more.
COMPUTE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
WIRE_NAMES = {dtype: name for name, dtype in COMPUTE_DTYPES.items()}


def tolerance(*dtypes: str) -> float:
    """The relative error two honest peers computing in `dtypes` may show (the loosest)."""
    eps = max(torch.finfo(COMPUTE_DTYPES.get(d, torch.bfloat16)).eps for d in dtypes)
    return float(eps**0.5)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest per-token `|a - b| / |b|` of two `(1, tokens, hidden)` outputs."""
    a32, b32 = a.float(), b.float()
    diff = (a32 - b32).norm(dim=-1)  # (1, tokens)
    scale = b32.norm(dim=-1).clamp_min(1e-12)
    return float((diff / scale).max())


class CheckedSwarm(Swarm, Protocol):
    """What checks need of the swarm client beyond what a route does."""

    verify_counts: dict[str, int]  # checks by result: match, mismatch, error

    @property
    def local(self) -> LocalChecker | None:
        """This client's own computation of spans, where it may check peers on it."""


@dataclass
class Verifier:
    """Checks a session's steps on replicas; one per session."""

    route: Route
    swarm: CheckedSwarm
    rng: random.Random = field(default_factory=random.Random)
    shadows: dict[tuple[Span, str], Shadow] = field(default_factory=dict)
    planned: set[str] | None = None  # peers this step checks, when chosen for a whole path

    def plan(self, hops: Sequence[ActiveHop]) -> bool:
        """Choose now which hops' peers this step checks (for a pushed step, which the client
        checks only by relaying it); returns whether any is."""
        self.planned = {h.view.peer_id for h in hops if self._chosen(h.view.peer_id)}
        return bool(self.planned)

    def _chosen(self, peer_id: str) -> bool:
        """Whether to check this step of `peer_id`: its first steps, then a share at random."""
        config = self.swarm.config
        forced = self.swarm.book.trust.checks(peer_id).served < config.verify_first_steps
        return forced or self.rng.random() < config.verify_fraction

    async def step(
        self, hop: ActiveHop, hidden: torch.Tensor, start: int, truncate: int | None = None
    ) -> torch.Tensor:
        """The hop's output for this step, checked on a replica when chosen so.

        `truncate`: the step rolls the hop's session back first (`Step.truncate_to`).

        Raises:
            HopFailed: the hop failed, sent a malformed reply, or was caught lying.
        """
        primary = hop.view.peer_id
        planned = self.planned  # chosen for the whole path already (`plan`), or not
        chosen = primary in planned if planned is not None else self._chosen(primary)
        verifier = self._pick(hop, ()) if chosen else None
        if verifier is None:
            out = await self.route.calls.step(hop, hidden, start, truncate)
            if not self.swarm.book.norms.suspicious(hop.span.end, out):
                return out
            log.info("%s sent an output of unusual norm: checking it", hop.view.address)
            verifier = self._pick(hop, ())
            if verifier is None:
                return out
            theirs = await self._opinion(hop, verifier, hidden, start)
        else:
            ours, theirs = await asyncio.gather(
                self.route.calls.step(hop, hidden, start, truncate),
                self._opinion(hop, verifier, hidden, start),
                return_exceptions=True,
            )
            if isinstance(ours, BaseException):
                raise ours
            out = ours
        return await self._judge(hop, hidden, start, out, verifier, theirs)

    async def _judge(
        self,
        hop: ActiveHop,
        hidden: torch.Tensor,
        start: int,
        out: torch.Tensor,
        verifier: PeerView,
        theirs: torch.Tensor | BaseException | None,
    ) -> torch.Tensor:
        """Compare the hop's output with a verifier's; ask a third replica if they differ."""
        ledger = self.swarm.book.trust
        if not isinstance(theirs, torch.Tensor):
            self._count("error")
            log.debug("checking on %s failed: %s", verifier.address, theirs)
            return out
        ledger.checks(hop.view.peer_id).checked += 1
        ledger.checks(verifier.peer_id).checked += 1
        wire = WIRE_NAMES.get(out.dtype, "bfloat16")  # a 16-bit wire rounds both answers
        tol = tolerance(hop.view.dtype, verifier.dtype, wire)
        err = relative_error(out, theirs)
        if err <= tol:
            self._count("match")
            self.swarm.book.norms.learn(hop.span.end, token_rms(out))
            return out
        self._count("mismatch")
        evidence: dict[str, object] = {
            "layers": str(hop.span),
            "positions": f"{start}:{start + hidden.shape[1]}",
            "tolerance": tol,
        }
        if verifier.peer_id == LOCAL:  # this client's own computation settles it
            self._ban(hop.view, [verifier], err, evidence)
            raise self._caught(hop)
        third = self._pick(hop, (verifier.peer_id,))
        referee = await self._opinion(hop, third, hidden, start) if third is not None else None
        if third is None or not isinstance(referee, torch.Tensor):
            return self._dispute(hop, verifier, err, evidence, out)
        tol3 = tolerance(hop.view.dtype, verifier.dtype, third.dtype, wire)
        ours_ok = relative_error(out, referee) <= tol3
        theirs_ok = relative_error(theirs, referee) <= tol3
        evidence["referee"] = third.peer_id
        if ours_ok and not theirs_ok:
            self._ban(verifier, [hop.view, third], relative_error(theirs, referee), evidence)
            return out
        if theirs_ok and not ours_ok:
            self._ban(hop.view, [verifier, third], relative_error(out, referee), evidence)
            raise self._caught(hop)
        return self._dispute(hop, verifier, err, evidence, out)

    def _count(self, result: str) -> None:
        """Count a check by result: here (`SwarmClient.verify_counts`) and in Prometheus."""
        self.swarm.verify_counts[result] += 1
        metrics.VERIFICATIONS.labels(result).inc()

    @staticmethod
    def _caught(hop: ActiveHop) -> Exception:
        """The failure that reroutes a hop caught lying; the step is redone elsewhere."""
        return HopFailed(hop.view.peer_id, f"peer {hop.view.address} computed wrong outputs")

    def _dispute(
        self,
        hop: ActiveHop,
        verifier: PeerView,
        err: float,
        evidence: dict[str, object],
        out: torch.Tensor,
    ) -> torch.Tensor:
        """Two opinions differ and nobody settles it: keep the hop's output, watch both."""
        ledger = self.swarm.book.trust
        for peer in (hop.view.peer_id, verifier.peer_id):
            ledger.checks(peer).disputes += 1
            ledger.checks(peer).served = 0  # checked again on its next steps, as a new peer
        log.warning(
            "%s and %s disagree on layers %s (relative error %.3g > %.3g) and no third replica "
            "settles it: both are checked again on their next steps",
            hop.view.address,
            verifier.address,
            hop.span,
            err,
            evidence["tolerance"],
        )
        return out

    def _ban(
        self, liar: PeerView, others: list[PeerView], err: float, evidence: dict[str, object]
    ) -> None:
        evidence = {
            **evidence,
            "relative_error": err,
            "agreeing": [p.peer_id for p in others],
        }
        replicas = sum(p.peer_id != LOCAL for p in others)
        said = [f"{replicas} replica's" if replicas == 1 else f"{replicas} replicas'"]
        said = said if replicas else []
        said += ["this client's own computation"] * (len(others) - replicas)
        reason = (
            f"its output on layers {evidence['layers']} differs from {' and '.join(said)} "
            f"(relative error {err:.3g}, tolerance {evidence['tolerance']:.3g})"
        )
        if self.swarm.book.ban_liar(liar.peer_id, liar.address, reason, evidence):
            self.swarm.on_event(f"banned peer {liar.address} for lying: {reason}")
        self._drop_shadows(liar.peer_id)

    def _pick(self, hop: ActiveHop, exclude: Sequence[str]) -> PeerView | None:
        """A replica to check `hop` on: new peers first, then the one already fed, then any."""
        client = self.swarm
        leave_out = {hop.view.peer_id, *exclude} | client.book.banned()
        quant = hop.view.quant
        candidates = [
            v
            for v in client.views()
            if v.peer_id not in leave_out
            and v.span.start <= hop.span.start
            and hop.span.end <= v.span.end
            and v.quant == quant
        ]
        if not candidates:  # no replica: this client computes the span itself, if it may
            local = client.local
            return local.view(hop.span) if local is not None and LOCAL not in exclude else None
        same_dtype = [v for v in candidates if v.dtype == hop.view.dtype]
        candidates = same_dtype or candidates
        first = client.config.verify_first_steps
        fresh = [v for v in candidates if client.book.trust.checks(v.peer_id).checked < first]
        if fresh:
            return self.rng.choice(fresh)
        # Replicas already fed cost a short catch-up; among them, the least checked goes next.
        fed = [v for v in candidates if (hop.span, v.peer_id) in self.shadows]
        return min(fed or candidates, key=lambda v: client.book.trust.checks(v.peer_id).checked)

    async def _opinion(
        self, hop: ActiveHop, peer: PeerView, hidden: torch.Tensor, start: int
    ) -> torch.Tensor | BaseException:
        """What `peer` computes for this step of the hop, through its shadow session."""
        route = self.route
        key = (hop.span, peer.peer_id)
        shadow = self.shadows.get(key)
        tokens = hidden.shape[1]
        if hop.span.start in route.lacking and hop in route.hops:
            try:  # a cached prefix skipped these inputs: the hops before it compute them again
                await route.fill(route.hops.index(hop))
            except HopFailed as e:  # that hop's failure shows in its own next step
                return e
        try:
            last = shadow.last if shadow is not None else None
            if last is not None and last[:2] == (start, tokens):
                return last[2]  # asked again (the step is redone): the same answer
            if shadow is None:
                shadow = await self._open_shadow(hop, peer)
                self.shadows[key] = shadow
            # A session that went back (speculation's rollback): what the shadow holds before
            # `start` still stands; its run at `start` drops the rest.
            shadow.fed = min(shadow.fed, start)
            context = context_slice(route.history.get(hop.span.start, []), shadow.fed, start)
            for at, chunk in merge_inputs(context, route.config.replay_chunk_tokens):
                await shadow.run(chunk, at)
                shadow.fed = at + chunk.shape[1]
            out = await shadow.run(hidden, start)
            shadow.fed, shadow.last = start + tokens, (start, tokens, out)
            return out
        except LayerswarmError as e:  # the verifier failed: the check did not happen
            if shadow is not None and self.shadows.pop(key, None) is not None:
                await shadow.close()
            if getattr(e, "fault", False):
                self.swarm.book.ban(peer.peer_id, f"checking on it failed: {e}")
            return e

    async def _open_shadow(self, hop: ActiveHop, peer: PeerView) -> Shadow:
        """A new shadow session of `hop`'s span on `peer` (or in this client: LOCAL)."""
        route, calls = self.route, self.route.calls
        if peer.peer_id == LOCAL:
            assert self.swarm.local is not None  # LOCAL is picked only when it exists
            return await self.swarm.local.open_shadow(hop.span, route.max_length)
        twin = ActiveHop(peer, hop.span, self.swarm.connection(peer.peer_id), uuid.uuid4().hex)
        await calls.open(twin, route.max_length, push=False)

        async def run(hidden: torch.Tensor, start: int) -> torch.Tensor:
            # Runs start where the shadow was fed to, or before it when the session went back.
            return await calls.step(twin, hidden, start, truncate=start)

        return Shadow(run, lambda: calls.close([twin]))

    def _drop_shadows(self, peer_id: str) -> None:
        for key in [k for k in self.shadows if k[1] == peer_id]:
            del self.shadows[key]

    async def aclose(self) -> None:
        """Close every shadow session (best effort)."""
        shadows, self.shadows = list(self.shadows.values()), {}
        await asyncio.gather(*(shadow.close() for shadow in shadows))
