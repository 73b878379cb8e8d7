"""Will it fit? What exporting and running a model on the CPU will need, from its config.json alone, against
what this machine has: checked before any weight is downloaded, opened or exported, so a model too big for
the machine stops with one line that says what would fit instead (not an out-of-memory kill half an hour
in). No torch: sizes come from the config's tensor shapes.

    run     the ONNX Runtime process answering (`vl2edge.info.onnx_resident`, the CPU column of `vl2edge info`)
    export  the streaming export's peak (export/decoder.py: the vision tower, then one decoder layer at a
            time) and the disk its directory takes
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from .config import VL2Config
from .cpu_features import u8s8_exact
from .errors import InputError
from .info import RUNTIME_BASE, onnx_resident
from .quant.recipes import RECIPES, Recipe, export_block_size

G = 2**30
# The streaming export's peak (bench/RESULTS.md 2026-12-06, full-size Tiny and Small, int4-experts, AVX2
# EPYC): torch, onnx and onnxruntime themselves (EXPORT_BASE); the vision stage holds the float tower and
# the embedding table (Small: 3.5 GB RSS with the tower traced a block at a time) and, where the int8 graph
# is built (`--vision auto` on a CPU whose u8s8 kernel is exact), the int8 search's copies and calibration
# sessions (12.5 GB RSS seen on Tiny, whole-tower traces); a decoder layer, its stored weights a few times
# over (the loaded module, its export twin, the traced piece and its check's session: Tiny 1.5-1.6 GB,
# Small 1.5-2.2 GB RSS).
EXPORT_BASE = int(0.8 * 2**30)
VISION_FLOAT_FACTOR = 1.6
VISION_INT8_FACTOR = 7.0
LAYER_EXPORT_FACTOR = 6.0
# `--backend torch --quant`: 4-bit weights packed, everything else widened to float32 on the CPU, plus the
# loading's transients (measured: Small int4-experts, 18.8 GB peak answering a 384x384 image)
TORCH_FACTOR = 1.3
VARIANTS = {"deepseek-vl2-tiny": "Tiny", "deepseek-vl2-small": "Small", "deepseek-vl2": "Base"}


@dataclass(frozen=True)
class Needs:
    """Bytes a CPU run of one recipe needs: `run` memory, `export` peak memory, `disk` of its export."""

    run: int
    export: int
    disk: int


def needs(config: VL2Config, recipe: str = "int4-experts", context: int | None = None) -> Needs:
    lc = config.language_config
    est = onnx_resident(config, recipe, context or lc.max_position_embeddings)
    vision_float = sum(math.prod(s) * 4 for n, s in config.tensor_shapes().items()
                       if n.startswith(("vision.", "projector.")) and not n.startswith("vision.attn_pool."))
    embed = lc.vocab_size * lc.hidden_size * 4
    layer = max(_layer_bytes(config, recipe).values())
    head = lc.vocab_size * lc.hidden_size * 4 * 2  # lm_head in float32 while it is loaded and traced
    vision_factor = VISION_INT8_FACTOR if u8s8_exact() else VISION_FLOAT_FACTOR  # export/build.py's "auto"
    export = EXPORT_BASE + max(int(vision_float * vision_factor) + embed, int(layer * LAYER_EXPORT_FACTOR), head)
    return Needs(run=est["resident"], export=export, disk=est["decoder"] + est["vision"] + vision_float + embed)


def _layer_bytes(config: VL2Config, recipe: str) -> dict[int, int]:
    """Stored bytes of each decoder layer in `recipe` (float tensors as float32)."""
    lc = config.language_config
    shapes = config.tensor_shapes()
    specs = Recipe(recipe, block_size=export_block_size(lc.hidden_size, lc.expert_width)).specs(shapes)
    total = dict.fromkeys(range(lc.num_hidden_layers), 0)
    for name, shape in shapes.items():
        if name.startswith("language.model.layers."):
            spec = specs.get(name)
            total[int(name.split(".")[3])] += spec.nbytes(*shape) if spec else math.prod(shape) * 4
    return total


def torch_needs(config: VL2Config, recipe: str) -> int:
    """Memory of `--backend torch --quant recipe` on the CPU (an estimate)."""
    specs = Recipe(recipe).specs(config.tensor_shapes())
    total = 0
    for name, shape in config.tensor_shapes().items():
        spec = specs.get(name)
        total += spec.nbytes(*shape) if spec is not None and spec.bits == 4 else math.prod(shape) * 4
    return int(total * TORCH_FACTOR + RUNTIME_BASE)


def available_memory() -> int:
    """Memory this process can still take: MemAvailable (Linux), else the physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def free_disk(path: Path) -> int:
    """Free bytes on the file system that holds `path` (or its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def check(config: VL2Config, name: str, export_to: Path | None, run: bool = True, recipe: str = "int4-experts",
          memory: int | None = None, disk: int | None = None) -> None:
    """InputError (one line) when running `recipe` on ONNX Runtime (`run`), or exporting it into the folder
    `export_to` first (None: the export exists), needs more memory or disk than this machine has; the line
    names what would fit."""
    memory = available_memory() if memory is None else memory
    n = needs(config, recipe)
    short = []
    if run and n.run > memory:
        short.append(f"~{n.run / G:.1f} GiB of memory to answer ({recipe} on ONNX Runtime, as `vl2edge info` "
                     f"estimates) but {memory / G:.1f} GiB are available")
    if export_to is not None:
        if n.export > memory and not (run and n.run > memory):
            short.append(f"~{n.export / G:.1f} GiB of memory to export it but {memory / G:.1f} GiB are available")
        disk = free_disk(export_to) if disk is None else disk
        if n.disk > disk:
            short.append(f"~{n.disk / G:.1f} GiB of disk for its export in {export_to} but "
                         f"{disk / G:.1f} GiB are free")
    if short:
        raise InputError(f"{name} does not fit this machine: it needs {'; and '.join(short)}. "
                         f"What fits: {_alternatives(config, recipe, memory)}. (--force tries anyway)")


def _alternatives(config: VL2Config, recipe: str, memory: int) -> str:
    from .presets import preset

    fits = [f"`vl2edge export --recipe {r}` (~{needs(config, r).run / G:.1f} GiB)" for r in RECIPES
            if r != recipe and needs(config, r).run <= memory]
    fits += [f"`--backend torch --quant {r}` (~{torch_needs(config, r) / G:.1f} GiB)" for r in ("int4", "int4-experts")
             if torch_needs(config, r) <= memory][:1]
    params = config.num_params()
    fits += [f"DeepSeek-VL2-{label} (deepseek-ai/{v}, ~{needs(preset(v)).run / G:.1f} GiB)"
             for v, label in VARIANTS.items() if preset(v).num_params() < params and needs(preset(v)).run <= memory]
    return ", ".join(fits) or "nothing on this machine: a machine with more memory, or a GPU (`--gpu-memory`)"
