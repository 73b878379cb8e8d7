"""Quantization math and recipes: float weights -> the packed format of `vl2edge.qlinear`.

A recipe is a predicate from a tensor's checkpoint name to a `QuantSpec` (or None: keep float). The
router gate is never quantized. Recipes: `int4-experts` (routed experts 4-bit; attention, shared
experts, dense FFN and lm_head 8-bit), `int8` (every language-model linear 8-bit), `int4` (every
language-model linear 4-bit); `vision_int8` adds the vision tower's linears at 8-bit. Embeddings,
norms, biases, the projector and everything else stay float. By default 4-bit blocks carry zero
points (asymmetric) and 8-bit blocks are symmetric: on the reference fixtures that pairing gave the
lowest logit error of the four (tests/test_quant.py, README).

Quantizers (numpy, row-independent so callers can stream row chunks):
- `rtn` round-to-nearest. Symmetric: scale = the block's largest-magnitude value / -2^(bits-1), so
  that value lands exactly on the lowest level (q4_0-style). Asymmetric: min/max (including 0).
- `mse`: RTN followed by a search over clipped scales with alternating least-squares refinement
  (w ~ s * (q - z) with s solved in closed form, q re-rounded), keeping each block's best; the same
  squared-error objective HQQ's half-quadratic solver targets with p = 2. On Gaussian weights it
  lowers the 4-bit output error by ~5 % (tests/test_quant.py); it costs ~10-20x the time of RTN.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ConfigError
from .qlinear import QuantSpec, pack

MANIFEST = "quantization.json"
FORMAT = "vl2edge.packed.v1"
RECIPES = ("int4-experts", "int8", "int4")

_ROLES = [  # (role, pattern) - first match wins
    ("router", re.compile(r".*\.mlp\.gate\.weight")),
    ("expert", re.compile(r".*\.mlp\.experts\.\d+\.(gate|up|down)_proj\.weight")),
    ("shared", re.compile(r".*\.mlp\.shared_experts\.(gate|up|down)_proj\.weight")),
    ("dense_ffn", re.compile(r"language\.model\.layers\.\d+\.mlp\.(gate|up|down)_proj\.weight")),
    ("attention", re.compile(r"language\.model\.layers\.\d+\.self_attn\.\w+\.weight")),
    ("lm_head", re.compile(r"language\.lm_head\.weight")),
    ("vision", re.compile(r"vision\.blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.weight")),
]


def role(name: str) -> str | None:
    for r, pat in _ROLES:
        if pat.fullmatch(name):
            return r
    return None


@dataclass(frozen=True)
class Recipe:
    name: str
    block_size: int = 32
    algorithm: str = "rtn"
    symmetric: bool | None = None  # None: 4-bit asymmetric (zero points), 8-bit symmetric - measured best
    vision_int8: bool = False

    def __post_init__(self):
        if self.name not in RECIPES:
            raise ConfigError(f"unknown recipe {self.name!r}; known: {', '.join(RECIPES)}")
        try:
            QuantSpec(4, self.block_size, True, self.algorithm)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    @property
    def label(self) -> str:
        return self.name + ("+vision-int8" if self.vision_int8 else "")

    def bits(self, r: str | None) -> int | None:
        lm = ("expert", "shared", "dense_ffn", "attention", "lm_head")
        if r == "vision":
            return 8 if self.vision_int8 else None
        if r not in lm:
            return None  # router, embeddings, norms, biases, projector, ...
        if self.name == "int8":
            return 8
        if self.name == "int4":
            return 4
        return 4 if r == "expert" else 8

    def spec(self, name: str) -> QuantSpec | None:
        b = self.bits(role(name))
        if b is None:
            return None
        return QuantSpec(b, self.block_size, (b == 8) if self.symmetric is None else self.symmetric, self.algorithm)

    def specs(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, QuantSpec]:
        return {n: s for n in shapes if len(shapes[n]) == 2 and (s := self.spec(n)) is not None}

    def to_dict(self) -> dict:
        return {"name": self.name, "block_size": self.block_size, "algorithm": self.algorithm,
                "symmetric": self.symmetric, "vision_int8": self.vision_int8}


# -- the math ---------------------------------------------------------------------------------------------

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


# -- checkpoints ------------------------------------------------------------------------------------------

def base_name(name: str) -> str:
    """`X.weight` -> `X`: the stored tensors are `X.qweight`, `X.scales`, `X.qzeros`."""
    return name[: -len(".weight")]


def packed_tensor_shapes(shapes: dict[str, tuple[int, ...]], specs: dict[str, QuantSpec]) -> dict[str, tuple]:
    """The checkpoint layout after quantization: name -> (safetensors dtype or None = unchanged, shape)."""
    out: dict[str, tuple] = {}
    for name, shape in shapes.items():
        spec = specs.get(name)
        if spec is None:
            out[name] = (None, shape)
        else:
            for suffix, (dt, s) in spec.packed_shapes(*shape).items():
                out[f"{base_name(name)}.{suffix}"] = (dt, s)
    return out


def read_manifest(root) -> dict[str, QuantSpec] | None:
    """Per-tensor specs of a quantized model directory, or None for a float one."""
    f = Path(root) / MANIFEST
    if not f.is_file():
        return None
    try:
        d = json.loads(f.read_text())
        if d.get("format") != FORMAT:
            raise ConfigError(f"{f}: unknown quantization format {d.get('format')!r} (expected {FORMAT})")
        return {name: QuantSpec(**s) for name, s in d["tensors"].items()}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{f} is malformed: {e}") from None


def write_manifest(root, recipe: Recipe, specs: dict[str, QuantSpec], source: str) -> None:
    (Path(root) / MANIFEST).write_text(json.dumps({
        "format": FORMAT,
        "layout": "MatMulNBits: qweight uint8 [N, k_blocks, block_size*bits/8] (4-bit: low nibble first), "
                  "scales float32 [N, k_blocks], optional qzeros uint8 packed [N, ceil(k_blocks*bits/8)] "
                  "(absent: zero point 2^(bits-1))",
        "recipe": recipe.to_dict() | {"label": recipe.label}, "source": source,
        "tensors": {n: s.to_dict() for n, s in specs.items()}}, indent=1))

