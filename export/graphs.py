"""Tracing torch modules to ONNX: the vision tower + projector graph, and what the decoder's pieces share
(the decoder is traced a layer at a time in export/decoder.py; the int8 vision graph's quantization is
export/vision_int8.py).

The decoder's layers run with `GraphCache` (an implementation of `vl2edge.models.cache.Cache`) in place of
the runtime's preallocated cache: past keys/values (MHA, BNSH) or past latents (MLA, [B, P, C+R]) come in
as inputs and the concatenated presents go out, so one graph serves prefill (P = 0) and decode (T = 1)
with dynamic batch, sequence and past lengths. Logits are computed for the last position only.

    decoder: inputs_embeds f32 [B,T,D], attention_mask i64 [B,P+T], past_key_values.{i}.key/.value
             (or .latent) -> logits f32 [B,V], present.{i}.key/.value (or .latent)
    vision:  pixel_values f32 [n,3,S,S] -> image_features f32 [n,196,D]
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from vl2edge.config import LanguageConfig
from vl2edge.models.model import VL2Model
from vl2edge.models.vision import VisionTower

OPSET = 17          # ai.onnx; TorchScript export writes IR 8, which every onnxruntime >= 1.14 loads
MS_OPSET = 1        # com.microsoft
EXTERNAL_MIN = 64 * 2**20


class GraphCache:
    """The decoder graph's view of the KV cache: explicit past inputs, present outputs. A graph of layers
    `first_layer`.. (one layer while tracing the streaming export) holds their pasts, in cache_io's order."""

    def __init__(self, pasts, first_layer: int = 0):
        self.pasts, self.first = list(pasts), first_layer
        self.presents: list[torch.Tensor] = []

    def begin(self, attention_mask: torch.Tensor, T: int):
        """attention_mask covers past + new positions [B, P+T]."""
        self.resume((attention_mask.sum(-1) - 1).to(torch.int32),   # GroupQueryAttention's inputs
                    torch.tensor(attention_mask.shape[1], dtype=torch.int32))
        am = attention_mask.bool()
        S = am.shape[1]
        pos = (am.long().cumsum(-1) - 1).clamp(min=0)[:, S - T:]
        q = torch.arange(T, device=am.device) + (S - T)
        s = torch.arange(S, device=am.device)
        allowed = ((s[None, :] <= q[:, None]) & am[:, None, :]) | (s[None, :] == q[:, None])
        return pos, allowed[:, None]

    def resume(self, seqlens_k: torch.Tensor, total: torch.Tensor) -> None:
        """Take GroupQueryAttention's inputs from an earlier `begin` (a layer graph's inputs)."""
        self.seqlens_k, self.total = seqlens_k, total

    def commit(self, T: int) -> None:
        pass

    def past_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        j = 2 * (layer - self.first)
        return self.pasts[j], self.pasts[j + 1]

    def add_presents(self, *presents: torch.Tensor) -> None:
        self.presents += presents

    def write_kv(self, layer: int, k, v):
        past_k, past_v = self.past_kv(layer)
        k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
        self.add_presents(k, v)
        return k, v

    def write_latent(self, layer: int, latent):
        latent = torch.cat([self.pasts[layer - self.first], latent], dim=1)
        self.add_presents(latent)
        return latent


def cache_io(c: LanguageConfig, layers: range | None = None) -> tuple[list[str], list[str], dict]:
    """Past input names, present output names (of `layers`, default all), and the past tensors' layout for
    the manifest."""
    kinds: tuple[str, ...]
    if c.use_mla:
        assert c.kv_lora_rank is not None  # LanguageConfig requires it with MLA
        kinds, axis, shape = ("latent",), 1, ["batch", "past", c.kv_lora_rank + c.qk_rope_head_dim]
    else:
        kinds, axis, shape = ("key", "value"), 2, ["batch", c.num_key_value_heads, "past", c.head_dim]
    layers = range(c.num_hidden_layers) if layers is None else layers
    past = [f"past_key_values.{i}.{k}" for i in layers for k in kinds]
    present = [f"present.{i}.{k}" for i in layers for k in kinds]
    return past, present, {"kinds": list(kinds), "sequence_axis": axis, "shape": shape}


def zero_pasts(c: LanguageConfig, batch: int, past: int, layers: range | None = None) -> list[torch.Tensor]:
    """Float32 zero past tensors in `cache_io`'s layout: `past` positions for `batch` rows each."""
    names, _, layout = cache_io(c, layers)
    shape = [batch, *layout["shape"][1:]]
    shape[layout["sequence_axis"]] = past
    return [torch.zeros(shape, dtype=torch.float32) for _ in names]


def _trace(module: nn.Module, args: tuple, path: Path, input_names, output_names, dynamic_axes,
           contrib: bool = True) -> None:
    """torch.onnx.export (TorchScript tracer: the contrib-op symbolics in export/ops.py) into `path`."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), dynamo=False, opset_version=OPSET, input_names=input_names,
                          output_names=output_names, dynamic_axes=dynamic_axes, do_constant_folding=True,
                          custom_opsets={"com.microsoft": MS_OPSET} if contrib else None)


def _export(module: nn.Module, args: tuple, out: Path, input_names, output_names, dynamic_axes,
            contrib: bool = True) -> Path:
    """torch.onnx.export (TorchScript tracer: the contrib-op symbolics in export/ops.py) + external data."""
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "graph.onnx"
        _trace(module, args, path, input_names, output_names, dynamic_axes, contrib)
        proto = onnx.load(str(path))
    for f in (out, out.with_name(out.name + ".data")):
        f.unlink(missing_ok=True)
    big = sum(t.ByteSize() for t in proto.graph.initializer) > EXTERNAL_MIN
    onnx.save_model(proto, str(out), save_as_external_data=big, all_tensors_to_one_file=True,
                    location=out.name + ".data", size_threshold=1024)
    return out


def one_data_file(out: Path) -> None:
    """Rewrite a quantizer's output so its external data is the one `<file>.data` every graph here uses."""
    import onnx

    if not any(out.parent.glob(out.name + "*.data")):
        return
    proto = onnx.load(str(out))
    for f in out.parent.glob(out.name + "*.data"):
        f.unlink()
    onnx.save_model(proto, str(out), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=out.name + ".data", size_threshold=1024)


@contextlib.contextmanager
def quiet_quantizer():
    """The onnxruntime quantizers log advice (pre-processing, calibration) through the root logger and warn;
    silence both while they run."""
    root_logger = logging.getLogger()
    level = root_logger.level
    root_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root_logger.setLevel(level)


def quantize_vision_dynamic(src: Path, out: Path) -> dict:
    """The vision graph with int8 weights (per output channel) and activations quantized per tensor at run
    time (onnxruntime.quantization.quantize_dynamic on the weight MatMuls: DynamicQuantizeMatMul). The
    export's int8 graph was this until the static scheme (export/vision_int8.py) replaced it; kept for
    bench/vision_int8.py's comparison."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = onnx.load(str(src), load_external_data=False)
    inits = {i.name for i in graph.graph.initializer}
    nodes = [n.name for n in graph.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    big = (src.with_name(src.name + ".data")).is_file()
    for f in (out, out.with_name(out.name + ".data")):
        f.unlink(missing_ok=True)
    with quiet_quantizer():
        quantize_dynamic(str(src), str(out), weight_type=QuantType.QInt8, per_channel=True,
                         nodes_to_quantize=nodes, op_types_to_quantize=["MatMul"], use_external_data_format=big)
    one_data_file(out)
    return {"file": out.name, "inputs": ["pixel_values"], "outputs": ["image_features"],
            "scheme": "int8 weights per output channel, activations quantized per tensor at run time "
                      f"(DynamicQuantizeMatMul), {len(nodes)} MatMuls"}


def trace_piece(module: nn.Module, args: tuple, tmp: Path, name: str, inputs: list[str], outputs: list[str],
                dyn: dict):
    """Trace one piece of a graph into the folder `tmp` and load it back with its weights: (ModelProto, path).
    The tracer's file is used as written (weights inside it, or beside it past 2 GB): re-saving it with
    external data would hold a second copy of the piece's weights (a Base MoE layer: ~0.5 GB)."""
    import onnx

    path = tmp / f"{name}.onnx"
    _trace(module, args, path, inputs, outputs, {k: v for k, v in dyn.items() if k in inputs + outputs})
    return onnx.load(str(path)), path


class VisionFront(nn.Module):
    """Pixels -> patch embeddings + positions [n, N, W]: the vision graph's first piece."""

    def __init__(self, tower: VisionTower):
        super().__init__()
        self.patch_embed, self.pos_embed = tower.patch_embed, tower.pos_embed

    def forward(self, pixel_values):
        return self.patch_embed(pixel_values) + self.pos_embed


class VisionTail(nn.Module):
    """The final LayerNorm and the projector [n, N, W] -> [n, 196, D]: the vision graph's last piece."""

    def __init__(self, tower: VisionTower, projector: nn.Module):
        super().__init__()
        self.norm, self.projector = tower.norm, projector

    def forward(self, hidden):
        return self.projector(self.norm(hidden))


def export_vision(model: VL2Model, out: Path, graph: nn.Module | None = None) -> dict:
    """The vision tower + projector in plain ONNX ops, traced a block at a time and spliced (so the tracer
    never holds a copy of the whole tower), or `graph` traced whole (a module computing the same, e.g.
    export/vision_int8.py's, which may emit contrib ops)."""
    S = model.config.vision_config.image_size
    io = {"file": out.name, "inputs": ["pixel_values"], "outputs": ["image_features"]}
    if graph is not None:
        _export(graph, (torch.randn(2, 3, S, S),), out, ["pixel_values"], ["image_features"],
                {"pixel_values": {0: "tiles"}, "image_features": {0: "tiles"}}, contrib=True)
        return io
    from .splice import GraphWriter

    tower = model.vision
    dyn = {"pixel_values": {0: "tiles"}, "hidden": {0: "tiles"}, "hidden_out": {0: "tiles"},
           "image_features": {0: "tiles"}}
    writer = GraphWriter(out, {"": OPSET})
    L, N, W = len(tower.blocks), tower.config.grid ** 2, tower.config.width
    pieces = [(VisionFront(tower), torch.randn(2, 3, S, S), "pixel_values", "hidden", "pixel_values", "hidden.0"),
              *((b, torch.randn(2, N, W), "hidden", "hidden_out", f"hidden.{i}", f"hidden.{i + 1}")
                for i, b in enumerate(tower.blocks)),
              (VisionTail(tower, model.projector), torch.randn(2, N, W), "hidden", "image_features", f"hidden.{L}",
               "image_features")]
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".vision-pieces-") as tmp:
        for k, (module, arg, src, dst, outer_src, outer_dst) in enumerate(pieces):
            proto, path = trace_piece(module, (arg,), Path(tmp), f"piece{k}", [src], [dst], dyn)
            writer.add(proto, f"vision.{k}/", {src: outer_src, dst: outer_dst},
                       inputs=("pixel_values",), outputs=("image_features",))
            path.unlink()
    writer.close(["pixel_values"], ["image_features"])
    return io
