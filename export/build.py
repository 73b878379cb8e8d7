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

import contextlib
import ctypes
import gc
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vl2edge.artifact import FORMAT, MANIFEST, seal, sha256
from vl2edge.config import VL2Config
from vl2edge.cpu_features import u8s8_exact
from vl2edge.errors import InputError
from vl2edge.fits import check
from vl2edge.generate import prefill
from vl2edge.hub import config_dir, resolve
from vl2edge.models.loading import load_part, open_checked
from vl2edge.models.model import VL2Model
from vl2edge.outputs import OutputDir
from vl2edge.processor import Processor
from vl2edge.quant.recipes import EXPORT_RECIPES, Recipe, export_block_size, read_manifest
from vl2edge.synthetic import sample_image
from vl2edge.weights import SIDE_FILES

from .decoder import Sample, check_session, errors, export_decoder_streaming, on_meta
from .graphs import MS_OPSET, OPSET, export_vision
from .ops import Kernels
from .vision_int8 import bf16_features, calibration_images, calibration_tiles, export_vision_int8, feature_gate

SAMPLE_TOKENS = (5, 9)   # the verification's two decode steps after the sample prompt
END_TO_END_MAX = 2**30   # decoder weights (bytes) up to which the export also runs the whole graph on the sample


def _sample_inputs(proc: Processor):
    """A real prompt (one image, tiled) through the processor: what the verification feeds both sides (its
    picture size is not among the int8 vision graph's calibration pictures)."""
    return proc([{"role": "user", "content": "<image>\nDescribe this image in detail."}],
                [sample_image(400, 300)])


def _front(ck, config: VL2Config, specs: dict) -> VL2Model:
    """The model's front alone (vision tower, projector, the two separator rows), its language model left on
    the meta device: what the vision export and the sample's image rows need."""
    front = on_meta(VL2Model, config)
    for prefix, part in (("vision.", front.vision), ("projector.", front.projector)):
        load_part(ck, part, prefix, specs)
    front.load_state_dict({n: ck.torch(n, dtype=torch.float32) for n in ("image_newline", "view_seperator")},
                          strict=False, assign=True)
    return front


def _embeddings(ck, config: VL2Config, inputs, image_rows: torch.Tensor, out: Path):
    """The sample's input embeddings [1, T, D] (the image rows scattered where `images_seq_mask` says, as
    VL2Model.embed does) and the decode steps' [1, 1, D]; writes embed_tokens.npy. Loaded after the vision
    tower is gone, so the two are never in memory together."""
    lc = config.language_config
    table = load_part(ck, on_meta(nn.Embedding, lc.vocab_size, lc.hidden_size), "language.model.embed_tokens.", {})
    with torch.inference_mode():
        embeds = table(torch.from_numpy(np.asarray(inputs.input_ids, dtype=np.int64)))
        embeds[torch.from_numpy(np.asarray(inputs.images_seq_mask, dtype=bool))] = image_rows
        decode = [table(torch.tensor([[t]])).numpy() for t in SAMPLE_TOKENS]
    _save_npy(out / "embed_tokens.npy", table.weight)
    return embeds.numpy(), decode


def _verify_vision(dst: Path, graphs: dict, features: np.ndarray, tiles: np.ndarray, threads: int,
                   bf16: np.ndarray | None = None) -> dict:
    """Each vision graph's features on the sample's tiles against the torch tower's, and the int8 gate (its
    limit set by `bf16`, the tiles' features at the reference's precision, where given)."""
    feats = {name: check_session(dst / g["file"], threads, prepack=False).run(None, {"pixel_values": tiles})[0]
             for name, g in graphs.items() if name.startswith("vision")}
    out: dict = {name: errors(got, features) for name, got in feats.items()}
    if "vision_int8" in feats:  # the gate: against the float graph (the torch features where it was not kept)
        out["vision_int8_gate"] = feature_gate(feats["vision_int8"], feats.get("vision", features), bf16)
    return out


def _verify_decoder(dst: Path, sample: Sample, attention_mask: np.ndarray, logits: list[np.ndarray],
                    threads: int) -> dict:
    """The whole decoder graph on onnxruntime, driven as the runtime drives it (chunked prefill, two decode
    steps), against the torch logits of the same three steps."""
    from vl2edge.onnx_backend import OnnxModel

    model = OnnxModel(dst, threads=threads, cache_sessions=False)  # no optimized-graph cache for a temporary
    embeds = np.concatenate(sample.segments[:2], 1)
    cache = model.new_cache(1, embeds.shape[1] + 2)
    got = [prefill(model, embeds, attention_mask, cache, chunk_size=sample.segments[0].shape[1])]
    got += [model.decode(np.array([t]), cache) for t in SAMPLE_TOKENS]
    return errors(np.concatenate(got), np.concatenate(logits))


def _choose_vision(manifest: dict) -> None:
    """The int8 vision graph becomes the default when it passed the gate on the verification sample; the
    gate's numbers go into its graph entry, and the reason for the choice into `default_vision_reason`."""
    gate = manifest["verification"].pop("vision_int8_gate", None)
    if gate is None:
        return
    manifest["graphs"]["vision_int8"]["gate"] = gate
    err = f"features rel-L2 {gate['features_rel_l2']:.4f} against the float graph on the verification sample"
    limit = f"{gate['limit']:.4f}" + (f" (bfloat16, the reference's precision: {gate['bf16_rel_l2']:.4f})"
                                      if "bf16_rel_l2" in gate else "")
    if "vision" not in manifest["graphs"]:
        manifest["default_vision"] = "vision_int8"
        manifest["default_vision_reason"] = f"the only vision graph exported ({err})"
    elif gate["passed"]:
        manifest["default_vision"] = "vision_int8"
        manifest["default_vision_reason"] = f"int8 passed the gate: {err} <= {limit}"
    else:
        manifest["default_vision"] = "vision"
        manifest["default_vision_reason"] = f"int8 failed the gate: {err} > {limit}; float kept"


def export(src, dst, recipe: str = "int4-experts", block_size: int | None = None, vision: str = "auto",
           accuracy_level: int = 4, routing_outputs: bool = False, progress: bool = True,
           overwrite: bool = False, calibration=None, int8_matmul: bool = True, force: bool = False) -> Path:
    """Quantize (per `recipe`), export and verify into the new directory `dst` (written under a temporary
    name and renamed into place when complete; refused if it holds files, unless `overwrite`).
    vision: "float", "int8", "both" (quantized recipes), or "auto": both where this CPU's u8s8 kernel is exact,
    else float alone (`u8s8_exact`: there the int8 graph misses its gate, and its search costs minutes and
    gigabytes). calibration: a folder of pictures like the ones
    the model will see, added to the int8 vision graph's calibration set (synthetic pictures by default).
    block_size: None = export_block_size (64 where the widths allow, else 32).
    int8_matmul: the decoder's 8-bit linears as int8 rows through MatMulInteger (export/ops.py; False:
    MatMulNBits, slower on long prefills; also where this CPU's u8s8 kernel is not exact: `u8s8_exact`).
    Unless `force`, the export's memory and disk are checked against this machine's from config.json alone
    before anything is downloaded (vl2edge/fits.py)."""
    if recipe not in EXPORT_RECIPES:
        raise InputError(f"unknown recipe {recipe!r}; known: {', '.join(EXPORT_RECIPES)}")
    if vision not in ("auto", "float", "int8", "both"):
        raise InputError(f"vision must be auto, float, int8 or both, got {vision!r}")
    if vision == "auto":
        vision = "both" if u8s8_exact() else "float"
    if calibration is not None and not Path(calibration).is_dir():
        raise InputError(f"calibration images: {calibration} is not a folder")
    pictures = calibration_images(calibration)
    dst = Path(dst)
    if not force and recipe != "float32":
        check(VL2Config.from_pretrained(config_dir(src)), str(src), dst.absolute().parent, run=False, recipe=recipe)
    src = resolve(src)
    if read_manifest(src) is not None:
        raise InputError(f"{src} is already quantized; export from the float checkpoint")
    bar = _progress(recipe, vision) if progress else None
    try:
        with OutputDir(dst, overwrite, sources=(src,)) as out:
            kernels = Kernels(accuracy_level, int8_matmul and u8s8_exact())
            _build(src, out, recipe, block_size, vision, kernels, routing_outputs, bar, pictures)
    finally:
        if bar is not None:
            bar.close()  # ends its line, so an error starts a line of its own
    return dst


def _progress(recipe: str, vision: str):
    """The export's step bar on stderr (off when stderr is not a terminal: logs and pipes get no \r lines)."""
    from tqdm import tqdm

    steps = ["load", "vision", "vision_int8", "decoder", "verify", "write"]
    if recipe == "float32" or vision == "float":
        steps.remove("vision_int8")
    return tqdm(total=len(steps), desc=f"export ({recipe})", bar_format="{desc}: {n}/{total} {postfix} [{elapsed}]",
                disable=None)


def _build(src: Path, out: Path, recipe: str, block_size: int | None, vision: str, kernels: Kernels,
           routing_outputs: bool, bar, pictures: list) -> None:
    """Everything `export` writes, into `out`, one part of the model in memory at a time."""

    def step(name):
        if bar:
            bar.set_postfix_str(name)

    def done():
        if bar:
            bar.update(1)

    t0 = time.perf_counter()
    threads = 0
    step("load")
    config = VL2Config.from_pretrained(src)
    lc = config.language_config
    if block_size is None:
        block_size = export_block_size(lc.hidden_size, lc.expert_width)
    quant = None if recipe == "float32" else Recipe(recipe, block_size=block_size)
    ck = open_checked(src, config)
    specs = quant.specs(config.tensor_shapes()) if quant is not None else {}
    proc = Processor.from_pretrained(src)
    inputs = _sample_inputs(proc)
    needed = inputs.input_ids.shape[1] + len(SAMPLE_TOKENS)
    if needed > lc.max_position_embeddings:
        raise InputError(f"{src}: the model's context ({lc.max_position_embeddings} positions, max_position_embeddings "
                         f"in config.json) cannot hold the export's verification prompt (one picture: {needed} "
                         "positions); is the config right?")
    front = _front(ck, config, specs)
    tiles = inputs.images[0]
    with torch.inference_mode():
        features = front.encode_tiles(torch.from_numpy(tiles)).float().numpy()
        image_rows = front.image_features(inputs.images, inputs.images_spatial_crop)[0].float()
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "image_newline.npy", front.image_newline.detach().float().numpy())
    np.save(out / "view_seperator.npy", front.view_seperator.detach().float().numpy())
    done()
    graphs = {}
    step("vision tower (float32)")
    graphs["vision"] = export_vision(front, out / "vision.onnx")
    done()
    manifest_specs = {n: s.to_dict() for n, s in specs.items()}
    bf16 = None
    if vision in ("int8", "both") and quant is not None:
        step("vision tower (bfloat16, the int8 gate's measure)")
        bf16 = bf16_features(front, tiles)
        done()
        step("vision tower (int8: smoothing, calibration)")
        graphs["vision_int8"] = export_vision_int8(front, out / "vision_int8.onnx", calibration_tiles(proc, pictures))
        manifest_specs |= {n: {"bits": 8, "graph": "vision_int8", "scheme": graphs["vision_int8"]["scheme"]}
                           for n in graphs["vision_int8"].pop("int8_weights")}
        if vision == "int8":
            for f in (out / "vision.onnx", out / "vision.onnx.data"):
                f.unlink(missing_ok=True)
            del graphs["vision"]
        done()
    del front  # the vision tower: the embedding table, then the decoder's layers one at a time, come next
    _free()
    embeds, decode_embeds = _embeddings(ck, config, inputs, image_rows, out)
    _free()
    step("decoder")
    sample = Sample.of(embeds, embeds.shape[1] - 7, decode_embeds)
    dec = export_decoder_streaming(ck, lc, specs, kernels, quant is None, out / "decoder.onnx", sample,
                                   routing=routing_outputs, threads=threads, progress=step)
    graphs["decoder"] = dec.graph
    if dec.linears_8bit:
        graphs["decoder"]["linears_8bit"] = ("int8 weights per output row (re-laid from the 8-bit blocks), "
                                             "activations quantized per token at run time, MatMulInteger u8s8")
    done()
    for name in SIDE_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
    manifest = {
        "format": FORMAT, "source": str(src),
        "recipe": recipe if quant is None else quant.to_dict() | {"label": recipe},
        "accuracy_level": kernels.accuracy_level, "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "dims": {"hidden_size": lc.hidden_size, "vocab_size": lc.vocab_size,
                 "num_hidden_layers": lc.num_hidden_layers, "attention": "mla" if lc.use_mla else "mha",
                 "image_size": config.vision_config.image_size, "tokens_per_side": config.tokens_per_side},
        "graphs": graphs, "default_vision": "vision" if "vision" in graphs else "vision_int8",
        "tensors": {"embed_tokens": "embed_tokens.npy", "image_newline": "image_newline.npy",
                    "view_seperator": "view_seperator.npy"},
        "quantization": manifest_specs, "moe": "QMoE" if dec.qmoe else ("masked-loop" if dec.moe else "none"),
        "opset": {"ai.onnx": OPSET, "com.microsoft": MS_OPSET}, "ir_version": 8,
        "min_onnxruntime": "1.25.0" if dec.qmoe else ("1.22.0" if specs else "1.17.0"),
        "recommended_onnxruntime": "1.31.0",
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    step("verify with onnxruntime")
    _free()
    verification = _verify_vision(out, graphs, features, tiles, threads, bf16)
    layers = {"rel_l2": max(r["rel_l2"] for r in dec.layers), "head": dec.tail, "layers": dec.layers}
    if dec.data_bytes <= END_TO_END_MAX:
        verification["decoder"] = _verify_decoder(out, sample, inputs.attention_mask, dec.logits[1:], threads)
    else:
        worst = max([*dec.layers, dec.tail], key=lambda r: r["rel_l2"])
        verification["decoder"] = {k: worst[k] for k in ("max_abs", "max_abs_rel", "rel_l2")} | {
            "scope": f"layer by layer (the worst piece); the whole graph ({dec.data_bytes / 2**30:.1f} GiB) was not "
                     f"run end to end (above {END_TO_END_MAX / 2**30:.0f} GiB: it would cost the export its memory)"}
    verification["decoder_layers"] = layers
    manifest["verification"] = verification
    _choose_vision(manifest)
    done()
    step("checksums")
    files = sorted(p for p in out.iterdir() if p.name != MANIFEST)  # every file but the manifest and its seal
    manifest["files"] = {p.name: sha256(p) for p in files}
    manifest["sizes"] = {p.name: p.stat().st_size for p in files}
    manifest["export_seconds"] = round(time.perf_counter() - t0, 1)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    seal(out)
    done()


def _free() -> None:
    """What the last step freed, back to the system before the next: glibc keeps freed heap pages of many
    mid-sized tensors (measured on full-size Tiny: ~0.3 GB still resident after the decoder's layers)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _save_npy(path: Path, table: torch.Tensor, rows: int = 1 << 14) -> None:
    """A float32 .npy of `table` [N, D], written in row chunks (no second full-size copy)."""
    N, D = table.shape
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (N, D)})
        for r in range(0, N, rows):
            f.write(table[r:r + rows].detach().float().numpy().tobytes())
