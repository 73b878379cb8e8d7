"""The experts seam: `experts(x, topk_idx, topk_w) -> y`, and its dense implementation.

The router never knows which implementation it calls (dense here; quantized and offloaded ones
subclass `Experts`). What every implementation declares, and what offloading and export rely on:
`n_experts`, `hidden`, `inter`, `spec` (None for float weights, else the packed format's
`QuantSpec`), `expert_tensors(e)` (expert e's weights, views, named `gate_proj`... for float and
`gate_proj.qweight`... for packed) and `compute(tensors, x)` (one expert from such tensors, wherever
they live). `expert(e, x)` defaults to `compute(expert_tensors(e), x)`; faster kernels override it.

Two dispatch paths, neither of which copies expert weights: decode (few tokens) runs each
(token, slot) through its expert; prefill sorts the (token, slot) pairs by expert and runs every
active expert once on its rows. Outputs are combined as the reference's `moe_infer` does: per-slot
outputs weighted and summed in float32, slot order.

A third path, `forward_static`, serves the static decode step (`vl2edge.models.decode_step`): no
host synchronisation and static shapes, the expert ids staying a device tensor. It gathers each
(token, slot)'s weights by index (`gathered_weights`; a copy, fine for a graph-captured step) and
runs them as batched matmuls; implementations with a kernel that reads weights in place override it.

Dimension legend: T tokens, D hidden, I expert intermediate, A top-k slots per token, E experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vl2edge.kernels import available as kernels_available
from vl2edge.quant.format import QuantSpec, dequantize

DECODE_MAX_ROWS = 16  # (token, slot) pairs up to which the per-pair decode path is used
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """One expert: down(silu(gate(x)) * up(x)), weights in Linear layout."""
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


def combine(slots: torch.Tensor, topk_w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Per-slot outputs [T*A, D] -> [T, D]: weighted sum in float32, in top-k slot order, then `dtype`."""
    T, A = topk_w.shape
    return (slots.view(T, A, -1).float() * topk_w.unsqueeze(-1)).sum(dim=1).to(dtype)


class Experts(nn.Module):
    """Base class: subclasses provide `expert_tensors(e)` (and may override `expert`); dispatch,
    combine and the math of one expert from its tensors live here."""

    def __init__(self, n_experts: int, hidden: int, inter: int, spec: QuantSpec | None = None):
        super().__init__()
        self.n_experts, self.hidden, self.inter, self.spec = n_experts, hidden, inter, spec

    def expert_tensors(self, e: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def compute_weights(self, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
        """[gate [I, D], up [I, D], down [D, I]] in `dtype` from expert tensors (dequantized if packed)."""
        return [w[0] for w in self.stacked_weights({k: t[None] for k, t in tensors.items()}, dtype)]

    def stacked_weights(self, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
        """`compute_weights` for P experts at once: tensors named as `expert_tensors` names them, each with
        a leading [P] axis -> [gate [P, I, D], up [P, I, D], down [P, D, I]] in `dtype`."""
        if self.spec is None:
            return [tensors[p].to(dtype) for p in PROJECTIONS]
        K = {"gate_proj": self.hidden, "up_proj": self.hidden, "down_proj": self.inter}
        out = []
        for p in PROJECTIONS:
            q, s, z = (tensors.get(f"{p}.{k}") for k in ("qweight", "scales", "qzeros"))
            assert q is not None and s is not None  # packed experts name their tensors so
            P, N = q.shape[:2]                         # [P, N, ...] -> [P*N, ...]: dequantize takes rows
            w = dequantize(self.spec, q.flatten(0, 1), s.flatten(0, 1), None if z is None else z.flatten(0, 1),
                           K=K[p])
            out.append(w.view(P, N, K[p]).to(dtype))
        return out

    def compute(self, tensors: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """One expert on rows x [t, D] from its tensors (as `expert_tensors` returns them, on x's device)."""
        return swiglu(x, *self.compute_weights(tensors, x.dtype))

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return self.compute(self.expert_tensors(e), x)

    def upcoming(self, e: int) -> None:
        """Hint: expert e runs next (offloaded experts start its copy while the current one computes)."""

    def forward(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_w: torch.Tensor) -> torch.Tensor:
        T, A = topk_idx.shape
        if T * A <= DECODE_MAX_ROWS:
            slots = self._per_pair(x, topk_idx)
        else:
            slots = self._grouped(x, topk_idx)
        return combine(slots, topk_w, x.dtype)

    def gathered_weights(self, idx: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor]:
        """[gate [P, I, D], up [P, I, D], down [P, D, I]] of the experts `idx` [P] (a device tensor)."""
        raise NotImplementedError(f"{type(self).__name__} has no sync-free decode path")

    @property
    def static_ready(self) -> bool:
        """Whether `forward_static` runs for this layout where it lives (`gathered_weights` or a kernel)."""
        return True

    def kernel_stacks(self) -> tuple[dict[str, torch.Tensor], QuantSpec | None] | None:
        """Every expert's tensors as [E, ...] stacks named as `expert_tensors` names them, and their format,
        for the Triton kernel that reads them in place (None: this layout has none)."""
        return None

    def forward_static(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_w: torch.Tensor) -> torch.Tensor:
        """`forward` without host synchronisation (the ids are never read on the host): on CUDA the Triton
        kernel over the weights in place, else gathered weights in batched matmuls. P = T*A pairs."""
        stacks = self.kernel_stacks() if x.is_cuda and kernels_available() else None
        if stacks is not None:
            from vl2edge.kernels.moe import moe_experts, projection_weights

            kg, ku, kd = projection_weights(*stacks)
            return moe_experts(x, topk_idx, topk_w, kg, ku, kd, stacks[1])
        A = topk_idx.shape[1]
        gate, up, down = self.gathered_weights(topk_idx.reshape(-1), x.dtype)
        xr = x.repeat_interleave(A, dim=0)[:, :, None]                  # [P, D, 1]
        h = F.silu(torch.bmm(gate, xr)) * torch.bmm(up, xr)             # [P, I, 1]
        return combine(torch.bmm(down, h)[..., 0], topk_w, x.dtype)

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
    (`vl2edge.models.loading.sanitize` is the one rename).
    """

    def __init__(self, n_experts: int, hidden: int, inter: int, dtype=None, device=None):
        super().__init__(n_experts, hidden, inter)
        kw = {"dtype": dtype, "device": device}
        self.gate_proj = nn.Parameter(torch.empty(n_experts, inter, hidden, **kw), requires_grad=False)
        self.up_proj = nn.Parameter(torch.empty(n_experts, inter, hidden, **kw), requires_grad=False)
        self.down_proj = nn.Parameter(torch.empty(n_experts, hidden, inter, **kw), requires_grad=False)

    def stacks(self) -> dict[str, torch.Tensor]:
        return {"gate_proj": self.gate_proj, "up_proj": self.up_proj, "down_proj": self.down_proj}

    def expert_tensors(self, e: int) -> dict[str, torch.Tensor]:
        return {p: t[e] for p, t in self.stacks().items()}

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return swiglu(x, self.gate_proj[e], self.up_proj[e], self.down_proj[e])

    def gathered_weights(self, idx: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor]:
        return [t[idx].to(dtype) for t in self.stacks().values()]

    def kernel_stacks(self) -> tuple[dict[str, torch.Tensor], QuantSpec | None] | None:
        return self.stacks(), None
