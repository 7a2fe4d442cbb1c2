"""What a client knows of each peer beyond its record: bans, trust, measured speed, norm bounds.

One book per swarm client, shared by all its sessions. It is the one place a ban is made:
`ban` for a peer that failed (for a while, longer on each new failure), `ban_liar` for one
caught computing wrong outputs (for good, with evidence, in the `TrustLedger`). Each ban says so
in the log and counts in the metrics.
"""

from __future__ import annotations

import logging

import torch

from layerswarm import metrics
from layerswarm.routing.paths import BanList
from layerswarm.routing.peer_stats import PeerStats
from layerswarm.routing.trust import TrustLedger

log = logging.getLogger(__name__)

NORM_FACTOR = 32.0  # a reply's per-token RMS past this times the learned bound is suspicious
NORM_LEARN_STEPS = 4  # outputs at a boundary that set its norm bound before it is enforced


def token_rms(hidden: torch.Tensor) -> float:
    """The largest per-token root mean square of `(1, tokens, hidden)`."""
    return float(hidden.float().pow(2).mean(dim=-1).sqrt().max())


class NormBounds:
    """Per layer boundary: the largest per-token RMS of outputs seen there (trusted ones)."""

    def __init__(self, factor: float = NORM_FACTOR, learn_steps: int = NORM_LEARN_STEPS) -> None:
        self.factor = factor
        self.learn_steps = learn_steps
        self._max: dict[int, float] = {}
        self._seen: dict[int, int] = {}

    def suspicious(self, boundary: int, out: torch.Tensor) -> bool:
        """Whether `out` at `boundary` is past the bound; outputs before it is set teach it."""
        rms = token_rms(out)
        seen = self._seen.get(boundary, 0)
        if seen < self.learn_steps:
            self.learn(boundary, rms)
            return False
        return rms > self.factor * self._max[boundary]

    def learn(self, boundary: int, rms: float) -> None:
        self._seen[boundary] = self._seen.get(boundary, 0) + 1
        self._max[boundary] = max(self._max.get(boundary, 0.0), rms)


class PeerBook:
    """Bans, trust records, measured step times and norm bounds of the peers a client uses."""

    def __init__(self, ban_seconds: float = 5.0, max_ban_seconds: float = 60.0) -> None:
        self.bans = BanList(ban_seconds, max_ban_seconds)  # failed peers, for a while
        self.trust = TrustLedger()  # liars, banned for good with their evidence
        self.stats = PeerStats()  # measured step times: routing and deadlines use these
        self.norms = NormBounds()  # per layer boundary, the output norms seen

    def ban(self, peer_id: str, reason: str) -> float:
        """Ban a peer that failed, for a while; returns for how many seconds.

        A peer already banned gets no new strike (a crash fails every session in flight, and
        counts once), and no new log line or metric.
        """
        fresh = peer_id not in self.bans.banned()
        seconds = self.bans.ban(peer_id)
        if fresh:
            log.info("banned peer %s for %.0f s: %s", peer_id, seconds, reason)
            metrics.note_event("ban", f"banned {peer_id} for {seconds:.0f} s: {reason}")
        return seconds

    def ban_liar(
        self, peer_id: str, address: str, reason: str, evidence: dict[str, object]
    ) -> bool:
        """Ban a peer caught lying, for good (logged and counted by the ledger); False if it
        was banned already."""
        return self.trust.ban(peer_id, address, reason, evidence)

    def banned(self) -> set[str]:
        """Peers to leave out now: failed ones still banned, and liars."""
        return self.bans.banned() | set(self.trust.liars)

    def served(self, peer_id: str) -> None:
        """A peer served a step: counted (its first steps are checked), and it starts over with
        a short ban if it fails again."""
        self.bans.succeeded(peer_id)
        self.trust.checks(peer_id).served += 1

    def back(self, peer_id: str) -> None:
        """A peer answered again (restarted or rediscovered): usable again, strikes kept."""
        self.bans.lift(peer_id)
