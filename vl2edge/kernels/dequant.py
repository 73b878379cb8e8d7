"""The in-register dequantization helper shared by the Triton kernels: one [BLOCK_N, BLOCK_K] tile of a
weight W [N, K] (torch Linear layout) as float32, read in place from the packed format or a float matrix.

Packed format (`vl2edge.quant.format`), per matrix, all contiguous, K a multiple of the block size BS:
    qweight uint8 [N, K // BS, BS * BITS / 8]  == [N, K * BITS / 8] bytes; 4-bit: value 2j low nibble of byte j
    scales  float32 [N, K // BS]
    qzeros  uint8 [N, ceil((K // BS) * BITS / 8)] packed like qweight along the block axis, or absent:
            zero point 2^(BITS-1)
    W[n, k] = (q[n, k] - zero[n, k // BS]) * scales[n, k // BS]

Dimension legend: N out features, K in features (the tile's rows and columns).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from vl2edge.quant.format import QuantSpec

# Elements of one fp32 tile (an accumulator or a product): 32 registers a thread at the kernels' num_warps=4.
MAX_TILE = 4096
NUM_WARPS = 4
FLOAT = 0  # BITS value selecting a plain float weight (bf16/fp16/fp32 [N, K]); 4 and 8 select packed weights


def bits_of(spec: QuantSpec | None) -> int:
    """The kernels' BITS constexpr for a QuantSpec (or None: float weights)."""
    return FLOAT if spec is None else spec.bits


# GPU limits: nothing here is sized by itself. The tile shape is the caller's (BLOCK_N, BLOCK_K)
# constexprs, which every wrapper picks as powers of two within MAX_TILE and asserts (`pick_blocks`); the
# helper adds only elementwise integer/float arithmetic, [:, None]/[None, :] broadcasts and masked loads on
# that tile (no tl.dot, no reshape/join/split, no shared memory).
@triton.jit
def load_weight_tile(w_ptr, s_ptr, z_ptr, offs_n, mask_n, k0, offs_k, K,
                     BITS: tl.constexpr, BS: tl.constexpr, HAS_ZP: tl.constexpr, BLOCK_K: tl.constexpr):
    """float32 [BLOCK_N, BLOCK_K] tile W[offs_n, offs_k] of one matrix, offs_k = k0 + arange(BLOCK_K).

    w_ptr/s_ptr/z_ptr point at the matrix's first element/byte, scale and zero byte (the caller adds any
    expert offset, see `matrix_ptrs`; the matrix is dense); offs_n [BLOCK_N] int32 rows, mask_n their
    in-bounds lanes (masked rows and columns >= K come back 0); k0 is a multiple of BLOCK_K. BITS == FLOAT: a
    float [N, K] matrix; s_ptr/z_ptr unused. Packed (BITS 4 or 8): K is a multiple of BS. When
    BLOCK_K <= BS the tile lies inside the quant block k0 // BS: one scale and one zero point per row
    ([BLOCK_N] loads); otherwise they are gathered per element. HAS_ZP: z_ptr holds the packed zero points,
    else 2^(BITS-1) is used.
    """
    n = offs_n[:, None]
    # columns >= K are masked too: a tile wider than the matrix (BLOCK_K > K) must not read the next row's
    # bytes, or scales past the last block (past the end of the stack: garbage, NaN once multiplied by x's 0)
    mask = mask_n[:, None] & (offs_k < K)[None, :]
    if BITS == 0:
        w = tl.load(w_ptr + n * K + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
    else:
        if BITS == 4:
            byte = tl.load(w_ptr + n * (K // 2) + (offs_k // 2)[None, :], mask=mask, other=0).to(tl.int32)
            q = (byte >> ((offs_k & 1) * 4)[None, :]) & 15  # value 2j: low nibble of byte j
        else:
            q = tl.load(w_ptr + n * K + offs_k[None, :], mask=mask, other=0).to(tl.int32)
        kb = K // BS
        if BLOCK_K <= BS:
            blk = k0 // BS  # scalar: one block for the whole tile
            s_off = offs_n * kb + blk
            z_off = offs_n * ((kb * BITS + 7) // 8)
            smask = mask_n
        else:
            blk = (offs_k // BS)[None, :]  # [1, BLOCK_K]: the block of every column
            s_off = n * kb + blk
            z_off = n * ((kb * BITS + 7) // 8)
            smask = mask
        scale = tl.load(s_ptr + s_off, mask=smask, other=0.0)
        if HAS_ZP:
            if BITS == 4:
                zbyte = tl.load(z_ptr + z_off + blk // 2, mask=smask, other=0).to(tl.int32)
                zero = (zbyte >> ((blk & 1) * 4)) & 15
            else:
                zero = tl.load(z_ptr + z_off + blk, mask=smask, other=0).to(tl.int32)
            if BLOCK_K <= BS:
                zero = zero[:, None]
            q = q - zero
        else:
            q = q - (1 << (BITS - 1))
        if BLOCK_K <= BS:
            scale = scale[:, None]
        w = q.to(tl.float32) * scale
    return w


def packed_dims(spec: QuantSpec, qweight: torch.Tensor, scales: torch.Tensor,
                qzeros: torch.Tensor | None) -> tuple[int, ...]:
    """(*lead, N, K) of packed tensors [*lead, N, K/bs, bs*bits/8] etc., checked against `spec`.

    The kernels index them by their dense layout, so they must be contiguous (a hidden .contiguous()
    would copy every weight).
    """
    if qweight.dtype != torch.uint8 or qweight.dim() < 3:
        raise ValueError(f"qweight must be uint8 [..., N, k_blocks, bs*bits/8], got {qweight.dtype}")
    *lead, N, kb, nbytes = qweight.shape
    if nbytes != spec.block_size * spec.bits // 8:
        raise ValueError(f"qweight's last dim {nbytes} does not match {spec}")
    if scales.dtype != torch.float32 or tuple(scales.shape) != (*lead, N, kb):
        raise ValueError(f"scales must be float32 {[*lead, N, kb]}, got {scales.dtype} {list(scales.shape)}")
    if (qzeros is None) != spec.symmetric:
        raise ValueError(f"qzeros {'missing' if qzeros is None else 'given'} for {spec}")
    zb = -(-kb * spec.bits // 8)
    if qzeros is not None and (qzeros.dtype != torch.uint8 or tuple(qzeros.shape) != (*lead, N, zb)):
        raise ValueError(f"qzeros must be uint8 {[*lead, N, zb]}, got {qzeros.dtype} {list(qzeros.shape)}")
    for t in (qweight, scales, qzeros):
        if t is not None:
            require_dense(t, len(lead))
    return (*lead, N, kb * spec.block_size)


def require_dense(t: torch.Tensor, n_lead: int) -> None:
    """Each matrix t[i, ...] (after n_lead leading dims, which may be strided) must be dense: the kernels
    index it by its layout, and a hidden .contiguous() would copy every weight."""
    want, step = [], 1
    for size in reversed(t.shape[n_lead:]):
        want.append(step)
        step *= size
    got = t.stride()[n_lead:]
    if any(size > 1 and g != w for size, g, w in zip(t.shape[n_lead:], got, reversed(want))):
        raise ValueError(f"weights must be dense within each matrix, got strides {t.stride()}")


def interpreting() -> bool:
    """Running under the Triton interpreter (TRITON_INTERPRET=1: CPU tests), where GPU limits do not bind."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def pick_blocks(n: int, k: int, spec: QuantSpec | None, block_n: int | None = None,
                block_k: int | None = None, rows: int = 1) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_K) for a [n, k] weight, tiles of `rows` activation rows x BLOCK_N x BLOCK_K.

    Defaults: BLOCK_K = min(128, block size) (packed: one scale and zero point per row and tile), less for
    many rows so that BLOCK_N stays >= 32 where it can; BLOCK_N fills MAX_TILE. Both are powers of two
    (asserted); rows * BLOCK_N * BLOCK_K <= MAX_TILE is asserted too, except for explicit overrides under
    the interpreter (bigger tiles only make the CPU tests faster; the defaults always fit).
    """
    kmax = 128 if spec is None else min(128, spec.block_size)
    bk = block_k or min(kmax, max(16, triton.next_power_of_2(k)), max(16, MAX_TILE // (rows * 32)))
    bn = block_n or max(1, min(MAX_TILE // (bk * rows), triton.next_power_of_2(n)))
    for name, v in (("BLOCK_N", bn), ("BLOCK_K", bk), ("rows", rows)):
        assert v >= 1 and v & (v - 1) == 0, f"{name}={v} must be a power of two"
    assert rows * bn * bk <= MAX_TILE or interpreting(), f"tile {rows}x{bn}x{bk} exceeds {MAX_TILE} elements"
    return bn, bk


@triton.jit
def matrix_ptrs(w_ptr, s_ptr, z_ptr, r, w_stride, s_stride, z_stride):
    """Pointers to matrix r (int64) of a stack (weight, scales, zeros bases), given each stack's stride
    between matrices in elements (a stack may be strided along its first axis, e.g. views into per-expert
    blobs; each matrix itself is dense). The zero pointer is only advanced, never read, without zero points.
    """
    return w_ptr + r * w_stride, s_ptr + r * s_stride, z_ptr + r * z_stride


@triton.jit
def expert_ptrs(w_ptr, s_ptr, z_ptr, w_stride, s_stride, z_stride, cw_ptr, cs_ptr, cz_ptr, cw_stride, cs_stride,
                cz_stride, e, r, HAS_COLD: tl.constexpr):
    """Pointers to expert e's matrix: row r of the (slot) stack, or, with HAS_COLD and r < 0 (not resident),
    row e of the cold stack (pinned host memory on CUDA, read in place over the bus). A pointer select
    (`tl.where` on scalars), so both sources stay one code path."""
    w, s, z = matrix_ptrs(w_ptr, s_ptr, z_ptr, r, w_stride, s_stride, z_stride)
    if HAS_COLD:
        cold = r < 0
        cw, cs, cz = matrix_ptrs(cw_ptr, cs_ptr, cz_ptr, e, cw_stride, cs_stride, cz_stride)
        w, s, z = tl.where(cold, cw, w), tl.where(cold, cs, s), tl.where(cold, cz, z)
    return w, s, z


@triton.jit
def pair_expert(idx_ptr, rows_ptr, p, HAS_ROWS: tl.constexpr):
    """(e, r) for (token, slot) pair p: its expert id, and the expert's stack row (the table's entry, -1 for
    a cold expert; e itself without a table)."""
    e = tl.load(idx_ptr + p).to(tl.int64)
    r = e
    if HAS_ROWS:
        r = tl.load(rows_ptr + e).to(tl.int64)
    return e, r

