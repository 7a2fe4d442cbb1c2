"""What a swarm client knows of its peers' honesty: liars banned with evidence, and check counts.

A peer caught computing wrong outputs (it disagreed with two other opinions on the same step)
is banned for the life of the client, and the ban is kept as a `BanRecord` with its evidence:
a list a dashboard can show and a log can print. Failures (a crash, a silence) are not lies:
those peers get the short, growing bans of `paths.BanList` and come back.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from layerswarm import metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BanRecord:
    """One peer banned for lying, and why."""

    peer_id: str
    address: str  # host:port/PEERID it was reached at
    at: float  # unit: unix s of the ban
    reason: str  # one line for people, e.g. "its output differs from 2 replicas'"
    # What was compared: layers, positions, the relative error, the tolerance, who disagreed.
    evidence: dict[str, object] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        """A JSON-ready form (for a dashboard or a log line)."""
        return {
            "peer_id": self.peer_id,
            "address": self.address,
            "at": self.at,
            "reason": self.reason,
            "evidence": dict(self.evidence),
        }


@dataclass
class PeerChecks:
    """How one peer fared: steps served and checked, and checks it passed or failed."""

    served: int = 0  # steps it answered as a session's hop
    checked: int = 0  # of those, or as a verifier, steps compared with another opinion
    disputes: int = 0  # comparisons that no third opinion settled


class TrustLedger:
    """Liars, their ban records, and per-peer check counts; shared by a client's sessions.

    Written on the client's loop, read from any thread (a dashboard), hence the lock.
    """

    def __init__(self, on_ban: Callable[[BanRecord], None] | None = None) -> None:
        self._records: list[BanRecord] = []
        self._liars: set[str] = set()
        self._checks: dict[str, PeerChecks] = {}
        self._lock = threading.Lock()
        self._on_ban = on_ban

    @property
    def liars(self) -> frozenset[str]:
        """Peers banned for lying: never used again by this client."""
        with self._lock:
            return frozenset(self._liars)

    def ban(self, peer_id: str, address: str, reason: str, evidence: dict[str, object]) -> bool:
        """Ban a liar for good and keep the record; False if it was banned already."""
        record = BanRecord(peer_id, address, time.time(), reason, evidence)
        with self._lock:
            if peer_id in self._liars:
                return False
            self._liars.add(peer_id)
            self._records.append(record)
        log.warning("banned peer %s at %s: %s (%s)", peer_id, address, reason, evidence)
        metrics.note_event("ban", f"banned {peer_id} at {address} for lying: {reason}")  # + BANS
        if self._on_ban is not None:
            self._on_ban(record)
        return True

    def records(self) -> list[BanRecord]:
        """Every ban for lying, oldest first."""
        with self._lock:
            return list(self._records)

    def checks(self, peer_id: str) -> PeerChecks:
        """The counts of one peer (created on first use; mutate on the client's loop only)."""
        with self._lock:
            return self._checks.setdefault(peer_id, PeerChecks())

    def snapshot(self) -> dict[str, PeerChecks]:
        with self._lock:
            return {p: PeerChecks(c.served, c.checked, c.disputes) for p, c in self._checks.items()}
