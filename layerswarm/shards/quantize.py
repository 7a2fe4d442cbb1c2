"""Weight-only quantization of a finished span model, as a transform that swaps its linears.

`quantize(span_model, "int8" | "int4")` replaces every `nn.Linear` of the decoder layers
(`qkv`, `o_proj`, `gate_up`, `down_proj`) with a `QuantLinear` in place; norms, activations and
the KV cache keep the model's dtype. There is no second model class: the layers' math calls
`layer.qkv(x)` either way (as gpt-fast's `replace_linear_int4` does).

`pack_linears` is the other transform of a loaded model, for the CPU: the linears quantization
left get their fast memory layouts (`kernels.cpu_linear`); apply it after `quantize`. It is
offered here so that the client and the peer, which may not reach into `kernels`, apply it,
with `open_chooser` (the plans measured at load, `kernels.cpu_tuning`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Literal

import torch
from torch import nn

from layerswarm.kernels import quant
from layerswarm.kernels.cpu_linear import pack_linears as pack_linears
from layerswarm.kernels.cpu_tuning import PLAN_MODES as PLAN_MODES
from layerswarm.kernels.cpu_tuning import Tuner as Tuner
from layerswarm.kernels.cpu_tuning import open_chooser as open_chooser

log = logging.getLogger(__name__)

Mode = Literal["int8", "int4"]
MODES: tuple[Mode, ...] = ("int8", "int4")
GROUP_SIZES = (128, 64, 32)  # unit: inputs per int4 group; tried in this order when one misfits


class QuantLinear(nn.Module):
    """A linear layer whose weight is stored as int8 or packed int4 (see `kernels.quant`).

    Buffers, not parameters, hold the weight: it is never trained. `scales` (int8) or
    `scales_zeros` (int4) and the bias are in the model's dtype, so `.to(dtype)` moves the
    activations' dtype as with `nn.Linear`. On a CPU, int4 weights are kept in the layout of
    torch's CPU int4 kernel when it takes them; moving the module elsewhere converts back.
    """

    weight: torch.Tensor
    scales: torch.Tensor
    scales_zeros: torch.Tensor
    bias: torch.Tensor | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        mode: Mode,
        group_size: int = 128,
        bias: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown quantization mode {mode!r}; choose one of {MODES}")
        self.in_features = in_features
        self.out_features = out_features
        self.mode = mode
        self.group_size = group_size if mode == "int4" else 0
        self.layout = "rows"  # int4 only: "rows" (portable) or "cpu" (torch's CPU kernel)
        self.backend: str | None = None  # "torch" or "triton" forces a kernel set (tests)
        if mode == "int8":
            self.register_buffer(
                "weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device)
            )
            self.register_buffer("scales", torch.ones(out_features, dtype=dtype, device=device))
        else:
            if in_features % group_size:
                raise ValueError(
                    f"in_features {in_features} is not a multiple of group size {group_size}"
                )
            packed = torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device)
            self.register_buffer("weight", packed)
            groups = in_features // group_size
            self.register_buffer(
                "scales_zeros", torch.ones(groups, out_features, 2, dtype=dtype, device=device)
            )
        self.register_buffer(
            "bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None
        )

    @classmethod
    def from_linear(cls, linear: nn.Linear, mode: Mode, group_size: int = 128) -> QuantLinear:
        """Quantize a finished `nn.Linear` (its weight is read, not kept)."""
        w = linear.weight.detach()  # (out, in)
        q = cls(
            linear.in_features, linear.out_features, mode, group_size,
            bias=linear.bias is not None, dtype=w.dtype, device=w.device,
        )  # fmt: skip
        if mode == "int8":
            q.weight, q.scales = quant.quantize_int8(w)
        else:
            q.weight, q.scales_zeros = quant.quantize_int4(w, group_size)
        if linear.bias is not None:
            q.bias = linear.bias.detach().clone()
        q._fit_device()
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`x (..., in_features)` -> `(..., out_features)` in `x.dtype`."""
        if self.mode == "int8":
            return quant.int8_linear(
                x, self.weight, self.scales, self.bias, self.backend, self._kernel_copy(self.scales)
            )
        return quant.int4_linear(
            x, self.weight, self.scales_zeros, self.group_size, self.bias, self.layout,
            self.backend, self._kernel_copy(self.scales_zeros),
        )  # fmt: skip

    def _kernel_copy(self, src: torch.Tensor) -> torch.Tensor | None:
        """`src` (the scales) in the CPU kernels' input dtype, for an fp32 model on a CPU: kept
        until `src` is replaced or changed in place (its version counter), not cast each step
        (an fp32 int4 layer's scales and zeros: ~110k values a SmolLM2 layer)."""
        if src.dtype != torch.float32 or not src.is_cpu:
            return None
        key = (src, src._version)
        cached = self.__dict__.get("_kernel_cache")
        if cached is None or cached[0][0] is not src or cached[0][1] != src._version:
            cached = (key, src.to(quant.CPU_KERNEL_DTYPE))
            self.__dict__["_kernel_cache"] = cached
        return cached[1]

    def _fit_device(self) -> None:
        """Repack int4 weights for torch's CPU kernel when they sit on a CPU and it pays."""
        on_cpu = self.weight.device.type == "cpu" and self.backend != "triton"
        if self.mode != "int4" or self.layout != "rows" or not on_cpu:
            return
        if quant.cpu_int4_supported(self.out_features, self.group_size, self.scales_zeros.dtype):
            self.weight = quant.to_cpu_int4_layout(self.weight)
            self.layout = "cpu"

    def use_backend(self, backend: str | None) -> QuantLinear:
        """Force "torch" or "triton" kernels (None: by device), refitting the weight layout."""
        self.portable()
        self.backend = backend
        self._fit_device()
        return self

    def portable(self) -> QuantLinear:
        """Bring int4 weights back to the `"rows"` layout (Triton's, and the one to save)."""
        if self.layout == "cpu":
            self.weight = quant.from_cpu_int4_layout(self.weight)
            self.layout = "rows"
        return self

    def _apply(
        self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True
    ) -> QuantLinear:
        # `.to()`, `.cuda()`, `.half()` all come here: move the portable layout, then refit.
        self.portable()
        super()._apply(fn, recurse)  # type: ignore[no-untyped-call]
        self._fit_device()
        return self

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.mode == "int4" else ""
        bias = self.bias is not None
        return f"{self.in_features}, {self.out_features}, {self.mode}{group}, bias={bias}"


def _group_size_for(in_features: int, group_size: int) -> int:
    """`group_size` when it divides `in_features`, else the largest of GROUP_SIZES that does."""
    if in_features % group_size == 0:
        return group_size
    for g in GROUP_SIZES:
        if g < group_size and in_features % g == 0:
            log.info(
                "int4: %d inputs do not split into groups of %d; using %d",
                in_features,
                group_size,
                g,
            )
            return g
    raise ValueError(f"int4 needs in_features divisible by one of {GROUP_SIZES}, got {in_features}")


def quantize(span_model: nn.Module, mode: Mode, group_size: int = 128) -> nn.Module:
    """Replace every `nn.Linear` under `span_model` with a `QuantLinear`, in place.

    Args:
        span_model: a finished model (a `SpanModel`, or any module whose linears should shrink).
        mode: "int8" (per-output-channel scales) or "int4" (group-wise scales and zeros).
        group_size: inputs per int4 group; where it does not divide a layer's inputs (SmolLM2's
            576 is not a multiple of 128), the largest of 128/64/32 that does is used.
    Returns:
        `span_model` itself, for chaining.
    Raises:
        ValueError: an unknown mode, or an int4 layer whose inputs no group size divides.
    """
    if mode not in MODES:
        raise ValueError(f"unknown quantization mode {mode!r}; choose one of {MODES}")
    targets = [
        (parent, name, child)
        for parent in span_model.modules()
        for name, child in parent.named_children()
        if isinstance(child, nn.Linear)
    ]
    for parent, name, linear in targets:
        g = _group_size_for(linear.in_features, group_size) if mode == "int4" else group_size
        setattr(parent, name, QuantLinear.from_linear(linear, mode, g))
    return span_model


def memory_bytes(module: nn.Module) -> int:
    """Bytes held by `module`'s weights and buffers, counting a shared tensor once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for t in [*module.parameters(), *module.buffers()]:
        key = (t.data_ptr(), t.numel())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    # oneDNN-packed weights are opaque tensors held outside parameters (`kernels.cpu_linear`).
    total += sum(int(getattr(m, "packed_nbytes", 0)) for m in module.modules())
    return total
