"""The packed 4/8-bit weight format (pack/unpack live here and nowhere else) and the quantized modules.

Format (the one ONNX Runtime's `MatMulNBits` and `QMoE` read), for a weight W [N, K] (torch Linear
layout, out x in), blocks of `block_size` values along K (K zero-padded to whole blocks):

    qweight  uint8 [N, k_blocks, block_size * bits / 8]   4-bit: first value in the low nibble
    scales   float32 [N, k_blocks]
    qzeros   uint8 [N, ceil(k_blocks * bits / 8)]          packed like qweight; absent = symmetric,
                                                           zero point 2^(bits-1) (8 or 128)
    W[n, k] ~= (q[n, k] - zero[n, k // block_size]) * scales[n, k // block_size]

In a checkpoint the tensor `X.weight` becomes `X.qweight`, `X.scales` (and `X.qzeros`); the recipe of
every tensor is recorded in `quantization.json` (see `vl2edge.quantize`), never in a file name.

Modules: `QLinear` is a drop-in for `nn.Linear`; `QuantExperts` implements the experts seam. Both
pick a kernel once the weights are in place (`prepare`, see `kernel_for`): on the CPU 4-bit runs on torch's int4
weight-only kernel (`_weight_int4pack_mm_for_cpu`, bf16 activations) and 8-bit is widened once to the
compute dtype (torch has no block-wise int8 kernel and per-call dequantization is 3-4x slower than
a float matmul here, bench/RESULTS.md); on CUDA weights stay packed and are dequantized per call.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .experts import Experts, swiglu

ALGORITHMS = ("rtn", "mse")


@dataclass(frozen=True)
class QuantSpec:
    bits: int = 4
    block_size: int = 32
    symmetric: bool = True
    algorithm: str = "rtn"  # "rtn" round-to-nearest; "mse" scales refined by alternating least squares

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {self.bits}")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 16, got {self.block_size}")
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {self.algorithm!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    def k_blocks(self, K: int) -> int:
        return -(-K // self.block_size)

    def packed_shapes(self, N: int, K: int) -> dict[str, tuple[str, tuple[int, ...]]]:
        """suffix -> (safetensors dtype, shape) of the stored tensors for a [N, K] weight."""
        nb = self.k_blocks(K)
        out = {"qweight": ("U8", (N, nb, self.block_size * self.bits // 8)), "scales": ("F32", (N, nb))}
        if not self.symmetric:
            out["qzeros"] = ("U8", (N, -(-nb * self.bits // 8)))
        return out

    def nbytes(self, N: int, K: int) -> int:
        return sum(math.prod(s) * (4 if d == "F32" else 1) for d, s in self.packed_shapes(N, K).values())


def _xp(a):
    return np if isinstance(a, np.ndarray) else torch


def pack(q, bits: int):
    """Integers in [0, 2^bits) [..., n] (n even for 4-bit) -> uint8 [..., n * bits / 8], low nibble first."""
    q = q.astype(np.uint8) if isinstance(q, np.ndarray) else q.to(torch.uint8)
    return q if bits == 8 else q[..., 0::2] | (q[..., 1::2] << 4)


def unpack(packed, bits: int):
    """uint8 [..., m] -> integers [..., m * 8 / bits] (the inverse of `pack`; numpy or torch)."""
    if bits == 8:
        return packed
    xp = _xp(packed)
    return xp.stack([packed & 15, packed >> 4], -1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def zero_points(spec: QuantSpec, qzeros, n_blocks: int):
    """[N, k_blocks] zero points as float32 (numpy) or the activation-free default."""
    if qzeros is None:
        return 2 ** (spec.bits - 1)
    return unpack(qzeros, spec.bits)[..., :n_blocks]


def dequantize(spec: QuantSpec, qweight, scales, qzeros=None, K: int | None = None):
    """The float weight [N, K] (numpy float32, or torch float32 on the tensors' device)."""
    N, nb, _ = qweight.shape
    q = unpack(qweight, spec.bits).reshape(N, nb, spec.block_size)
    xp = _xp(q)
    q = q.astype(np.float32) if xp is np else q.float()
    z = zero_points(spec, qzeros, nb)
    if not isinstance(z, int):
        z = (z.astype(np.float32) if xp is np else z.float())[..., None]
    w = ((q - z) * scales[..., None]).reshape(N, nb * spec.block_size)
    return w if K is None else w[:, :K]


# -- modules ----------------------------------------------------------------------------------------------

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


def _register_packed(module: nn.Module, spec: QuantSpec, N: int, K: int, lead: tuple = ()) -> None:
    for suffix, (dt, s) in spec.packed_shapes(N, K).items():
        module.register_buffer(suffix, torch.empty(*lead, *s, dtype=torch.uint8 if dt == "U8" else torch.float32))


def _drop_packed(module: nn.Module) -> None:
    """Free the packed buffers once a kernel holds its own copy of the weight."""
    for name in ("qweight", "scales", "qzeros"):
        if name in module._buffers:
            module._buffers[name] = torch.empty(0, dtype=module._buffers[name].dtype)


class QLinear(nn.Module):
    """Drop-in for nn.Linear over a packed weight: buffers qweight/scales[/qzeros] (+ a float bias)."""

    def __init__(self, in_features: int, out_features: int, spec: QuantSpec, bias: bool = False,
                 needs_weight: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.spec = in_features, out_features, spec
        self.needs_weight = needs_weight  # the owner reads `.weight` as a matrix: never an opaque kernel
        _register_packed(self, spec, out_features, in_features)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.kernel, self._dense, self._int4 = "dequant", None, None

    def packed(self):
        return self.qweight, self.scales, self._buffers.get("qzeros")

    @property
    def weight(self) -> torch.Tensor:
        """The float weight (MLA's absorbed attention reads kv_b_proj's weight directly)."""
        if self._dense is not None:
            return self._dense
        return dequantize(self.spec, *self.packed(), K=self.in_features)

    def prepare(self, compute_dtype, kernel: str = "auto") -> None:
        N, K = self.out_features, self.in_features
        self.kernel = kernel_for(self.spec, self.qweight.device, N, K, kernel)
        if self.kernel == "int4pack" and self.needs_weight:
            self.kernel = "dense"
        if self.kernel == "int4pack":
            self._int4 = _to_int4pack(self.spec, *self.packed(), N, K)
        elif self.kernel == "dense":  # widen in row chunks: no full-size float32 temporaries
            qw, sc, qz = self.packed()
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
        return F.linear(x, self.weight.to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_features}->{self.out_features}, {self.spec.bits}-bit bs{self.spec.block_size}, {self.kernel}"


class _PackedStack(nn.Module):
    """[E, ...] packed buffers of one projection of every expert (`experts.gate_proj.qweight`, ...)."""

    def __init__(self, spec: QuantSpec, E: int, N: int, K: int):
        super().__init__()
        _register_packed(self, spec, N, K, lead=(E,))

    def row(self, e: int):
        z = self._buffers.get("qzeros")
        return self.qweight[e], self.scales[e], None if z is None else z[e]


class QuantExperts(Experts):
    """Routed experts over packed weights (the experts seam): gate_proj/up_proj/down_proj hold [E, ...] stacks."""

    def __init__(self, n_experts: int, hidden: int, inter: int, spec: QuantSpec):
        super().__init__()
        self.n_experts, self.hidden, self.inter, self.spec = n_experts, hidden, inter, spec
        self.gate_proj = _PackedStack(spec, n_experts, inter, hidden)
        self.up_proj = _PackedStack(spec, n_experts, inter, hidden)
        self.down_proj = _PackedStack(spec, n_experts, hidden, inter)
        self.kernel, self._w = "dequant", None

    def _float(self, e: int, dtype) -> tuple[torch.Tensor, ...]:
        return tuple(dequantize(self.spec, *p.row(e), K=K).to(dtype) for p, K in
                     ((self.gate_proj, self.hidden), (self.up_proj, self.hidden), (self.down_proj, self.inter)))

    def prepare(self, compute_dtype, kernel: str = "auto") -> None:
        D, I, E = self.hidden, self.inter, self.n_experts
        dev = self.gate_proj.qweight.device
        kernels = {kernel_for(self.spec, dev, 2 * I, D, kernel), kernel_for(self.spec, dev, D, I, kernel)}
        self.kernel = kernels.pop() if len(kernels) == 1 else ("dense" if dev.type == "cpu" else "dequant")
        if self.kernel == "int4pack":  # gate and up rows concatenated: one matmul for both
            gate_up = [_to_int4pack(self.spec, *(None if a is None else torch.cat([a, b]) for a, b in
                                                 zip(self.gate_proj.row(e), self.up_proj.row(e))), 2 * I, D)
                       for e in range(E)]
            down = [_to_int4pack(self.spec, *self.down_proj.row(e), D, I) for e in range(E)]
            self._w = (gate_up, down)
        elif self.kernel == "dense":
            self._w = [torch.stack(ws) for ws in zip(*(self._float(e, compute_dtype) for e in range(E)))]
        if self.kernel != "dequant":
            for p in (self.gate_proj, self.up_proj, self.down_proj):
                _drop_packed(p)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "int4pack":
            gu = _int4_mm(x, self._w[0][e], self.spec.block_size)
            h = F.silu(gu[:, :self.inter]) * gu[:, self.inter:]
            return _int4_mm(h, self._w[1][e], self.spec.block_size).to(x.dtype)
        g, u, d = (w[e] for w in self._w) if self.kernel == "dense" else self._float(e, x.dtype)
        return swiglu(x, g, u, d)
