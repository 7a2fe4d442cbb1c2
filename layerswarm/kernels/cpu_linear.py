"""Weight layouts that make CPU linears read memory at full speed, for decode and prefill.

Measured on this project's 2-core CPU (SmolLM2 shapes, one token): `F.linear` reads fp32 weights
of the usual `(out, in)` layout at ~11 GB/s and bf16 at ~15 GB/s; the machine streams ~26 GB/s.
- bf16/fp16: oneDNN's prepacked weights run at ~26 GB/s (2.5x for one token, 1.1x for a
  128-token prefill), with bit-identical results.
- fp32: prepacking is as fast, but sums in another order (logits moved by 2e-4 on SmolLM2).
  Storing the weight transposed, `(in, out)` in memory behind the same `(out, in)` view, makes
  the one-token GEMV 1.8x faster with results equal to the usual layout's, so fp32 gets that.
"""

from __future__ import annotations

from typing import TypeVar

import torch
from torch import nn


def available() -> bool:
    """Whether this torch build has oneDNN's prepacked linear."""
    mkldnn = bool(torch.backends.mkldnn.is_available())  # type: ignore[no-untyped-call]
    return mkldnn and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class PackedLinear(nn.Module):
    """`nn.Linear`'s math with the weight in oneDNN's blocked layout (CPU only)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        w = linear.weight.detach()
        self.weight = torch.ops.mkldnn._reorder_linear_weight(w, 1)  # opaque (out, in)
        self.bias = None if linear.bias is None else linear.bias.detach().clone()
        self.nbytes = w.numel() * w.element_size()  # the packed tensor reports none itself

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`x (..., in)` -> `(..., out)`."""
        out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(
            x, self.weight, self.bias, "none", [], ""
        )
        return out


M = TypeVar("M", bound=nn.Module)


def pack_linears(module: M) -> M:
    """Give every CPU `nn.Linear` of `module` its fast layout, in place.

    fp32 weights are stored transposed (still an `nn.Linear`); other dtypes become a
    `PackedLinear` where oneDNN is available. Weights not on the CPU are left alone. Apply it
    last: after quantization, which replaces the linears it quantizes.
    """
    for name, child in list(module.named_children()):
        if not isinstance(child, nn.Linear) or child.weight.device.type != "cpu":
            pack_linears(child)
        elif child.weight.dtype == torch.float32:
            weight = child.weight.detach().t().contiguous().t()  # (out, in) view, (in, out) memory
            child.weight = nn.Parameter(weight, requires_grad=False)
        elif available():
            setattr(module, name, PackedLinear(child))
    return module
