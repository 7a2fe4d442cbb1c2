"""Triton kernels, their plain-torch twins, and the dispatcher that picks per device."""
