"""Routed experts of decode-sized token batches in two Triton kernels, weights read in place.

`moe_experts(x, topk_idx, topk_w, gate, up, down, spec, rows)` computes, for every token t,

    y[t] = sum_{a = 0..A-1} topk_w[t, a] * down_e(silu(gate_e(x[t])) * up_e(x[t])),   e = topk_idx[t, a]

over float (bf16/fp16/fp32) or packed 4/8-bit expert stacks (`vl2edge.quant.format`), dequantized in
registers (a dequantized weight is never materialized). Expert ids stay on the device: the wrapper only
checks shapes/dtypes, allocates two buffers of static shape and launches two kernels, so it never
synchronizes with the host and can be captured into a CUDA graph.

1. `_gate_up_kernel`, grid (T*A, cdiv(I, BLOCK_N)): one (token, slot) pair and a tile of I; gate and up
   tiles share every x load. g and u accumulate in fp32, are rounded to x.dtype, then (as eager torch
   does for a bf16 `F.silu(g) * u`) silu is evaluated in fp32 on the rounded g and rounded to x.dtype, and
   the product with the rounded u is evaluated in fp32 and rounded to x.dtype: h [T*A, I] in x.dtype.
2. `_down_kernel`, grid (T, cdiv(D, BLOCK_N)): one token and a tile of D; loops over the slots a = 0..A-1
   in order, accumulating topk_w[t, a] * (W_down[e] @ h[t*A + a]) in fp32 (each slot's down output stays
   fp32: no rounding before the weighting), the sum cast to x.dtype once at the end. Deterministic, no
   atomics.

`rows` [E] (optional) maps an expert id to its row of the stacks (offloading: the stacks are device slots).
Ids (and rows) are not range-checked on the device: the router's ids must be < E and rows < the stacks' E.

Dimension legend: T tokens, A top-k slots, D hidden, I expert intermediate, E experts (stack rows).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from vl2edge.models.experts import PROJECTIONS
from vl2edge.quant.format import QuantSpec

from .dequant import (
    NUM_WARPS,
    bits_of,
    expert_ptrs,
    load_weight_tile,
    packed_dims,
    pair_expert,
    pick_blocks,
    require_dense,
)

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclass(frozen=True)
class ExpertWeights:
    """One projection's weights for all experts (or all device slots), torch Linear layout [E, N, K].

    Float: `weight` [E, N, K] (bf16/fp16/fp32). Packed: `qweight` uint8 [E, N, K/bs, bs*bits/8],
    `scales` float32 [E, N, K/bs], `qzeros` uint8 [E, N, ceil(K/bs*bits/8)] or None (symmetric).
    Each expert's matrix must be dense; the stacks may be strided along E (views into per-expert blobs).
    """

    weight: torch.Tensor | None = None
    qweight: torch.Tensor | None = None
    scales: torch.Tensor | None = None
    qzeros: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if (self.weight is None) == (self.qweight is None):
            raise ValueError("give exactly one of weight (float) or qweight (packed)")

    @classmethod
    def from_packed(cls, packed: dict[str, torch.Tensor]) -> ExpertWeights:
        """From `quantize_tensor`'s dict of [E, ...] stacks (qweight, scales[, qzeros])."""
        return cls(qweight=packed["qweight"], scales=packed["scales"], qzeros=packed.get("qzeros"))

    def dims(self, spec: QuantSpec | None) -> tuple[int, int, int]:
        """(E, N, K), checking the tensors against `spec` (None: float weights)."""
        if spec is None:
            w = self.weight
            if w is None or w.dim() != 3 or w.dtype not in FLOAT_DTYPES:
                raise ValueError("float experts need weight [E, N, K] in bf16/fp16/fp32")
            require_dense(w, 1)
            E, N, K = w.shape
            return E, N, K
        if self.qweight is None or self.scales is None or self.qweight.dim() != 4:
            raise ValueError("packed experts need qweight uint8 [E, N, k_blocks, bs*bits/8] and scales")
        E, N, K = packed_dims(spec, self.qweight, self.scales, self.qzeros)
        return E, N, K

    def kernel_args(self) -> tuple[torch.Tensor | int, ...]:
        """(weight, scales, zeros, and their strides between experts in elements): the kernels' arguments.
        Absent tensors are stood in for by a present one (never read)."""
        w = self.weight if self.weight is not None else self.qweight
        assert w is not None
        s = self.scales if self.scales is not None else w
        z = self.qzeros if self.qzeros is not None else s
        return w, s, z, w.stride(0), s.stride(0), z.stride(0)


# GPU limits, kept by construction: BLOCK_N/BLOCK_K come from `pick_blocks` (powers of two, asserted; each
# [BLOCK_N, BLOCK_K] fp32 accumulator <= MAX_TILE = 4096 elements = 32 registers a thread at num_warps=4;
# two accumulators here, one in `_down_kernel`); tl.arange only over those; no tl.dot (GEMV: broadcast
# multiply + tl.sum); no shared memory beyond tl.sum's reduction scratch; the loops are plain range()s over
# runtime D/I and the constexpr A; scalar loads (ids, rows, routing weights) only.
@triton.jit
def _gate_up_kernel(x_ptr, idx_ptr, rows_ptr, h_ptr,
                    gw_ptr, gs_ptr, gz_ptr, g_ws, g_ss, g_zs, uw_ptr, us_ptr, uz_ptr, u_ws, u_ss, u_zs,
                    cgw_ptr, cgs_ptr, cgz_ptr, cg_ws, cg_ss, cg_zs, cuw_ptr, cus_ptr, cuz_ptr, cu_ws, cu_ss, cu_zs,
                    D, I,
                    A: tl.constexpr, HAS_ROWS: tl.constexpr, HAS_COLD: tl.constexpr, BITS: tl.constexpr,
                    BS: tl.constexpr, HAS_ZP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    p = tl.program_id(0)  # (token, slot) pair: t = p // A, a = p % A; the row of h
    pid_n = tl.program_id(1)
    t = p // A
    e, r = pair_expert(idx_ptr, rows_ptr, p, HAS_ROWS)
    gw, gs, gz = expert_ptrs(gw_ptr, gs_ptr, gz_ptr, g_ws, g_ss, g_zs, cgw_ptr, cgs_ptr, cgz_ptr, cg_ws, cg_ss,
                             cg_zs, e, r, HAS_COLD)
    uw, us, uz = expert_ptrs(uw_ptr, us_ptr, uz_ptr, u_ws, u_ss, u_zs, cuw_ptr, cus_ptr, cuz_ptr, cu_ws, cu_ss,
                             cu_zs, e, r, HAS_COLD)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < I
    acc_g = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < D
        xv = tl.load(x_ptr + t * D + offs_k, mask=mask_k, other=0.0).to(tl.float32)[None, :]
        acc_g += load_weight_tile(gw, gs, gz, offs_n, mask_n, k0, offs_k, D, BITS, BS, HAS_ZP, BLOCK_K) * xv
        acc_u += load_weight_tile(uw, us, uz, offs_n, mask_n, k0, offs_k, D, BITS, BS, HAS_ZP, BLOCK_K) * xv
    dt = h_ptr.dtype.element_ty
    g = tl.sum(acc_g, axis=1).to(dt).to(tl.float32)
    u = tl.sum(acc_u, axis=1).to(dt).to(tl.float32)
    s = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)  # silu(g), rounded like eager F.silu
    tl.store(h_ptr + p * I + offs_n, (s * u).to(dt), mask=mask_n)


@triton.jit
def _down_kernel(h_ptr, idx_ptr, rows_ptr, tw_ptr, y_ptr, dw_ptr, ds_ptr, dz_ptr, d_ws, d_ss, d_zs,
                 cdw_ptr, cds_ptr, cdz_ptr, cd_ws, cd_ss, cd_zs,
                 D, I,
                 A: tl.constexpr, HAS_ROWS: tl.constexpr, HAS_COLD: tl.constexpr, BITS: tl.constexpr,
                 BS: tl.constexpr, HAS_ZP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    t = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # tile of D (the down projection's out features)
    mask_n = offs_n < D
    out = tl.zeros([BLOCK_N], dtype=tl.float32)
    for a in range(A):  # slot order: the fp32 sum is deterministic
        p = t * A + a
        e, r = pair_expert(idx_ptr, rows_ptr, p, HAS_ROWS)
        dw, ds, dz = expert_ptrs(dw_ptr, ds_ptr, dz_ptr, d_ws, d_ss, d_zs, cdw_ptr, cds_ptr, cdz_ptr, cd_ws, cd_ss,
                                 cd_zs, e, r, HAS_COLD)
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, I, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < I
            hv = tl.load(h_ptr + p * I + offs_k, mask=mask_k, other=0.0).to(tl.float32)[None, :]
            acc += load_weight_tile(dw, ds, dz, offs_n, mask_n, k0, offs_k, I, BITS, BS, HAS_ZP, BLOCK_K) * hv
        out += tl.load(tw_ptr + p) * tl.sum(acc, axis=1)
    tl.store(y_ptr + t * D + offs_n, out.to(y_ptr.dtype.element_ty), mask=mask_n)


def moe_experts(x: torch.Tensor, topk_idx: torch.Tensor, topk_w: torch.Tensor, gate: ExpertWeights,
                up: ExpertWeights, down: ExpertWeights, spec: QuantSpec | None,
                rows: torch.Tensor | None = None, *, cold: tuple[ExpertWeights, ...] | None = None,
                block_n: int | None = None, block_k: int | None = None) -> torch.Tensor:
    """y [T, D] in x.dtype: the routing-weighted sum of the top-k experts' SwiGLU outputs for each token.

    x [T, D] bf16/fp16/fp32; topk_idx [T, A] int64 (or int32) expert ids; topk_w [T, A] routing weights
    (used as float32); gate/up [E, I, D], down [E, D, I]; spec None for float weights; rows [E] int32/int64
    expert id -> stack row (default identity). cold (with rows): (gate, up, down) stacks of every expert,
    read for the experts whose row is -1 (offloading: the stacks are device slots, cold the pinned store).
    block_n/block_k override the tile (powers of two).
    No host synchronization: nothing here reads a tensor's values.
    """
    if x.dim() != 2 or x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"x must be [T, D] bf16/fp16/fp32, got {x.dtype} {list(x.shape)}")
    T, D = x.shape
    if topk_idx.dim() != 2 or topk_idx.shape[0] != T or topk_idx.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"topk_idx must be int [T={T}, A], got {topk_idx.dtype} {list(topk_idx.shape)}")
    A = topk_idx.shape[1]
    if tuple(topk_w.shape) != (T, A):
        raise ValueError(f"topk_w must be [{T}, {A}], got {list(topk_w.shape)}")
    E, I, Dg = gate.dims(spec)
    if up.dims(spec) != (E, I, D) or Dg != D or down.dims(spec) != (E, D, I):
        raise ValueError(f"expert stacks must be gate/up [E, I, D={D}], down [E, D, I] with one E and I")
    if spec is not None:
        assert D % spec.block_size == 0 and I % spec.block_size == 0, "D and I must be whole blocks"
    if spec is None and len({p.weight.dtype for p in (gate, up, down) if p.weight is not None}) != 1:
        raise ValueError("float expert stacks must share one dtype")
    if rows is not None and (rows.dim() != 1 or rows.dtype not in (torch.int32, torch.int64)):
        raise ValueError("rows must be a 1-d int32/int64 table expert id -> stack row")
    if cold is not None:
        if rows is None:
            raise ValueError("cold stacks need the rows table (-1: read the expert from cold)")
        Ec = cold[0].dims(spec)[0]
        if tuple(c.dims(spec)[1:] for c in cold) != ((I, D), (I, D), (D, I)) or {c.dims(spec)[0] for c in cold} != {Ec}:
            raise ValueError("cold stacks must have the slot stacks' shapes, one row per expert")
    device = x.device
    for t in (topk_idx, topk_w, rows, *gate.kernel_args()[:3], *up.kernel_args()[:3], *down.kernel_args()[:3]):
        # weights may also be pinned host memory, which a CUDA kernel addresses in place (unified addressing)
        if isinstance(t, torch.Tensor) and t.device != device and not (device.type == "cuda" and t.is_pinned()):
            raise ValueError(f"all tensors must be on {device} (weights: or pinned host memory), got one on "
                             f"{t.device}")

    x = x.contiguous()
    idx = topk_idx.contiguous()
    rows = rows.contiguous() if rows is not None else None
    tw = topk_w.to(torch.float32).contiguous()
    h = torch.empty(T * A, I, dtype=x.dtype, device=device)  # [T*A, I]: row t*A + a is pair (t, a)
    y = torch.empty(T, D, dtype=x.dtype, device=device)
    if T == 0 or A == 0:
        return y.zero_()
    common = {"A": A, "HAS_ROWS": rows is not None, "HAS_COLD": cold is not None, "BITS": bits_of(spec),
              "BS": spec.block_size if spec is not None else 1, "HAS_ZP": gate.qzeros is not None}
    rows_arg = rows if rows is not None else idx  # stand-in pointer, never read without HAS_ROWS
    cg, cu, cd = cold if cold is not None else (gate, up, down)  # stand-ins, never read without HAS_COLD

    bn, bk = pick_blocks(I, D, spec, block_n, block_k)
    _gate_up_kernel[(T * A, triton.cdiv(I, bn))](
        x, idx, rows_arg, h, *gate.kernel_args(), *up.kernel_args(), *cg.kernel_args(), *cu.kernel_args(), D, I,
        BLOCK_N=bn, BLOCK_K=bk, num_warps=NUM_WARPS, **common)
    bn, bk = pick_blocks(D, I, spec, block_n, block_k)
    _down_kernel[(T, triton.cdiv(D, bn))](
        h, idx, rows_arg, tw, y, *down.kernel_args(), *cd.kernel_args(), D, I, BLOCK_N=bn, BLOCK_K=bk,
        num_warps=NUM_WARPS, **common)
    return y


def projection_weights(tensors: dict[str, torch.Tensor],
                       spec: QuantSpec | None) -> tuple[ExpertWeights, ExpertWeights, ExpertWeights]:
    """(gate, up, down) from stacks named as the experts seam names them (`gate_proj` float, or
    `gate_proj.qweight`/`.scales`/`.qzeros` packed), each [E, ...]."""
    def one(p: str) -> ExpertWeights:
        if spec is None:
            return ExpertWeights(weight=tensors[p])
        return ExpertWeights(qweight=tensors[f"{p}.qweight"], scales=tensors[f"{p}.scales"],
                             qzeros=tensors.get(f"{p}.qzeros"))

    gate, up, down = (one(p) for p in PROJECTIONS)
    return gate, up, down


def moe_offloaded(x: torch.Tensor, topk_idx: torch.Tensor, topk_w: torch.Tensor, table: torch.Tensor,
                  slots: dict[str, torch.Tensor], store: dict[str, torch.Tensor],
                  spec: QuantSpec | None) -> torch.Tensor:
    """`moe_experts` for offloaded experts: `table` [E] expert -> slot (-1: not resident), `slots` the slot
    stacks [n_slots, ...] on the device, `store` every expert's stacks [E, ...] (pinned host memory)."""
    sg, su, sd = store_w = projection_weights(store, spec)
    if next(iter(slots.values())).shape[0] == 0:  # no slots: everything in place from the (pinned) store
        return moe_experts(x, topk_idx, topk_w, sg, su, sd, spec)
    g, u, d = projection_weights(slots, spec)
    return moe_experts(x, topk_idx, topk_w, g, u, d, spec, rows=table, cold=store_w)
