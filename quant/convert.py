"""Stream a float checkpoint into a quantized model directory, tensor by tensor.

Float tensors the recipe names are quantized in row chunks (a bounded float working set: quantizing
the 27.5B Base stays far under 6 GB of RAM); everything else is copied byte for byte in its stored
dtype. The output is a model directory `vl2edge.load` accepts: config, tokenizer and processor files,
shards in the official naming, and `quantization.json` recording every tensor's recipe.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from vl2edge.config import VL2Config
from vl2edge.errors import CheckpointError
from vl2edge.hub import resolve
from vl2edge.outputs import OutputDir
from vl2edge.weights import SIDE_FILES, STORAGE, Checkpoint, write_checkpoint

from .quantizers import quantize
from .recipes import Recipe, base_name, packed_tensor_shapes, read_manifest, write_manifest

CHUNK = 1 << 24  # float values per quantization / copy step
SHARD = 8 * 2**30


def _chunks(ck: Checkpoint, shapes: dict, specs: dict, bar=None) -> Iterator[tuple[str, np.ndarray]]:
    for name, shape in shapes.items():
        f = ck.files[ck.where[name]]
        rows = max(1, CHUNK // max(1, math.prod(shape[1:])))
        spec = specs.get(name)
        if spec is None:  # copy in the stored dtype, chunk by chunk
            raw = f.raw(name)
            for r in range(0, max(1, shape[0] if shape else 1), rows):
                part = raw[r:r + rows] if shape else raw
                yield name, part
                if bar:
                    bar.update(part.nbytes)
        else:
            parts = []
            for r in range(0, shape[0], rows):
                w = ck.numpy(name, np.float32, rows=slice(r, r + rows))
                parts.append(quantize(w, spec))
                if bar:
                    bar.update(w.shape[0] * shape[1] * np.dtype(STORAGE[ck.dtype(name)]).itemsize)
            for suffix in parts[0]:
                for p in parts:
                    yield f"{base_name(name)}.{suffix}", p[suffix]
        f.release(name)


def convert(src, dst, recipe: Recipe, progress: bool = True, overwrite: bool = False) -> Path:
    """Quantize `src` into the new model directory `dst` (refused if it holds files, unless `overwrite`)."""
    src, dst = resolve(src), Path(dst)
    if read_manifest(src) is not None:
        raise CheckpointError(f"{src} is already quantized; quantize the float checkpoint")
    out = OutputDir(dst, overwrite, sources=(src,))
    config = VL2Config.from_pretrained(src)
    ck = Checkpoint.open(src)
    shapes = config.tensor_shapes()
    ck.check_keys(shapes, "config.json")
    ck.check_shapes(shapes)
    ck.check_dtypes(dict.fromkeys(shapes))
    specs = recipe.specs(shapes)
    layout = {n: (dt or ck.dtype(n), s) for n, (dt, s) in packed_tensor_shapes(shapes, specs).items()}
    total = sum(math.prod(s) * np.dtype(STORAGE[d]).itemsize for d, s in layout.values())
    with out as tmp:
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=ck.nbytes(), unit="B", unit_scale=True, desc=f"quantizing ({recipe.label})", disable=None)
        try:
            write_checkpoint(tmp, layout, _chunks(ck, shapes, specs, bar),
                             max_shard_bytes=SHARD if total > 64 * 2**20 else None,
                             metadata={"format": "pt", "quantization": recipe.label})
        finally:
            if bar:
                bar.close()
        for name in SIDE_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, tmp / name)
        write_manifest(tmp, recipe, specs, source=str(src))
    return dst
