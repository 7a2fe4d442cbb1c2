"""The errors layerswarm raises on purpose: one base class and a few precise ones.

This module imports nothing, so every subpackage (even `swarm/`, which imports none of ours)
can share one hierarchy.
"""


class LayerswarmError(Exception):
    """Base class of every error layerswarm raises on purpose."""


class ConfigError(LayerswarmError, ValueError):
    """A config field holds a value it cannot take; `field` names it (`limits.idle_timeout` for
    a sub-config's), `problem` says what is wrong, so a command line can name its own flag."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(field, problem)  # both in args, so the error pickles
        self.field = field
        self.problem = problem

    def __str__(self) -> str:
        return f"{self.field}: {self.problem}"


class ModelFormatError(LayerswarmError):
    """A model folder or file is missing something, or holds an unsupported model."""


class ContextOverflow(LayerswarmError):
    """A prompt or session needs more tokens than the model or the session allows."""


class CacheFull(LayerswarmError):
    """The KV cache has no room for another session of the asked length."""


class StepCancelled(LayerswarmError):
    """A step was stopped part-way (its deadline passed, or the peer is shutting down)."""


class ProtocolError(LayerswarmError):
    """A frame or message off the wire is malformed, oversized or not allowed here."""


class SwarmKeyMismatch(ProtocolError):
    """The other side is not in this side's private swarm: no swarm key, or another one."""


class InvalidRecord(LayerswarmError):
    """A signed peer record is malformed, forged, expired or out of range; `reason` says which.

    The reasons are the constants of `layerswarm.swarm.records.RecordFault`.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(reason, message)  # both in args, so the error pickles
        self.reason = reason
        self.message = message

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}"


class PeerUnavailable(LayerswarmError):
    """A peer could not be reached, closed the connection, or stopped answering."""


class PeerIdMismatch(PeerUnavailable):
    """The peer at an address proved a different identity than the one the dialer pinned."""


class RemoteError(LayerswarmError):
    """A peer answered a request with an error reply; `code` names the kind of error."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class SessionExpired(LayerswarmError):
    """The session is unknown to the peer, or it expired after idling too long."""


class NoRouteError(LayerswarmError):
    """No set of live peers covers every layer; `missing_layers` names the uncovered ones."""

    def __init__(self, missing_layers: list[int], note: str = "") -> None:
        text = f"no peer serves layers {_ranges(missing_layers)}"
        super().__init__(text + (f" ({note})" if note else ""))
        self.missing_layers = missing_layers


def _ranges(layers: list[int]) -> str:
    out: list[str] = []
    for layer in sorted(layers):
        if out and out[-1].endswith(f"-{layer - 1}"):
            out[-1] = out[-1].rsplit("-", 1)[0] + f"-{layer}"
        elif out and out[-1] == str(layer - 1):
            out[-1] = f"{layer - 1}-{layer}"
        else:
            out.append(str(layer))
    return ", ".join(out)
