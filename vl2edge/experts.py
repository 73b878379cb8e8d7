"""The experts seam: `experts(x, topk_idx, topk_w) -> y`, and its dense implementation.

The router never knows which implementation it calls (dense here; quantized and offloaded ones
subclass `Experts` and override `expert(e, x)`). Two dispatch paths, neither of which copies expert
weights: decode (few tokens) runs each (token, slot) through its expert; prefill sorts the
(token, slot) pairs by expert and runs every active expert once on its rows. Outputs are combined
as the reference's `moe_infer` does: per-slot outputs weighted and summed in float32, slot order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

DECODE_MAX_ROWS = 16  # (token, slot) pairs up to which the per-pair decode path is used


def swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """One expert: down(silu(gate(x)) * up(x)), weights in Linear layout."""
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


class Experts(nn.Module):
    """Base class: subclasses provide `expert(e, x)`; dispatch and combine live here.

    Dimensions: T tokens, D hidden, A = top-k slots per token, E routed experts.
    """

    n_experts: int

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def upcoming(self, e: int) -> None:
        """Hint: expert e runs next (offloaded experts start its copy while the current one computes)."""

    def forward(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_w: torch.Tensor) -> torch.Tensor:
        T, A = topk_idx.shape
        if T * A <= DECODE_MAX_ROWS:
            slots = self._per_pair(x, topk_idx)
        else:
            slots = self._grouped(x, topk_idx)
        # [T*A, D] -> [T, A, D]; weighted sum in fp32, in top-k slot order, then back to the activation dtype
        return (slots.view(T, A, -1).float() * topk_w.unsqueeze(-1)).sum(dim=1).to(x.dtype)

    def _per_pair(self, x: torch.Tensor, topk_idx: torch.Tensor) -> torch.Tensor:
        rows = [self.expert(e, x[t:t + 1]) for t, ids in enumerate(topk_idx.tolist()) for e in ids]
        return torch.cat(rows, dim=0)

    def _grouped(self, x: torch.Tensor, topk_idx: torch.Tensor) -> torch.Tensor:
        A = topk_idx.shape[1]
        flat = topk_idx.reshape(-1)
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.n_experts).tolist()
        tokens = x[order // A]  # [T*A, D] activations grouped by expert (the weights are never copied)
        out = torch.empty_like(tokens)
        start = 0
        active = [e for e, n in enumerate(counts) if n]
        for i, e in enumerate(active):
            if i + 1 < len(active):
                self.upcoming(active[i + 1])
            out[start:start + counts[e]] = self.expert(e, tokens[start:start + counts[e]])
            start += counts[e]
        slots = torch.empty_like(out)
        slots[order] = out
        return slots


class DenseExperts(Experts):
    """Routed experts in float, stacked per projection: gate_proj/up_proj [E, I, D], down_proj [E, D, I].

    Checkpoint keys `experts.{e}.{gate,up,down}_proj.weight` load into row e of the stacks
    (`vl2edge.model.checkpoint_name` is the one rename).
    """

    def __init__(self, n_experts: int, hidden: int, inter: int, dtype=None, device=None):
        super().__init__()
        self.n_experts = n_experts
        kw = {"dtype": dtype, "device": device}
        self.gate_proj = nn.Parameter(torch.empty(n_experts, inter, hidden, **kw), requires_grad=False)
        self.up_proj = nn.Parameter(torch.empty(n_experts, inter, hidden, **kw), requires_grad=False)
        self.down_proj = nn.Parameter(torch.empty(n_experts, hidden, inter, **kw), requires_grad=False)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return swiglu(x, self.gate_proj[e], self.up_proj[e], self.down_proj[e])
