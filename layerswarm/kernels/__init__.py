"""Triton kernels, their plain-torch twins, and the dispatcher that picks per device."""

from layerswarm.kernels.dispatch import ops_for

__all__ = ["ops_for"]
