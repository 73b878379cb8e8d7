"""Dense quantized linears for few rows (GEMV / skinny GEMM) in one Triton kernel, weights read in place.

`qlinear(x, qweight, scales, qzeros, spec)` is x @ W.T for a packed 4/8-bit W [N, K]
(`vl2edge.quant.format`), dequantized in registers tile by tile (never materialized), accumulated in
fp32 and returned in x.dtype. Float weights need no kernel: torch's matmul serves them.

Grid (cdiv(N, BLOCK_N), cdiv(M, BLOCK_M)): one program per tile of out features and of rows; each
weight tile is loaded once and applied to all BLOCK_M rows (a [BLOCK_M, BLOCK_N, BLOCK_K] broadcast
product reduced over K), so the weight is read once per BLOCK_M <= 16 rows.

Dimension legend: M rows (tokens; any leading dims of x are flattened into M), N out features,
K in features.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vl2edge.quant.format import QuantSpec

from .dequant import NUM_WARPS, bits_of, load_weight_tile, packed_dims, pick_blocks

MAX_BLOCK_M = 16  # rows sharing one weight tile; more rows get more programs along the grid's second axis


# GPU limits, kept by construction: BLOCK_M/BLOCK_N/BLOCK_K come from the wrapper (powers of two, asserted
# in `pick_blocks`, BLOCK_M in 2..16) with BLOCK_M * BLOCK_N * BLOCK_K <= MAX_TILE = 4096 fp32 elements (the
# broadcast product; 32 registers a thread at num_warps=4; the accumulator is smaller); tl.arange only
# over those; no tl.dot (the rows are too few for its 16-minimum: broadcast multiply + tl.sum instead).
@triton.jit
def _qlinear_kernel(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, M, N, K,
                    BITS: tl.constexpr, BS: tl.constexpr, HAS_ZP: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        xmask = mask_m[:, None] & (offs_k < K)[None, :]
        xv = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :], mask=xmask, other=0.0).to(tl.float32)
        w = load_weight_tile(w_ptr, s_ptr, z_ptr, offs_n, mask_n, k0, offs_k, K, BITS, BS, HAS_ZP, BLOCK_K)
        acc += tl.sum(xv[:, None, :] * w[None, :, :], axis=2)  # [BLOCK_M, BLOCK_N]
    out = acc.to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + offs_m[:, None] * N + offs_n[None, :], out, mask=mask_m[:, None] & mask_n[None, :])


def qlinear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor | None,
            spec: QuantSpec, *, block_n: int | None = None, block_k: int | None = None) -> torch.Tensor:
    """y [..., N] = x [..., K] @ W.T in x.dtype (bf16/fp16/fp32), W the packed [N, K] weight.

    qweight uint8 [N, K/bs, bs*bits/8], scales float32 [N, K/bs], qzeros uint8 [N, ceil(K/bs*bits/8)] or
    None (symmetric, as `spec` says); all contiguous, on x's device. block_n/block_k override the tile
    (powers of two). No host synchronization.
    """
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"x must be bf16/fp16/fp32, got {x.dtype}")
    if qweight.dim() != 3:
        raise ValueError(f"qweight must be [N, k_blocks, bs*bits/8], got {list(qweight.shape)}")
    N, K = packed_dims(spec, qweight, scales, qzeros)
    if x.shape[-1] != K:
        raise ValueError(f"x's last dim {x.shape[-1]} != the weight's in features {K}")
    for t in (qweight, scales, qzeros):
        if t is not None and t.device != x.device:
            raise ValueError(f"weights must be on {x.device}, got {t.device}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K).contiguous()  # [M, K]
    M = x2.shape[0]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y.reshape(*lead, N)
    bm = max(2, min(MAX_BLOCK_M, triton.next_power_of_2(M)))
    bn, bk = pick_blocks(N, K, spec, block_n, block_k, rows=bm)
    z = qzeros if qzeros is not None else scales  # stand-in pointer, never read without zero points
    _qlinear_kernel[(triton.cdiv(N, bn), triton.cdiv(M, bm))](
        x2, qweight, scales, z, y, M, N, K, BITS=bits_of(spec), BS=spec.block_size,
        HAS_ZP=qzeros is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=NUM_WARPS)
    return y.reshape(*lead, N)
