"""A mixture-of-experts MLP: route each token to its top-k experts, run only those, grouped.

Every expert of a layer lives with that layer, so a layer-range split of the model is exact.
A step runs only the experts its tokens chose: tokens are sorted by expert and each chosen
expert runs once over its group (for a decode step of one session, `experts_per_token` small
matmuls; for a batch, one per distinct expert).

Experts are plain `nn.Linear`s, so `quantize(span, "int8")` and `pack_linears` cover them as
they cover the dense layers; the router is a parameter, not a linear, so it keeps full
precision (an int8 router could flip a token's choice of expert).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from layerswarm.shards.config import MoEConfig

Activation = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (gate, up) -> hidden


class Expert(nn.Module):
    """One expert: a gated MLP, gate and up fused in one linear (gate first)."""

    def __init__(self, hidden: int, intermediate: int, bias: bool) -> None:
        super().__init__()
        self.gate_up = nn.Linear(hidden, 2 * intermediate, bias=bias)
        self.down = nn.Linear(intermediate, hidden, bias=bias)


class MoEBlock(nn.Module):
    """The router and the experts of one layer."""

    router_bias: torch.Tensor | None

    def __init__(self, config: MoEConfig, hidden: int) -> None:
        super().__init__()
        self.config = config
        self.router_weight = nn.Parameter(
            torch.empty(config.num_experts, hidden), requires_grad=False
        )
        bias = torch.empty(config.num_experts) if config.router_bias else None
        self.router_bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.experts = nn.ModuleList(
            Expert(hidden, config.intermediate_size, config.expert_bias)
            for _ in range(config.num_experts)
        )

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`x (tokens, hidden)` -> each token's expert weights `(tokens, k)` in `x.dtype` and
        expert indices `(tokens, k)`.

        Where the chosen weights are normalised to sum to 1 (gpt-oss, Mixtral, Qwen3-MoE with
        `norm_topk_prob`), they are a softmax over the top k logits: the same as a softmax over
        all, top k, then a division by their sum (the other logits' exponentials cancel), to
        an ulp, in 2 ops instead of 5.
        """
        c = self.config
        logits = F.linear(x, self.router_weight, self.router_bias)  # (tokens, experts)
        if c.router == "topk_softmax" or c.norm_topk_prob:
            top, index = torch.topk(logits, c.experts_per_token, dim=-1)
            weights = torch.softmax(top, dim=-1, dtype=torch.float32)
        else:
            probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
            weights, index = torch.topk(probs, c.experts_per_token, dim=-1)
        return (weights if x.dtype == torch.float32 else weights.to(x.dtype)), index

    def forward(self, x: torch.Tensor, swiglu: Activation) -> torch.Tensor:
        """`x (tokens, hidden)` -> `(tokens, hidden)`, the weighted sum of the chosen experts.

        Args:
            swiglu: the kernel set's `silu(gate) * up`, used by SwiGLU experts.
        """
        weights, index = self.route(x)
        act = swiglu if self.config.activation == "silu" else self._gpt_oss_glu
        if x.shape[0] == 1:  # one token (a one-session decode step): no sorting needed
            return self._one_token(x, weights, index, act)
        return self._grouped(x, weights, index, act)

    def _grouped(
        self, x: torch.Tensor, weights: torch.Tensor, index: torch.Tensor, act: Activation
    ) -> torch.Tensor:
        """Any number of tokens: assignments sorted by expert, each chosen expert run once over
        its group, the weighted outputs added back to their tokens' rows."""
        k = index.shape[1]
        flat = index.reshape(-1)
        order = torch.argsort(flat, stable=True)  # assignments grouped by expert
        counts = torch.bincount(flat, minlength=self.config.num_experts).tolist()
        rows = order // k  # (assignments,) the token of each
        w = weights.reshape(-1)[order]
        out = torch.zeros_like(x)
        at = 0
        for expert, n in zip(self._experts(), counts, strict=True):
            if n:
                r = rows[at : at + n]
                out.index_add_(0, r, self._expert(expert, x[r], act) * w[at : at + n, None])
                at += n
        return out

    def _one_token(
        self, x: torch.Tensor, weights: torch.Tensor, index: torch.Tensor, act: Activation
    ) -> torch.Tensor:
        """A one-session decode step: the k chosen experts, no sorting or gathering.

        Each stage runs for all k experts before the next (every gate_up GEMV, then every
        activation, then every down GEMV): a GEMV streams megabytes through the caches, and the
        small op after it pays for what it evicted, so grouping them makes fewer of those
        transitions (5 a sparse layer instead of 7, with the router's).
        The experts' outputs are scaled and summed in place, starting from the first one (not
        from zeros), in the router's order (`_grouped` adds them in expert order): the same
        products, and for k = 2 the same sums, so the same bits (for larger k the same sum in
        another order). The weights are read to Python floats with the indices (one read each
        for all k); a bf16 or fp32 weight is exact as a float, so the products are the same.
        Measured per sparse layer on this project's CPU, see docs/models.md.
        """
        experts = self._experts()
        chosen = [experts[e] for e in index.tolist()[0]]
        gate_ups = [expert.gate_up(x) for expert in chosen]
        hidden = [act(*gate_up.chunk(2, dim=-1)) for gate_up in gate_ups]
        downs = [expert.down(h) for expert, h in zip(chosen, hidden, strict=True)]
        w = weights.tolist()[0]
        out: torch.Tensor = downs[0].mul_(w[0])
        for y, wi in zip(downs[1:], w[1:], strict=True):
            out.add_(y.mul_(wi))
        return out

    def _experts(self) -> list[Expert]:
        # A plain list: indexing the ModuleList (`self.experts[e]`) costs more than a decode
        # step's smallest ops (it checks the index and turns it into a string each call).
        return cast(list[Expert], list(self.experts))

    @staticmethod
    def _expert(expert: Expert, x: torch.Tensor, act: Activation) -> torch.Tensor:
        gate, up = expert.gate_up(x).chunk(2, dim=-1)
        down: torch.Tensor = expert.down(act(gate, up))
        return down

    def _gpt_oss_glu(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """gpt-oss: `(clamp(up) + 1) * g * sigmoid(alpha * g)`, `g = gate` clamped above."""
        limit = self.config.swiglu_limit
        gate = gate.clamp(max=limit)
        up = up.clamp(min=-limit, max=limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.config.swiglu_alpha))
