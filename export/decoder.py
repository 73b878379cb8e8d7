"""The decoder graph, exported a layer at a time from the checkpoint (the streaming export).

The float model never sits in memory: for each layer, a `DecoderLayer` is built on the meta device and
given that layer's tensors from the memory-mapped checkpoint (quantized on the way, per the recipe),

    1. run in torch on the verification sample (the hidden states the previous layer produced), which
       gives the next layer its input and this layer its reference;
    2. swapped for its export twins (export/ops.py) and traced alone (`LayerGraph`);
    3. run by onnxruntime on the same hidden states and compared with (1): the layer-by-layer check;
    4. spliced into the whole graph, its weights appended to decoder.onnx.data (export/splice.py),

and freed. The mask arithmetic every layer shares (`HeadGraph`) and the final norm + lm_head
(`TailGraph`) are pieces of their own, so the peak is the largest layer's weights, whatever the depth.
The whole graph's inputs, outputs and ops are the ones the whole-model trace made (export/graphs.py):

    decoder: inputs_embeds f32 [B,T,D], attention_mask i64 [B,P+T], past_key_values.{i}.key/.value
             (or .latent) -> logits f32 [B,V], present.{i}.key/.value (or .latent) [, routing.{i}]

The sample runs as a chunked prefill (P = 0, then P > 0) and two decode steps: every cache path.
Dimension legend: B batch, T new positions, P past positions, D hidden, V vocabulary.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from torch import nn

from vl2edge.config import LanguageConfig
from vl2edge.models.cache import KVCache
from vl2edge.models.language import DecoderLayer, RMSNorm
from vl2edge.models.loading import load_part
from vl2edge.quant.format import QuantSpec, dequantize
from vl2edge.quant.modules import QLinear
from vl2edge.weights import Checkpoint

from .graphs import MS_OPSET, OPSET, GraphCache, cache_io, trace_piece, zero_pasts
from .ops import ExportLinear, ExportMHA, ExportMoE, Kernels, prepare, qmoe_ok
from .splice import GraphWriter

MASK_NAMES = ["positions", "allowed", "seqlens_k", "total"]
Piece = TypeVar("Piece", bound=nn.Module)


class HeadGraph(nn.Module):
    """The attention inputs every layer shares, from the mask: RoPE positions and the boolean mask (MLA,
    plain attention), GroupQueryAttention's seqlens_k and total length."""

    def forward(self, inputs_embeds, attention_mask):
        cache = GraphCache([])
        positions, allowed = cache.begin(attention_mask, inputs_embeds.shape[1])
        return positions, allowed, cache.seqlens_k, cache.total


class LayerGraph(nn.Module):
    """One decoder layer: hidden states and its pasts in, hidden states and its presents out (with
    `routing`, also its top-k expert choice [B*T, A] when it is an MoE layer)."""

    def __init__(self, layer: DecoderLayer, index: int, routing: bool):
        super().__init__()
        self.layer, self.index = layer, index
        self.moe = layer.mlp if routing and isinstance(layer.mlp, ExportMoE) else None

    def forward(self, hidden, positions, allowed, seqlens_k, total, *pasts):
        cache = GraphCache(pasts, self.index)
        cache.resume(seqlens_k, total)
        records: list[torch.Tensor] = []
        hook = None if self.moe is None else \
            self.moe.register_forward_hook(lambda mod, args, out: records.append(mod.routing(args[0])))
        try:
            hidden = self.layer(hidden, positions, allowed, cache)
        finally:
            if hook is not None:
                hook.remove()
        return (hidden, *cache.presents, *records)


class FinalNorm(nn.Module):
    """`language.model.norm` (named as the checkpoint names it below `language.`)."""

    def __init__(self, c: LanguageConfig):
        super().__init__()
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)


class TailGraph(nn.Module):
    """The last position's hidden state -> final norm -> lm_head -> float32 logits [B, V]."""

    def __init__(self, c: LanguageConfig):
        super().__init__()
        self.model = FinalNorm(c)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)

    def forward(self, hidden):
        return self.lm_head(self.model.norm(hidden[:, -1])).float()

    @torch.inference_mode()
    def reference(self, hidden: list[torch.Tensor], rows: int = 1 << 14) -> list[np.ndarray]:
        """What `forward` gives for each of these hidden states [1, T, D] ([1, V] each), the head applied
        `rows` vocabulary rows at a time: a packed head dequantized whole to float32 (Tiny: 662 MB, with
        temporaries) was the streaming export's largest transient."""
        x = self.model.norm(torch.cat([h[:, -1] for h in hidden]))          # [S, D], S segments
        head, parts = self.lm_head, []
        for r in range(0, head.out_features, rows):
            if isinstance(head, QLinear):
                p = {k: t[r:r + rows] for k, t in head.packed().items()}
                w = dequantize(head.spec, p["qweight"], p["scales"], p.get("qzeros"), K=head.in_features)
            else:
                w = head.weight[r:r + rows]
            parts.append(x @ w.T)                                               # [S, rows]
        logits = torch.cat(parts, -1).float()
        if head.bias is not None:
            logits += head.bias.float()
        return [row[None].numpy() for row in logits]


@dataclass
class Sample:
    """The verification sample as the decoder sees it: segments of embeddings [1, T, D], each with the
    attention mask over all positions so far [1, P+T] (a chunked prefill, then single decode tokens)."""

    segments: list[np.ndarray]

    @classmethod
    def of(cls, embeds: np.ndarray, chunk: int, decode_embeds: list[np.ndarray]) -> Sample:
        return cls([embeds[:, :chunk], embeds[:, chunk:], *decode_embeds])

    def masks(self) -> list[np.ndarray]:
        ends = np.cumsum([s.shape[1] for s in self.segments])
        return [np.ones((1, int(e)), np.int64) for e in ends]


@dataclass
class DecoderReport:
    """What the export learnt on the way: the manifest's graph entry and the layer-by-layer check."""

    graph: dict
    layers: list[dict] = field(default_factory=list)
    logits: list[np.ndarray] = field(default_factory=list)   # the torch reference, per segment [1, V]
    tail: dict = field(default_factory=dict)
    qmoe: bool = False
    moe: bool = False
    linears_8bit: bool = False
    data_bytes: int = 0


def check_session(path: Path, threads: int, prepack: bool = True):
    """An onnxruntime CPU session for the export's checks. prepack=False: no prepacked copy of the weights
    (a 1.7 GB float vision tower's copy would set the export's peak; the results differ by rounding only)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if not prepack:
        opts.add_session_config_entry("session.disable_prepacking", "1")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def errors(got: np.ndarray, ref: np.ndarray) -> dict:
    diff = float(np.abs(got - ref).max())
    return {"max_abs": diff, "max_abs_rel": diff / float(np.abs(ref).max()),
            "rel_l2": float(np.linalg.norm(got - ref) / np.linalg.norm(ref))}


def export_decoder_streaming(ck: Checkpoint, lc: LanguageConfig, specs: dict[str, QuantSpec], kernels: Kernels,
                             plain: bool, out: Path, sample: Sample, routing: bool = False, threads: int = 0,
                             progress=None) -> DecoderReport:
    """Write decoder.onnx(.data) to `out` from the checkpoint, a layer at a time; verify each layer."""
    L, D = lc.num_hidden_layers, lc.hidden_size
    past_names, present_names, layout = cache_io(lc)
    axis = layout["sequence_axis"]
    dyn = {"inputs_embeds": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "total"},
           "hidden": {0: "batch", 1: "sequence"}, "hidden_out": {0: "batch", 1: "sequence"},
           "positions": {0: "batch", 1: "sequence"}, "allowed": {0: "batch", 2: "sequence", 3: "total"},
           "seqlens_k": {0: "batch"}, "logits": {0: "batch"}} \
        | {n: {0: "batch", axis: "past"} for n in past_names} \
        | {n: {0: "batch", axis: "total"} for n in present_names} \
        | {f"routing.{i}": {0: "tokens"} for i in range(L)}
    writer = GraphWriter(out, {"": OPSET, "com.microsoft": MS_OPSET})
    report = DecoderReport(graph={})
    shared_buffer = False  # GroupQueryAttention can update a preallocated cache in place
    masks = sample.masks()
    B, T, P = 2, 3, 2  # trace sizes > 1 so the tracer keeps every axis symbolic
    trace_mask = torch.ones(B, P + T, dtype=torch.int64)
    trace_attn = HeadGraph()(torch.zeros(B, T, D), trace_mask)
    routing_names: list[str] = []
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".decoder-pieces-") as tmp_name:
        tmp = Path(tmp_name)
        proto, path = trace_piece(HeadGraph(), (torch.zeros(B, T, D), trace_mask), tmp, "head",
                             ["inputs_embeds", "attention_mask"], MASK_NAMES, dyn)
        writer.add(proto, "head/", {n: n for n in ["inputs_embeds", "attention_mask", *MASK_NAMES]},
                   inputs=("inputs_embeds", "attention_mask"))
        head = check_session(path, threads)
        attn = [dict(zip(MASK_NAMES, head.run(None, {"inputs_embeds": s.astype(np.float32), "attention_mask": m})))
                for s, m in zip(sample.segments, masks)]
        del head, proto
        hidden = [torch.from_numpy(s.astype(np.float32)) for s in sample.segments]
        for i in range(L):
            if progress:
                progress(f"decoder layer {i + 1}/{L}")
            layer = load_part(ck, on_meta(DecoderLayer, lc, i), f"language.model.layers.{i}.", specs)
            ref = _run_layer(layer, lc, hidden, masks)
            prepare(layer, lc, kernels, plain=plain)
            report.moe |= isinstance(layer.mlp, ExportMoE)
            report.qmoe |= isinstance(layer.mlp, ExportMoE) and qmoe_ok(layer.mlp.experts)
            report.linears_8bit |= any(isinstance(m, ExportLinear) and m.int8 for m in layer.modules())
            shared_buffer = any(isinstance(m, ExportMHA) for m in layer.modules())
            mine_past, mine_present, _ = cache_io(lc, range(i, i + 1))
            rout = [f"routing.{i}"] if routing and isinstance(layer.mlp, ExportMoE) else []
            routing_names += rout
            pasts = zero_pasts(lc, B, P, range(i, i + 1))
            proto, path = trace_piece(LayerGraph(layer, i, routing), (torch.randn(B, T, D), *trace_attn, *pasts), tmp,
                                 f"layer{i}", ["hidden", *MASK_NAMES, *mine_past],
                                 ["hidden_out", *mine_present, *rout], dyn)
            del layer
            writer.add(proto, f"layers.{i}/", {"hidden": f"hidden.{i}" if i else "inputs_embeds",
                                              "hidden_out": f"hidden.{i + 1}"}
                       | {n: n for n in [*MASK_NAMES, *mine_past, *mine_present, *rout]},
                       inputs=tuple(mine_past), outputs=(*mine_present, *rout))
            del proto  # spliced: its weights are on disk, and only onnxruntime's copy is held from here
            got = _run_layer_onnx(check_session(path, threads), hidden, attn, mine_past, mine_present, layout)
            report.layers.append({"layer": i, **errors(np.concatenate(got, 1), np.concatenate(ref, 1))})
            path.unlink()
            hidden = [torch.from_numpy(h) for h in ref]
        if progress:
            progress("decoder head")
        tail = load_part(ck, on_meta(TailGraph, lc), "language.", specs, only=("language.model.norm.",
                                                                                   "language.lm_head."))
        report.logits = tail.reference(hidden)
        prepare(tail, lc, kernels, plain=plain)
        proto, path = trace_piece(tail, (torch.randn(B, T, D),), tmp, "tail", ["hidden"], ["logits"], dyn)
        del tail
        writer.add(proto, "head_out/", {"hidden": f"hidden.{L}", "logits": "logits"}, outputs=("logits",))
        del proto
        session = check_session(path, threads)
        got = [session.run(None, {"hidden": h.numpy()})[0] for h in hidden]
        del session
        report.tail = errors(np.concatenate(got), np.concatenate(report.logits))
    inputs = ["inputs_embeds", "attention_mask", *past_names]
    outputs = ["logits", *present_names, *routing_names]
    report.data_bytes = writer.close(inputs, outputs)
    report.graph = {"file": out.name, "inputs": inputs, "outputs": outputs, "past": past_names,
                    "present": present_names, "cache": layout | {"shared_buffer": shared_buffer}}
    return report


def on_meta(cls: type[Piece], *args) -> Piece:
    """`cls(*args)` on the meta device: the module's structure, no memory (load_part gives it its weights)."""
    with torch.device("meta"):
        return cls(*args)


def _run_layer(layer: DecoderLayer, lc: LanguageConfig, hidden: list[torch.Tensor],
               masks: list[np.ndarray]) -> list[np.ndarray]:
    """The layer in torch over the sample's segments (its own cache): its output hidden states."""
    cache = KVCache(lc, 1, masks[-1].shape[1], torch.float32)
    out = []
    with torch.inference_mode():
        for h, m in zip(hidden, masks):
            T = h.shape[1]
            positions, mask = cache.begin(torch.from_numpy(m[:, -T:]).bool(), T)
            out.append(layer(h, positions, mask, cache).numpy())
            cache.commit(T)
    return out


def _run_layer_onnx(session, hidden: list[torch.Tensor], attn: list[dict], past: list[str], present: list[str],
                    layout: dict) -> list[np.ndarray]:
    """The layer's graph over the same segments, each fed the previous one's presents."""
    wanted = {i.name for i in session.get_inputs()}
    shape = [1, *layout["shape"][1:]]
    shape[layout["sequence_axis"]] = 0
    pasts = {n: np.zeros(shape, np.float32) for n in past}
    out = []
    for h, a in zip(hidden, attn):
        feed = {"hidden": h.numpy()} | a | pasts
        res = session.run(None, {k: v for k, v in feed.items() if k in wanted})
        out.append(res[0])
        pasts = dict(zip(past, res[1:1 + len(present)]))
    return out
