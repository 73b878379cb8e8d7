"""Quantization recipes and the quantized checkpoint's manifest (`quantization.json`); no torch.

A recipe is a predicate from a tensor's checkpoint name to a `QuantSpec` (or None: keep float). The
router gate is never quantized. Recipes: `int4-experts` (routed experts 4-bit; attention, shared
experts, dense FFN and lm_head 8-bit), `int8` (every language-model linear 8-bit), `int4` (every
language-model linear 4-bit); `vision_int8` adds the vision tower's linears at 8-bit. Embeddings,
norms, biases, the projector and everything else stay float. By default 4-bit blocks carry zero
points (asymmetric) and 8-bit blocks are symmetric: on the reference fixtures that pairing gave the
lowest logit error of the four (tests/test_quant.py, README).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from vl2edge import schema
from vl2edge.errors import ConfigError

from .format import QuantSpec

MANIFEST = "quantization.json"
FORMAT = "vl2edge.packed.v1"
RECIPES = ("int4-experts", "int8", "int4")
EXPORT_RECIPES = ("float32", *RECIPES)  # float32: a plain-ops ONNX export, for verification
# The ONNX export's block size where the model's widths allow it (else 32: QMoE needs the hidden and
# expert widths divisible by it). 64 against 32, measured on full-size Tiny int4-experts (2026-12-02,
# bench/RESULTS.md): the decoder session holds 2.2 instead of 2.7 GB, decode is 8 % and a 1432-token
# prefill 11 % faster; the error stays between block 32's and block 128's, both within the fixtures'
# budgets (tests/test_quant.py). `vl2edge quantize` (the torch backend) keeps Recipe's 32.
EXPORT_BLOCK_SIZE = 64


def export_block_size(hidden: int, expert_width: int | None) -> int:
    """EXPORT_BLOCK_SIZE when it divides the widths QMoE blocks (hidden, the experts' intermediate), else 32."""
    widths = (hidden,) if expert_width is None else (hidden, expert_width)
    return EXPORT_BLOCK_SIZE if all(w % EXPORT_BLOCK_SIZE == 0 for w in widths) else 32

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
    top = schema.Fields(schema.load_file(f), str(f))
    if top.raw("format", None) != FORMAT:
        raise ConfigError(f"{f}: unknown quantization format {top.raw('format', None)!r:.60} (expected {FORMAT})")
    tensors = top.sub("tensors")
    specs = {}
    for name in tensors.obj:
        t = tensors.sub(name)
        try:
            specs[name] = QuantSpec(t.integer("bits"), t.integer("block_size", lo=1, hi=1 << 16),
                                    t.boolean("symmetric"), t.text("algorithm", "rtn", max_len=16))
        except ValueError as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"{t.where}: {e}") from None
    return specs


def write_manifest(root, recipe: Recipe, specs: dict[str, QuantSpec], source: str) -> None:
    (Path(root) / MANIFEST).write_text(json.dumps({
        "format": FORMAT,
        "layout": "MatMulNBits: qweight uint8 [N, k_blocks, block_size*bits/8] (4-bit: low nibble first), "
                  "scales float32 [N, k_blocks], optional qzeros uint8 packed [N, ceil(k_blocks*bits/8)] "
                  "(absent: zero point 2^(bits-1))",
        "recipe": recipe.to_dict() | {"label": recipe.label}, "source": source,
        "tensors": {n: s.to_dict() for n, s in specs.items()}}, indent=1))

