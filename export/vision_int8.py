"""The int8 vision graph: the vision tower + projector with statically quantized GEMMs (QDQ), and its gate.

    torch copy of vision + projector, export twins swapped in (attention -> com.microsoft
    MultiHeadAttention, tanh-GELU -> com.microsoft FastGelu)
      -> SmoothQuant-style scale migration, exact in float (`smooth`)
      -> bias correction of the Linears that will be int8 (`correct_bias`)
      -> torch.onnx.export (float) -> onnxruntime.quantization.quantize_static: QDQ, uint8 activations per
         tensor (MinMax ranges over the calibration tiles), int8 weights per output channel, the tower's
         weight MatMuls only (the projector stays float), MatMul outputs not requantized
      -> vision_int8.onnx: ORT runs each DQ -> MatMul as MatMulIntegerToFloat, the u8s8 QGEMM (AMX /
         AVX-512-VNNI here)
    while the features on the calibration tiles miss SEARCH_TARGET, the next tower GEMM from the front is
    kept in float (at most MAX_FLOAT, and no longer once the pace of the last round cannot reach it) and the
    last two steps are redone

Calibration tiles are what the model's own processor makes of a set of pictures (`calibration_images`:
the synthetic sample picture at several sizes plus a caller's folder). `feature_gate` is the gate the
export applies on its verification sample: rel-L2 of the int8 graph's features against the float graph's,
within what the official code's own precision costs on the same tiles (`bf16_features`: the tower and
projector in bfloat16, as the reference runs them) and never above BF16_CAP.

Measured (bench/vision_int8.py; full-width SigLIP-SO400M tower with random weights, features rel-L2 on
tiles of pictures not calibrated on): dynamic int8 (the previous scheme) 1.18 %; static, every GEMM 1.58 %;
projector float 0.65 %; MatMul outputs not requantized 0.53 % (Percentile and Entropy ranges: 0.53 % too);
+ SmoothQuant 0.5 0.47 %; + bias correction 0.27 %, with all 108 tower GEMMs int8.

Dimension legend: n tiles, N patches per tile, W width, H heads, hd head size, K a Linear's input width.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vl2edge.cpu_features import u8s8_exact
from vl2edge.errors import InputError
from vl2edge.images import SUFFIXES, load_image
from vl2edge.models.model import VL2Model
from vl2edge.models.swap import swap_modules
from vl2edge.models.vision import Attention, Block, Mlp
from vl2edge.processor import Processor
from vl2edge.synthetic import sample_image

from .decoder import errors
from .graphs import export_vision, one_data_file, quiet_quantizer
from .ops import MS

CALIBRATION_SIZES = ((640, 480), (384, 384), (1024, 768), (300, 800), (900, 400), (1280, 720))
MAX_TILES = 64            # calibration tiles at most (spread evenly over the pictures' tiles)
METHOD = "MinMax"         # ORT CalibrationMethod name; chosen by measurement (README, bench/vision_int8.py)
SMOOTH_ALPHA = 0.5        # SmoothQuant migration strength; None: no migration
GATE = 0.01               # rel-L2 of the features against the float graph that makes int8 the default, or
                          # bfloat16's rel-L2 on the same tiles where that is larger (the reference's precision)
BF16_CAP = 0.02           # ... but never more than this (a tower where bfloat16 itself is far off proves nothing)
SEARCH_TARGET = 0.007     # on the calibration tiles, with a margin for pictures the calibration has not seen
MAX_FLOAT = 8             # tower GEMMs the search may keep in float before it gives up (then the gate decides)
KEEP_FLOAT = ("/projector/",)  # node-name prefixes left in float: the projector's two GEMMs (~0.5 % of the
                               # FLOPs) caused 2/3 of the error (full-width tower: 1.58 % -> 0.65 %)


# -- calibration data -------------------------------------------------------------------------------------

def calibration_images(folder=None) -> list:
    """The synthetic sample picture at CALIBRATION_SIZES, plus every image file directly in `folder`."""
    images: list = [sample_image(w, h) for w, h in CALIBRATION_SIZES]
    if folder is not None:
        found = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in SUFFIXES)
        if not found:
            raise InputError(f"calibration images: {folder} holds no pictures ({', '.join(sorted(SUFFIXES))})")
        images += found
    return images


def calibration_tiles(processor: Processor, images, limit: int = MAX_TILES) -> np.ndarray:
    """Distinct tiles [n, 3, S, S] (global views and local crops) the processor makes of `images`, at most
    `limit` of them spread evenly."""
    tiles: list[np.ndarray] = []
    seen: set[bytes] = set()
    for im in images:
        for t in processor.tile_image(load_image(im), cropping=True)[0]:
            if (key := t.tobytes()) not in seen:
                seen.add(key)
                tiles.append(t)
    pick = np.linspace(0, len(tiles) - 1, min(limit, len(tiles))).round().astype(int)
    return np.stack([tiles[i] for i in pick])


class _Tiles:
    """onnxruntime.quantization.CalibrationDataReader over tiles, one per run; `set_range` lets the
    calibrator collect (and reduce) one tile at a time, so its memory is one tile's activations."""

    def __init__(self, tiles: np.ndarray):
        self.tiles, self.pos, self.end = tiles, 0, len(tiles)

    def __len__(self) -> int:
        return len(self.tiles)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.pos, self.end = start_index, min(end_index, len(self.tiles))

    def get_next(self):
        if self.pos >= self.end:
            return None
        self.pos += 1
        return {"pixel_values": self.tiles[self.pos - 1:self.pos]}


# -- export twins -----------------------------------------------------------------------------------------

class MHAFn(torch.autograd.Function):
    """Multi-head attention over q, k, v [n, N, W] without mask (SigLIP's)."""

    @staticmethod
    def forward(ctx, q, k, v, heads: int):
        n, N, W = q.shape
        q, k, v = (t.reshape(n, N, heads, W // heads).transpose(1, 2) for t in (q, k, v))  # [n, H, N, hd]
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, N, W)

    @staticmethod
    def symbolic(g, q, k, v, heads):
        out = g.op(MS + "MultiHeadAttention", q, k, v, num_heads_i=heads)
        out.setType(q.type())
        return out


class FastGeluFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return F.gelu(x, approximate="tanh")

    @staticmethod
    def symbolic(g, x):
        out = g.op(MS + "FastGelu", x)
        out.setType(x.type())
        return out


class ExportVisionAttention(nn.Module):
    def __init__(self, a: Attention):
        super().__init__()
        self.qkv, self.proj, self.heads = a.qkv, a.proj, a.heads

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.proj(MHAFn.apply(q, k, v, self.heads))


class ExportVisionMlp(nn.Module):
    def __init__(self, m: Mlp):
        super().__init__()
        self.fc1, self.fc2 = m.fc1, m.fc2

    def forward(self, x):
        return self.fc2(FastGeluFn.apply(self.fc1(x)))


class Int8VisionGraph(nn.Module):
    """A float copy of the vision tower + projector with the export twins swapped in (the model is untouched)."""

    def __init__(self, model: VL2Model):
        super().__init__()
        self.vision, self.projector = copy.deepcopy(model.vision), copy.deepcopy(model.projector)

        def twin(name: str, mod: nn.Module) -> nn.Module | None:
            if isinstance(mod, Attention):
                return ExportVisionAttention(mod)
            if isinstance(mod, Mlp):
                return ExportVisionMlp(mod)
            return None

        swap_modules(self.vision, twin)

    def forward(self, pixel_values):
        return self.projector(self.vision(pixel_values))


# -- SmoothQuant and bias correction (in torch, before export) ------------------------------------------

@torch.no_grad()
def input_stats(graph: Int8VisionGraph, tiles: np.ndarray) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per input channel (max |x|, mean x) [K] over the tiles for every Linear of the tower, by module name
    (`blocks.3.attn.qkv`)."""
    acc: dict[str, list] = {}

    def hook(name):
        def record(mod, args, out):
            x = args[0].detach().flatten(0, -2)                     # [n*N, K]
            m, total = x.abs().amax(0), x.sum(0)
            if name in acc:
                m, total = torch.maximum(acc[name][0], m), acc[name][1] + total
            acc[name] = [m, total, (acc[name][2] if name in acc else 0) + x.shape[0]]
        return record

    hooks = [m.register_forward_hook(hook(n)) for n, m in graph.vision.named_modules() if isinstance(m, nn.Linear)]
    try:
        for i in range(len(tiles)):
            graph(torch.from_numpy(tiles[i:i + 1]))
    finally:
        for h in hooks:
            h.remove()
    return {n: (m, total / count) for n, (m, total, count) in acc.items()}


def _scales(absmax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's s = max|X|^a / max|W|^(1-a) per input channel (weight [out, K])."""
    w = weight.abs().amax(0)
    return (absmax.clamp(min=1e-5) ** alpha / w.clamp(min=1e-5) ** (1 - alpha)).clamp(1e-2, 1e2)


@torch.no_grad()
def smooth(graph: Int8VisionGraph, stats: dict, alpha: float) -> None:
    """Migrate activation range into the weights, exactly in float, where a linear map precedes the input:
    LayerNorm -> qkv and LayerNorm -> fc1 (the norm's weight and bias divided by s, the Linear's input
    columns multiplied by s), and v -> proj (v's rows of qkv divided by s: attention is linear in v).
    `stats` (input_stats) are updated to the smoothed inputs (x / s)."""
    for i, block in enumerate(graph.vision.blocks):
        assert isinstance(block, Block)
        qkv, proj, fc1 = block.attn.qkv, block.attn.proj, block.mlp.fc1
        for name, norm, lin in (("attn.qkv", block.norm1, qkv), ("mlp.fc1", block.norm2, fc1),
                                ("attn.proj", None, proj)):
            key = f"blocks.{i}.{name}"
            s = _scales(stats[key][0], lin.weight, alpha)
            if norm is not None:
                norm.weight.div_(s)
                norm.bias.div_(s)
            else:
                W = proj.in_features
                qkv.weight[2 * W:].div_(s[:, None])
                qkv.bias[2 * W:].div_(s)
            lin.weight.mul_(s)
            stats[key] = (stats[key][0] / s, stats[key][1] / s)


@torch.no_grad()
def correct_bias(graph: Int8VisionGraph, stats: dict, names) -> dict[str, torch.Tensor]:
    """Bias correction for the tower's Linears `names` (`blocks.3.attn.qkv`): their int8 weights (per output
    channel, symmetric [-127, 127], as onnxruntime's quantizer makes them) shift each output by
    (Wq - W) @ mean(x); the bias takes that shift back. Returns the original biases (to restore)."""
    saved = {}
    for name in names:
        lin = graph.vision.get_submodule(name)
        assert isinstance(lin, nn.Linear) and lin.bias is not None
        w = lin.weight
        scale = w.abs().amax(1, keepdim=True).clamp(min=1e-12) / 127
        wq = torch.round(w / scale).clamp(-127, 127) * scale
        saved[name] = lin.bias.clone()
        lin.bias.sub_((wq - w) @ stats[name][1])
    return saved


@torch.no_grad()
def restore_biases(graph: Int8VisionGraph, saved: dict[str, torch.Tensor]) -> None:
    for name, bias in saved.items():
        lin = graph.vision.get_submodule(name)
        assert isinstance(lin, nn.Linear) and lin.bias is not None
        lin.bias.copy_(bias)


# -- quantization -----------------------------------------------------------------------------------------

def weight_matmuls(path: Path) -> list[str]:
    """Names of the MatMul nodes whose second input is a weight (an initializer)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    inits = {i.name for i in graph.initializer}
    return [n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] in inits]


def quantize_static_vision(src: Path, out: Path, tiles: np.ndarray, method: str = METHOD,
                           exclude: tuple[str, ...] = KEEP_FLOAT) -> list[str]:
    """QDQ-quantize the weight MatMuls of the float graph `src` (except names starting with an `exclude`
    prefix) into `out`, ranges calibrated on `tiles`; returns the quantized node names. MatMul outputs stay
    float (DQ -> MatMul -> float, which ORT runs as MatMulIntegerToFloat, not a requantized QLinearMatMul)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    nodes = [n for n in weight_matmuls(src) if not n.startswith(exclude)]
    with quiet_quantizer():
        quantize_static(str(src), str(out), _Tiles(tiles), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                        calibrate_method=getattr(CalibrationMethod, method), nodes_to_quantize=nodes,
                        op_types_to_quantize=["MatMul"],
                        use_external_data_format=src.with_name(src.name + ".data").is_file(),
                        reduce_range=not u8s8_exact(),  # 7-bit weights where u8s8 saturates (cpu_features.py)
                        extra_options={"CalibStridedMinMax": 1,  # collect and reduce one tile at a time
                                       "OpTypesToExcludeOutputQuantization": ["MatMul"]})
    one_data_file(out)
    return nodes


def _features(path: Path, tiles: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {"pixel_values": tiles[i:i + 4]})[0] for i in range(0, len(tiles), 4)])


def _module(node: str) -> str:
    """The tower Linear a weight MatMul was traced from: /vision/blocks.3/attn/qkv/MatMul -> blocks.3.attn.qkv."""
    return node.removeprefix("/vision/").removesuffix("/MatMul").replace("/", ".")


def _hopeless(search: list[dict], last: int) -> bool:
    """Would the rounds left miss SEARCH_TARGET even at twice the pace of the last round? (Each round is a
    calibration: minutes at full width. Measured: on the fixtures the pace grows over the first rounds and
    2-7 rounds reach the target; on full-size random Tiny 8 rounds moved the error only 1.57 -> 1.33 %.)"""
    if len(search) < 2:
        return False
    pace = search[-2]["calibration_rel_l2"] - search[-1]["calibration_rel_l2"]
    left = last - search[-1]["float_gemms"]
    return 2 * pace * left < search[-1]["calibration_rel_l2"] - SEARCH_TARGET


def export_vision_int8(model: VL2Model, out: Path, tiles: np.ndarray, method: str = METHOD,
                       alpha: float | None = SMOOTH_ALPHA, bias_correction: bool = True,
                       max_float: int = MAX_FLOAT) -> dict:
    """Smooth (unless alpha is None), bias-correct, export the twin graph in float beside `out` and quantize
    it into `out`; returns the manifest's graph entry (the gate's numbers are added by the verification).

    While the features on (up to 16 of) the calibration tiles miss SEARCH_TARGET, the next tower GEMM from
    the front is kept in float, at most `max_float` of them."""
    base = Int8VisionGraph(model)
    stats = input_stats(base, tiles)
    if alpha is not None:
        smooth(base, stats, alpha)
    check = tiles[::max(1, len(tiles) // 16)]
    for f in (out, out.with_name(out.name + ".data")):
        f.unlink(missing_ok=True)
    search: list[dict] = []
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".vision-float-") as tmp:
        ref_path, src = Path(tmp) / "smoothed.onnx", Path(tmp) / "corrected.onnx"
        export_vision(model, ref_path, base)
        ref = _features(ref_path, check)
        tower = [n for n in weight_matmuls(ref_path) if not n.startswith(KEEP_FLOAT)]
        for k in range(min(max_float, len(tower)) + 1):
            keep = KEEP_FLOAT + tuple(tower[:k])
            if bias_correction:
                saved = correct_bias(base, stats, [_module(n) for n in tower[k:]])
                export_vision(model, src, base)
                restore_biases(base, saved)
            nodes = quantize_static_vision(src if bias_correction else ref_path, out, tiles, method, keep)
            err = errors(_features(out, check), ref)["rel_l2"]
            search.append({"float_gemms": k, "calibration_rel_l2": err})
            if err <= SEARCH_TARGET or _hopeless(search, min(max_float, len(tower))):
                break
    smoothing = f"SmoothQuant alpha {alpha}" if alpha is not None else "no smoothing"
    return {"file": out.name, "inputs": ["pixel_values"], "outputs": ["image_features"],
            "scheme": f"static QDQ: uint8 activations per tensor ({method} ranges over {len(tiles)} calibration "
                      f"tiles), int8 weights per output channel{' with bias correction' * bias_correction}, "
                      f"{smoothing}; {len(nodes)} of {len(tower)} tower GEMMs on the u8s8 path "
                      "(MatMulIntegerToFloat); float: the projector, "
                      f"{len(tower) - len(nodes)} tower GEMMs, attention (MultiHeadAttention), FastGelu, LayerNorm",
            "calibration": {"method": method, "tiles": len(tiles), "smooth_alpha": alpha,
                            "bias_correction": bias_correction, "int8_nodes": len(nodes), "float_nodes": list(keep),
                            "search": search},
            "int8_weights": [f"vision.{_module(n)}.weight" for n in nodes]}


def bf16_features(model: VL2Model, tiles: np.ndarray) -> np.ndarray:
    """The features [n, N/4, D] of `tiles` [n, 3, S, S] at the official code's precision: a copy of the vision
    tower and projector in bfloat16 (the model is untouched; the copy is freed on return)."""
    vision = copy.deepcopy(model.vision).to(torch.bfloat16)
    projector = copy.deepcopy(model.projector).to(torch.bfloat16)
    with torch.inference_mode():
        return projector(vision(torch.from_numpy(tiles).to(torch.bfloat16))).float().numpy()


def feature_gate(int8: np.ndarray, ref: np.ndarray, bf16: np.ndarray | None = None) -> dict:
    """The gate's numbers: rel-L2 of the int8 graph's features against the float graph's (`ref`), and the limit:
    GATE, or bfloat16's rel-L2 against the same `ref` where that is larger (capped at BF16_CAP)."""
    err = errors(int8, ref)["rel_l2"]
    out: dict = {"features_rel_l2": err}
    limit = GATE
    if bf16 is not None:
        out["bf16_rel_l2"] = errors(bf16, ref)["rel_l2"]
        limit = max(GATE, min(out["bf16_rel_l2"], BF16_CAP))
    return out | {"limit": limit, "passed": bool(err <= limit)}
