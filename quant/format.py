"""The packed 4/8-bit weight format: its spec, pack/unpack and dequantization (numpy; no torch import).

Format (the one ONNX Runtime's `MatMulNBits` and `QMoE` read), for a weight W [N, K] (torch Linear
layout, out x in), blocks of `block_size` values along K (K zero-padded to whole blocks):

    qweight  uint8 [N, k_blocks, block_size * bits / 8]   4-bit: first value in the low nibble
    scales   float32 [N, k_blocks]
    qzeros   uint8 [N, ceil(k_blocks * bits / 8)]          packed like qweight; absent = symmetric,
                                                           zero point 2^(bits-1) (8 or 128)
    W[n, k] ~= (q[n, k] - zero[n, k // block_size]) * scales[n, k // block_size]

In a checkpoint the tensor `X.weight` becomes `X.qweight`, `X.scales` (and `X.qzeros`); the recipe of
every tensor is recorded in `quantization.json` (`vl2edge.quant.recipes`), never in a file name.
pack/unpack/dequantize take numpy arrays, and torch tensors too (torch is imported only when one is
passed), so this file is the one copy of the format's arithmetic for both backends.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

ALGORITHMS = ("rtn", "mse")
SUFFIXES = ("qweight", "scales", "qzeros")


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


def whole_blocks(spec: QuantSpec | None, *dims: int) -> bool:
    """Every width a whole number of blocks (float weights: always): what the Triton kernels read."""
    return spec is None or all(d % spec.block_size == 0 for d in dims)


def _xp(a) -> Any:
    """The array module of `a`: numpy, or torch for a tensor (then torch is already imported)."""
    if isinstance(a, np.ndarray):
        return np
    import torch

    return torch


def pack(q, bits: int):
    """Integers in [0, 2^bits) [..., n] (n even for 4-bit) -> uint8 [..., n * bits / 8], low nibble first."""
    q = q.astype(np.uint8) if isinstance(q, np.ndarray) else q.to(_xp(q).uint8)
    return q if bits == 8 else q[..., 0::2] | (q[..., 1::2] << 4)


def unpack(packed, bits: int):
    """uint8 [..., m] -> integers [..., m * 8 / bits] (the inverse of `pack`; numpy or torch)."""
    if bits == 8:
        return packed
    xp = _xp(packed)
    return xp.stack([packed & 15, packed >> 4], -1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def zero_points(spec: QuantSpec, qzeros, n_blocks: int):
    """[N, k_blocks] zero points (integers, unpacked), or the symmetric default 2^(bits-1)."""
    if qzeros is None:
        return 2 ** (spec.bits - 1)
    return unpack(qzeros, spec.bits)[..., :n_blocks]


def dequantize(spec: QuantSpec, qweight, scales, qzeros=None, K: int | None = None):
    """The float weight [N, K] (numpy float32, or torch float32 on the tensors' device)."""
    N, nb, _ = qweight.shape
    q = unpack(qweight, spec.bits).reshape(N, nb, spec.block_size)
    numpy = isinstance(q, np.ndarray)
    q = q.astype(np.float32) if numpy else q.float()
    z = zero_points(spec, qzeros, nb)
    if not isinstance(z, int):
        z = (z.astype(np.float32) if numpy else z.float())[..., None]
    w = ((q - z) * scales[..., None]).reshape(N, nb * spec.block_size)
    return w if K is None else w[:, :K]
