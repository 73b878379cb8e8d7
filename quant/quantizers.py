"""The quantizers: float weight rows -> the packed format of `vl2edge.quant.format` (numpy, no torch).

Row-independent, so callers can stream row chunks of a tensor (the converter and the loader do).
- `rtn` round-to-nearest. Symmetric: scale = the block's largest-magnitude value / -2^(bits-1), so
  that value lands exactly on the lowest level (q4_0-style). Asymmetric: min/max (including 0).
- `mse`: RTN followed by a search over clipped scales with alternating least-squares refinement
  (w ~ s * (q - z) with s solved in closed form, q re-rounded), keeping each block's best; the same
  squared-error objective HQQ's half-quadratic solver targets with p = 2. On Gaussian weights it
  lowers the 4-bit output error by ~5 % (tests/test_quant.py); it costs ~10-20x the time of RTN.

Dimension legend: N rows, K columns, nb blocks per row, bs block size.
"""

from __future__ import annotations

import numpy as np

from .format import QuantSpec, pack


def _blocks(w: np.ndarray, bs: int) -> np.ndarray:
    N, K = w.shape
    nb = -(-K // bs)
    if nb * bs != K:
        w = np.concatenate([w, np.zeros((N, nb * bs - K), np.float32)], axis=1)
    return w.reshape(N, nb, bs)


def _round(wb, scale, zp, qmax):
    safe = np.where(scale == 0, 1, scale)
    return np.clip(np.rint(wb / safe[..., None]) + zp[..., None], 0, qmax)


def _rtn(wb: np.ndarray, bits: int, symmetric: bool):
    qmax, mid = 2 ** bits - 1, 2 ** (bits - 1)
    if symmetric:
        idx = np.abs(wb).argmax(-1)[..., None]
        vmax = np.take_along_axis(wb, idx, -1)[..., 0]
        scale = vmax / -mid
        zp = np.full(scale.shape, mid, np.float32)
    else:
        lo, hi = np.minimum(wb.min(-1), 0), np.maximum(wb.max(-1), 0)
        scale = (hi - lo) / qmax
        zp = np.clip(np.rint(-lo / np.where(scale == 0, 1, scale)), 0, qmax)
    return scale.astype(np.float32), zp.astype(np.float32)


def _err(wb, q, scale, zp):
    return (((q - zp[..., None]) * scale[..., None] - wb) ** 2).sum(-1)


def _mse(wb: np.ndarray, bits: int, symmetric: bool, steps: int = 2):
    qmax = 2 ** bits - 1
    s0, z0 = _rtn(wb, bits, symmetric)
    best_s, best_z = s0, z0
    best = _err(wb, _round(wb, s0, z0, qmax), s0, z0)
    if symmetric:
        starts = [(s0 * c, z0) for c in (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)]
    else:  # shrink each end of the [min, max] range on its own
        lo, hi = np.minimum(wb.min(-1), 0), np.maximum(wb.max(-1), 0)
        starts = []
        for cl in (1.0, 0.9, 0.8, 0.7):
            for ch in (1.0, 0.9, 0.8, 0.7):
                s = ((hi * ch - lo * cl) / qmax).astype(np.float32)
                starts.append((s, np.clip(np.rint(-lo * cl / np.where(s == 0, 1, s)), 0, qmax).astype(np.float32)))
    for s, z in starts:
        for _ in range(steps + 1):
            q = _round(wb, s, z, qmax)
            if symmetric:  # s = <w, q - z> / |q - z|^2
                d = q - z[..., None]
                den = (d * d).sum(-1)
                s = np.where(den > 0, (wb * d).sum(-1) / np.where(den > 0, den, 1), s).astype(np.float32)
            else:  # w ~ s*q + b by least squares, then the integer zero point z = -b/s
                qm, wm = q.mean(-1), wb.mean(-1)
                var = (q * q).mean(-1) - qm * qm
                s = np.where(var > 0, ((q * wb).mean(-1) - qm * wm) / np.where(var > 0, var, 1), s)
                s = s.astype(np.float32)
                z = np.clip(np.rint(qm - wm / np.where(s == 0, 1, s)), 0, qmax).astype(np.float32)
        q = _round(wb, s, z, qmax)
        e = _err(wb, q, s, z)
        better = e < best
        best = np.where(better, e, best)
        best_s, best_z = np.where(better, s, best_s), np.where(better, z, best_z)
    return best_s.astype(np.float32), best_z.astype(np.float32)


def quantize(w: np.ndarray, spec: QuantSpec) -> dict[str, np.ndarray]:
    """Float weight rows [N, K] -> {"qweight", "scales"[, "qzeros"]} in the packed format."""
    wb = _blocks(np.asarray(w, dtype=np.float32), spec.block_size)
    fit = _rtn if spec.algorithm == "rtn" else _mse
    scale, zp = fit(wb, spec.bits, spec.symmetric)
    q = _round(wb, scale, zp, 2 ** spec.bits - 1)
    out = {"qweight": pack(q.astype(np.uint8), spec.bits), "scales": scale}
    if not spec.symmetric:
        zq = zp.astype(np.uint8)
        if spec.bits == 4 and zq.shape[-1] % 2:
            zq = np.concatenate([zq, np.zeros((zq.shape[0], 1), np.uint8)], axis=1)
        out["qzeros"] = pack(zq, spec.bits)
    return out
