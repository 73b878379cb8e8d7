"""The quantized torch modules over the packed format: `QLinear` (a drop-in for nn.Linear) and
`QuantExperts` (the experts seam over [E, ...] packed stacks).

Both are built by constructors, never filled from outside: `QLinear.from_linear(lin, spec)` /
`QuantExperts.from_dense(experts, spec)` quantize float modules (on the meta device they only lay out
empty buffers, which the loader then assigns), `QLinear.from_packed(...)` wraps packed tensors.
Each picks a kernel once the weights are in place (`prepare`, see `kernel_for`): on the CPU 4-bit runs
on torch's int4 weight-only kernel (`_weight_int4pack_mm_for_cpu`, bf16 activations) and 8-bit is
widened once to the compute dtype (torch has no block-wise int8 kernel and per-call dequantization is
3-4x slower than a float matmul here, bench/RESULTS.md); on CUDA weights stay packed: decode-sized
calls run Triton kernels that read them in place (`vl2edge.kernels`: a QLinear's GEMV up to DECODE_ROWS
rows, the experts' MoE kernel in the static decode step), longer ones dequantize per call.

Dimension legend: N output features, K input features, E experts, D hidden, I expert intermediate.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vl2edge.kernels import available as kernels_available
from vl2edge.models.experts import PROJECTIONS, DenseExperts, Experts, swiglu

from .format import QuantSpec, dequantize, unpack, whole_blocks, zero_points
from .quantizers import quantize

Packed = dict[str, torch.Tensor]  # suffix (qweight, scales[, qzeros]) -> tensor
DECODE_ROWS = 16  # CUDA: rows up to which a QLinear runs the in-place Triton GEMV instead of dequantizing


def quantize_tensor(w: torch.Tensor, spec: QuantSpec) -> Packed:
    """A float weight [N, K] (or a stack [E, N, K]) -> its packed tensors (numpy quantizer, on the CPU)."""
    a = w.detach().float().cpu().numpy()
    parts = [quantize(row, spec) for row in (a if a.ndim == 3 else a[None])]
    out = {k: torch.from_numpy(np.stack([p[k] for p in parts])) for k in parts[0]}
    return out if a.ndim == 3 else {k: v[0] for k, v in out.items()}


def _int4pack_ok(spec: QuantSpec, N: int, K: int) -> bool:
    return spec.bits == 4 and spec.block_size in (32, 64, 128, 256) and K % spec.block_size == 0 and N % 16 == 0


def _to_int4pack(spec: QuantSpec, qweight, scales, qzeros, N: int, K: int):
    """Our packed weight -> (torch CPU int4 packed weight, scales-and-zeros [k_blocks, N, 2] bf16).

    torch computes (q - 8) * scale + zero, so zero = (8 - zero_point) * scale.
    """
    q = unpack(qweight, 4).reshape(N, K).to(torch.int32)
    zp = zero_points(spec, qzeros, spec.k_blocks(K))
    zero = (8 - zp.float()) * scales if qzeros is not None else torch.zeros_like(scales)
    sz = torch.stack([scales, zero], -1).transpose(0, 1).contiguous().to(torch.bfloat16)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1), sz


def _int4_mm(x, packed, block_size: int):
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), packed[0], block_size, packed[1])


def kernel_for(spec: QuantSpec, device: torch.device, N: int, K: int, kernel: str = "auto") -> str:
    """int4pack (CPU 4-bit), dense (widened once to the compute dtype) or dequant (per call)."""
    if kernel != "auto":
        return kernel
    if device.type == "cpu":
        return "int4pack" if _int4pack_ok(spec, N, K) else "dense"
    return "dequant"


def _register_packed(module: nn.Module, spec: QuantSpec, N: int, K: int, lead: tuple = (),
                     tensors: Packed | None = None) -> None:
    """The packed buffers of a [*lead, N, K] weight: the given tensors (checked), or empty ones."""
    for suffix, (dt, s) in spec.packed_shapes(N, K).items():
        want = torch.uint8 if dt == "U8" else torch.float32
        if tensors is None:
            module.register_buffer(suffix, torch.empty(*lead, *s, dtype=want))
            continue
        t = tensors[suffix]
        if tuple(t.shape) != (*lead, *s) or t.dtype != want:
            raise ValueError(f"{suffix}: got {t.dtype} {list(t.shape)}, expected {want} {[*lead, *s]}")
        module.register_buffer(suffix, t)


def _drop_packed(module: nn.Module) -> None:
    """Free the packed buffers once a kernel holds its own copy of the weight (the module's own buffers)."""
    for name, buf in list(module.named_buffers(recurse=False)):
        module.register_buffer(name, torch.empty(0, dtype=buf.dtype, device=buf.device))


class QLinear(nn.Module):
    """Drop-in for nn.Linear over a packed weight: buffers qweight/scales[/qzeros] (+ a float bias)."""

    def __init__(self, in_features: int, out_features: int, spec: QuantSpec, bias: bool = False,
                 needs_weight: bool = False, packed: Packed | None = None, bias_value: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features, self.spec = in_features, out_features, spec
        self.needs_weight = needs_weight  # the owner reads `.weight` as a matrix: never an opaque kernel
        _register_packed(self, spec, out_features, in_features, tensors=packed)
        self.bias: nn.Parameter | None
        if bias_value is not None:
            self.bias = nn.Parameter(bias_value, requires_grad=False)
        else:
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.kernel = "dequant"
        self._dense: torch.Tensor | None = None
        self._int4: tuple | None = None

    @classmethod
    def from_linear(cls, lin: nn.Linear, spec: QuantSpec, needs_weight: bool = False) -> QLinear:
        """The quantized twin of `lin` (empty buffers when `lin` lives on the meta device)."""
        bias = lin.bias.detach() if lin.bias is not None and not lin.bias.is_meta else None
        packed = None if lin.weight.is_meta else quantize_tensor(lin.weight, spec)
        return cls(lin.in_features, lin.out_features, spec, bias=lin.bias is not None, needs_weight=needs_weight,
                   packed=packed, bias_value=bias)

    @classmethod
    def from_packed(cls, spec: QuantSpec, packed: Packed, in_features: int, bias: torch.Tensor | None = None,
                    needs_weight: bool = False) -> QLinear:
        return cls(in_features, packed["qweight"].shape[0], spec, needs_weight=needs_weight, packed=packed,
                   bias_value=bias)

    def packed(self) -> Packed:
        """The packed tensors by suffix (qweight, scales[, qzeros])."""
        return dict(self.named_buffers(recurse=False))

    @property
    def weight(self) -> torch.Tensor:
        """The float weight (MLA's absorbed attention reads kv_b_proj's weight directly)."""
        if self._dense is not None:
            return self._dense
        p = self.packed()
        return dequantize(self.spec, p["qweight"], p["scales"], p.get("qzeros"), K=self.in_features)

    def prepare(self, compute_dtype, kernel: str = "auto") -> None:
        N, K = self.out_features, self.in_features
        p = self.packed()
        self.kernel = kernel_for(self.spec, p["qweight"].device, N, K, kernel)
        if self.kernel == "int4pack" and self.needs_weight:
            self.kernel = "dense"
        if self.kernel == "int4pack":
            self._int4 = _to_int4pack(self.spec, p["qweight"], p["scales"], p.get("qzeros"), N, K)
        elif self.kernel == "dense":  # widen in row chunks: no full-size float32 temporaries
            qw, sc, qz = p["qweight"], p["scales"], p.get("qzeros")
            self._dense = torch.empty(N, K, dtype=compute_dtype, device=qw.device)
            step = max(1, (1 << 22) // K)
            for r in range(0, N, step):
                self._dense[r:r + step] = dequantize(self.spec, qw[r:r + step], sc[r:r + step],
                                                     None if qz is None else qz[r:r + step], K=K)
        if self.kernel != "dequant":
            _drop_packed(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "int4pack":
            y = _int4_mm(x.reshape(-1, self.in_features), self._int4, self.spec.block_size)
            y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
            return y if self.bias is None else y + self.bias
        if (self.kernel == "dequant" and x.is_cuda and x.numel() <= DECODE_ROWS * self.in_features
                and whole_blocks(self.spec, self.in_features) and kernels_available()):
            from vl2edge.kernels.linear import qlinear  # decode rows: read the packed weight in place

            p = self.packed()
            y = qlinear(x, p["qweight"], p["scales"], p.get("qzeros"), self.spec)
            return y if self.bias is None else y + self.bias.to(y.dtype)
        return F.linear(x, self.weight.to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_features}->{self.out_features}, {self.spec.bits}-bit bs{self.spec.block_size}, {self.kernel}"


class PackedStack(nn.Module):
    """[E, ...] packed buffers of one projection of every expert (`experts.gate_proj.qweight`, ...)."""

    qweight: torch.Tensor  # a registered buffer, as are scales[, qzeros]

    def __init__(self, spec: QuantSpec, E: int, N: int, K: int, tensors: Packed | None = None):
        super().__init__()
        _register_packed(self, spec, N, K, lead=(E,), tensors=tensors)

    def tensors(self) -> Packed:
        return dict(self.named_buffers(recurse=False))

    def row(self, e: int) -> Packed:
        """Expert e's packed tensors (views)."""
        return {k: t[e] for k, t in self.tensors().items()}

    def release(self) -> None:
        _drop_packed(self)


class QuantExperts(Experts):
    """Routed experts over packed weights (the experts seam): gate_proj/up_proj/down_proj hold [E, ...] stacks."""

    spec: QuantSpec  # always given here (the base class allows None for float experts)

    def __init__(self, n_experts: int, hidden: int, inter: int, spec: QuantSpec,
                 packed: dict[str, Packed] | None = None):
        super().__init__(n_experts, hidden, inter, spec)
        packed = packed or {}
        self.gate_proj = PackedStack(spec, n_experts, inter, hidden, packed.get("gate_proj"))
        self.up_proj = PackedStack(spec, n_experts, inter, hidden, packed.get("up_proj"))
        self.down_proj = PackedStack(spec, n_experts, hidden, inter, packed.get("down_proj"))
        self.kernel = "dequant"
        self._w: tuple | list | None = None

    @classmethod
    def from_dense(cls, dense: DenseExperts, spec: QuantSpec) -> QuantExperts:
        """The quantized twin of `dense` (empty buffers when `dense` lives on the meta device)."""
        packed: dict[str, Packed] | None = None
        if not dense.gate_proj.is_meta:
            packed = {p: quantize_tensor(t, spec) for p, t in dense.stacks().items()}
        return cls(dense.n_experts, dense.hidden, dense.inter, spec, packed)

    def stack(self, projection: str) -> PackedStack:
        return {"gate_proj": self.gate_proj, "up_proj": self.up_proj, "down_proj": self.down_proj}[projection]

    def expert_tensors(self, e: int) -> dict[str, torch.Tensor]:
        if self.kernel != "dequant":
            raise RuntimeError(f"the packed weights were re-laid out for the {self.kernel!r} kernel")
        return {f"{p}.{k}": t for p in PROJECTIONS for k, t in self.stack(p).row(e).items()}

    def prepare(self, compute_dtype, kernel: str = "auto") -> None:
        D, I, E = self.hidden, self.inter, self.n_experts
        dev = self.stack("gate_proj").qweight.device
        kernels = {kernel_for(self.spec, dev, 2 * I, D, kernel), kernel_for(self.spec, dev, D, I, kernel)}
        chosen = kernels.pop() if len(kernels) == 1 else ("dense" if dev.type == "cpu" else "dequant")
        g, u, d = (self.stack(p) for p in PROJECTIONS)
        if chosen == "int4pack":  # gate and up rows concatenated: one matmul for both
            def gate_up(e):
                a, b = g.row(e), u.row(e)
                return {k: torch.cat([a[k], b[k]]) for k in a}

            def int4(t, N, K):
                return _to_int4pack(self.spec, t["qweight"], t["scales"], t.get("qzeros"), N, K)

            self._w = ([int4(gate_up(e), 2 * I, D) for e in range(E)], [int4(d.row(e), D, I) for e in range(E)])
        elif chosen == "dense":
            rows = [self.compute_weights(self.expert_tensors(e), compute_dtype) for e in range(E)]
            self._w = [torch.stack(ws) for ws in zip(*rows)]
        if chosen != "dequant":
            for stack in (g, u, d):
                stack.release()
        self.kernel = chosen

    @property
    def static_ready(self) -> bool:
        return self.kernel != "int4pack"  # one opaque weight per expert: only a host-side index picks it

    def kernel_stacks(self) -> tuple[dict[str, torch.Tensor], QuantSpec | None] | None:
        if self.kernel == "dense":
            assert self._w is not None  # laid out by prepare()
            return dict(zip(PROJECTIONS, self._w)), None
        if self.kernel != "dequant" or not whole_blocks(self.spec, self.hidden, self.inter):
            return None
        return self._packed_stacks(), self.spec

    def _packed_stacks(self) -> dict[str, torch.Tensor]:
        """Every packed [E, ...] stack, named as `expert_tensors` names an expert's (`gate_proj.qweight`, ...)."""
        return {f"{p}.{k}": t for p in PROJECTIONS for k, t in self.stack(p).tensors().items()}

    def gathered_weights(self, idx: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor]:
        """The experts `idx` [P] dequantized (dequant kernel) or gathered (dense); the CPU int4 kernel holds
        one opaque weight per expert, which only a host-side index can pick."""
        if self.kernel == "dense":
            assert self._w is not None  # laid out by prepare()
            return [w[idx].to(dtype) for w in self._w]
        if self.kernel != "dequant":
            raise NotImplementedError(f"the {self.kernel!r} expert kernel has no sync-free decode path")
        return self.stacked_weights({k: t[idx] for k, t in self._packed_stacks().items()}, dtype)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "int4pack":
            assert self._w is not None  # laid out by prepare()
            gu = _int4_mm(x, self._w[0][e], self.spec.block_size)
            h = F.silu(gu[:, :self.inter]) * gu[:, self.inter:]
            return _int4_mm(h, self._w[1][e], self.spec.block_size).to(x.dtype)
        if self.kernel == "dense":
            assert self._w is not None  # laid out by prepare()
            return swiglu(x, *(w[e] for w in self._w))
        return super().expert(e, x)
