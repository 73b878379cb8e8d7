"""One quantize-and-export command: a checkpoint in, a self-describing ONNX artifact directory out.

    DST/
      manifest.json            dims, graphs and their I/O names, recipe per tensor, opset/IR, minimum
                               onnxruntime, verification errors, sha256 of every file, source
      decoder.onnx(.data)      the decoder step (export/graphs.py), contrib ops per export/ops.py
      vision.onnx(.data)       vision tower + projector in float32
      vision_int8.onnx(.data)  the same with statically quantized GEMMs (QDQ u8s8, export/vision_int8.py); the
                               manifest's default_vision when its features pass the gate on the verification
                               sample (rel-L2 <= 1 % against vision.onnx), else float with the reason
      embed_tokens.npy, image_newline.npy, view_seperator.npy   the float tensors the runtime gathers
      config.json, processor_config.json, tokenizer*.json, special_tokens_map.json
"""

from __future__ import annotations

import gc
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from vl2edge.artifact import FORMAT, MANIFEST, sha256
from vl2edge.config import VL2Config
from vl2edge.errors import InputError
from vl2edge.generate import prefill
from vl2edge.hub import resolve
from vl2edge.models.loading import load_model
from vl2edge.models.model import VL2Model
from vl2edge.outputs import OutputDir
from vl2edge.processor import Processor
from vl2edge.quant.recipes import EXPORT_RECIPES, Recipe, export_block_size, read_manifest
from vl2edge.synthetic import sample_image
from vl2edge.weights import SIDE_FILES

from .graphs import MS_OPSET, OPSET, export_decoder, export_vision
from .ops import ExportLinear, ExportMoE, Kernels, prepare, qmoe_ok
from .vision_int8 import calibration_images, calibration_tiles, export_vision_int8, feature_gate


def _sample_inputs(proc: Processor):
    """A real prompt (one image, tiled) through the processor: what the verification feeds both sides (its
    picture size is not among the int8 vision graph's calibration pictures)."""
    return proc([{"role": "user", "content": "<image>\nDescribe this image in detail."}],
                [sample_image(400, 300)])


def _reference(model: VL2Model, inputs) -> dict:
    """Torch outputs on the sample: vision features, and logits of a chunked prefill and two decode steps."""
    with torch.inference_mode():
        feats = model.encode_tiles(torch.from_numpy(inputs.images[0])).float().numpy()
    embeds = model.embed(inputs.input_ids, inputs.images, inputs.images_seq_mask, inputs.images_spatial_crop)
    T = embeds.shape[1]
    cache = model.new_cache(1, T + 2)
    steps = [prefill(model, embeds, inputs.attention_mask, cache, chunk_size=T - 7)]
    steps += [model.decode(np.array([t]), cache) for t in (5, 9)]
    return {"features": feats, "embeds": embeds.float().numpy(), "steps": steps, "chunk": T - 7}


def _verify(dst: Path, graphs: dict, ref: dict, inputs, threads: int = 0) -> dict:
    """Run the exported graphs with onnxruntime on the sample and compare with the torch reference."""
    from vl2edge.onnx_backend import OnnxModel

    model = OnnxModel(dst, threads=threads, cache_sessions=False)  # no optimized-graph cache for a temporary
    out: dict = {}
    feats = {name: model.vision_session(name).run(None, {"pixel_values": inputs.images[0]})[0]
             for name in graphs if name.startswith("vision")}
    for name, got in feats.items():
        out[name] = _errors(got, ref["features"])
    if "vision_int8" in feats:  # the gate: against the float graph (the torch features where it was not kept)
        out["vision_int8_gate"] = feature_gate(feats["vision_int8"], feats.get("vision", ref["features"]))
    cache = model.new_cache(1, ref["embeds"].shape[1] + 2)
    got = [prefill(model, ref["embeds"], inputs.attention_mask, cache, chunk_size=ref["chunk"])]
    got += [model.decode(np.array([t]), cache) for t in (5, 9)]
    out["decoder"] = _errors(np.concatenate(got), np.concatenate(ref["steps"]))
    return out


def _choose_vision(manifest: dict) -> None:
    """The int8 vision graph becomes the default when it passed the gate on the verification sample; the
    gate's numbers go into its graph entry, and the reason for the choice into `default_vision_reason`."""
    gate = manifest["verification"].pop("vision_int8_gate", None)
    if gate is None:
        return
    manifest["graphs"]["vision_int8"]["gate"] = gate
    err = f"features rel-L2 {gate['features_rel_l2']:.4f} against the float graph on the verification sample"
    if "vision" not in manifest["graphs"]:
        manifest["default_vision"] = "vision_int8"
        manifest["default_vision_reason"] = f"the only vision graph exported ({err})"
    elif gate["passed"]:
        manifest["default_vision"] = "vision_int8"
        manifest["default_vision_reason"] = f"int8 passed the gate: {err} <= {gate['limit']}"
    else:
        manifest["default_vision"] = "vision"
        manifest["default_vision_reason"] = f"int8 failed the gate: {err} > {gate['limit']}; float kept"


def _errors(got: np.ndarray, ref: np.ndarray) -> dict:
    diff = float(np.abs(got - ref).max())
    return {"max_abs": diff, "max_abs_rel": diff / float(np.abs(ref).max()),
            "rel_l2": float(np.linalg.norm(got - ref) / np.linalg.norm(ref))}


def export(src, dst, recipe: str = "int4-experts", block_size: int | None = None, vision: str = "both",
           accuracy_level: int = 4, routing_outputs: bool = False, progress: bool = True,
           overwrite: bool = False, calibration=None, int8_matmul: bool = True) -> Path:
    """Quantize (per `recipe`), export and verify into the new directory `dst` (written under a temporary
    name and renamed into place when complete; refused if it holds files, unless `overwrite`).
    vision: "float", "int8" or "both" (quantized recipes). calibration: a folder of pictures like the ones
    the model will see, added to the int8 vision graph's calibration set (synthetic pictures by default).
    block_size: None = export_block_size (64 where the widths allow, else 32).
    int8_matmul: the decoder's 8-bit linears as int8 rows through MatMulInteger (export/ops.py; False:
    MatMulNBits, slower on long prefills)."""
    if recipe not in EXPORT_RECIPES:
        raise InputError(f"unknown recipe {recipe!r}; known: {', '.join(EXPORT_RECIPES)}")
    if vision not in ("float", "int8", "both"):
        raise InputError(f"vision must be float, int8 or both, got {vision!r}")
    if calibration is not None and not Path(calibration).is_dir():
        raise InputError(f"calibration images: {calibration} is not a folder")
    pictures = calibration_images(calibration)
    src, dst = resolve(src), Path(dst)
    if read_manifest(src) is not None:
        raise InputError(f"{src} is already quantized; export from the float checkpoint")
    with OutputDir(dst, overwrite, sources=(src,)) as out:
        _build(src, out, recipe, block_size, vision, Kernels(accuracy_level, int8_matmul), routing_outputs,
               progress, pictures)
    return dst


def _build(src: Path, out: Path, recipe: str, block_size: int | None, vision: str, kernels: Kernels,
           routing_outputs: bool, progress: bool, pictures: list) -> None:
    """Everything `export` writes, into `out`."""
    steps = ["load", "vision", "vision_int8", "decoder", "verify", "write"]
    if recipe == "float32" or vision == "float":
        steps.remove("vision_int8")
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(steps), desc=f"export ({recipe})", bar_format="{desc}: {n}/{total} {postfix} [{elapsed}]")

    def step(name):
        if bar:
            bar.set_postfix_str(name)

    def done():
        if bar:
            bar.update(1)

    t0 = time.perf_counter()
    step("load + quantize")
    if block_size is None:
        lc = VL2Config.from_pretrained(src).language_config
        block_size = export_block_size(lc.hidden_size, lc.expert_width)
    quant = None if recipe == "float32" else Recipe(recipe, block_size=block_size)
    model = load_model(src, dtype="float32", device="cpu", quant=quant, kernel="dequant").model
    config: VL2Config = model.config
    proc = Processor.from_pretrained(src)
    inputs = _sample_inputs(proc)
    ref = _reference(model, inputs)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "embed_tokens.npy", model.language.model.embed_tokens.weight.detach().float().numpy())
    np.save(out / "image_newline.npy", model.image_newline.detach().float().numpy())
    np.save(out / "view_seperator.npy", model.view_seperator.detach().float().numpy())
    specs = {}
    if quant is not None:
        specs = {n: s.to_dict() for n, s in quant.specs(config.tensor_shapes()).items()}
    done()
    prepare(model, kernels, plain=quant is None)
    graphs = {}
    step("vision tower (float32)")
    graphs["vision"] = export_vision(model, out / "vision.onnx")
    done()
    if vision in ("int8", "both") and quant is not None:
        step("vision tower (int8: smoothing, calibration)")
        tiles = calibration_tiles(proc, pictures)
        graphs["vision_int8"] = export_vision_int8(model, out / "vision_int8.onnx", tiles)
        specs |= {n: {"bits": 8, "graph": "vision_int8", "scheme": graphs["vision_int8"]["scheme"]}
                  for n in graphs["vision_int8"].pop("int8_weights")}
        if vision == "int8":
            for f in (out / "vision.onnx", out / "vision.onnx.data"):
                f.unlink(missing_ok=True)
            del graphs["vision"]
        done()
    step("decoder")
    graphs["decoder"] = export_decoder(model, out / "decoder.onnx", routing=routing_outputs)
    if any(isinstance(m, ExportLinear) and m.int8 for m in model.modules()):
        graphs["decoder"]["linears_8bit"] = ("int8 weights per output row (re-laid from the 8-bit blocks), "
                                             "activations quantized per token at run time, MatMulInteger u8s8")
    done()
    for name in SIDE_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
    moes = [m for m in model.modules() if isinstance(m, ExportMoE)]
    uses_qmoe = any(qmoe_ok(m.experts) for m in moes)
    has_moe = bool(moes)
    del model, moes  # the torch model is not needed any more: onnxruntime's sessions take its memory next
    gc.collect()
    manifest = {
        "format": FORMAT, "source": str(src),
        "recipe": recipe if quant is None else quant.to_dict() | {"label": recipe},
        "accuracy_level": kernels.accuracy_level, "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "dims": {"hidden_size": config.language_config.hidden_size, "vocab_size": config.language_config.vocab_size,
                 "num_hidden_layers": config.language_config.num_hidden_layers,
                 "attention": "mla" if config.language_config.use_mla else "mha",
                 "image_size": config.vision_config.image_size, "tokens_per_side": config.tokens_per_side},
        "graphs": graphs, "default_vision": "vision" if "vision" in graphs else "vision_int8",
        "tensors": {"embed_tokens": "embed_tokens.npy", "image_newline": "image_newline.npy",
                    "view_seperator": "view_seperator.npy"},
        "quantization": specs, "moe": "QMoE" if uses_qmoe else ("masked-loop" if has_moe else "none"),
        "opset": {"ai.onnx": OPSET, "com.microsoft": MS_OPSET}, "ir_version": 8,
        "min_onnxruntime": "1.25.0" if uses_qmoe else ("1.22.0" if specs else "1.17.0"),
        "recommended_onnxruntime": "1.31.0",
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    step("verify with onnxruntime")
    manifest["verification"] = _verify(out, graphs, ref, inputs)
    _choose_vision(manifest)
    done()
    step("checksums")
    files = sorted(p for p in out.iterdir() if p.name != MANIFEST)
    manifest["files"] = {p.name: sha256(p) for p in files}
    manifest["sizes"] = {p.name: p.stat().st_size for p in files}
    manifest["export_seconds"] = round(time.perf_counter() - t0, 1)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    done()
    if bar:
        bar.close()
