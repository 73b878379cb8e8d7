"""The ONNX artifact directory's manifest: its format tag, file name, validation and checksums (no torch).

Written by `vl2edge.export.build`, read by `vl2edge.onnx_backend`; one copy of both constants and of
the sha256 loop. `read_manifest` validates every field the backend reads (file names must be plain
names inside the directory; file sizes, where the export recorded them, must match: a swapped or
truncated file is refused before onnxruntime sees it); `verify_files` is the full sha256 check behind
`vl2edge verify DIR`. The directory layout is described in export/build.py.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from . import schema
from .errors import CheckpointError, VL2Error

FORMAT = "vl2edge.onnx.v1"
MANIFEST = "manifest.json"
SEAL = "manifest.sha256"    # the manifest's own sha256, written last by the export (exports since 2026-12-07)
GRAPH_NAMES = ("decoder", "vision", "vision_int8")
MANIFEST_MAX = 16 * 2**20   # Base's manifest (per-tensor recipe, per-layer checks) is ~2 MB
VISION_INPUTS = ["pixel_values"]
DECODER_INPUTS = ["inputs_embeds", "attention_mask"]  # then the past names


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def is_onnx_dir(path) -> bool:
    """Does `path` hold a vl2edge ONNX export (any version: an unknown one is then refused by name)?"""
    f = Path(path) / MANIFEST
    if not f.is_file():
        return False
    try:
        fmt = json.loads(schema.read_bounded(f, str(f), MANIFEST_MAX)).get("format")
    except (ValueError, RecursionError, AttributeError, VL2Error):  # not JSON or UTF-8, not an object, too big
        return f.stat().st_size > MANIFEST_MAX  # too big: read_manifest then names the problem
    return isinstance(fmt, str) and fmt.startswith(FORMAT.rsplit(".", 1)[0])


def plain_name(name: str, where: str) -> str:
    """A file name inside the directory: no separators, not `.` or `..`."""
    if "/" in name or "\\" in name or name in ("", ".", "..") or len(name) > 255:
        raise CheckpointError(f"{where}: {name[:80]!r} is not a file name inside the export directory")
    return name


def _plain_name(f: schema.Fields, key: str) -> str:
    return plain_name(f.text(key, max_len=255), f"{f.where}: {key}")


def read_manifest(root: Path) -> dict[str, Any]:
    """manifest.json of an export, checked field by field (CheckpointError naming the field)."""
    path = root / MANIFEST
    raw = schema.read_bounded(path, str(path), MANIFEST_MAX, CheckpointError)
    top = schema.Fields(schema.loads(raw, str(path), CheckpointError), str(path), CheckpointError)
    if top.raw("format", None) != FORMAT:
        raise CheckpointError(f"{root} is not a vl2edge ONNX export (format {top.raw('format', None)!r:.60})")
    top.text("min_onnxruntime", max_len=32)
    graphs = top.sub("graphs")
    listed = top.sub("files", {}).obj
    for name in graphs.obj:
        g = graphs.sub(name)
        if name not in GRAPH_NAMES:
            raise CheckpointError(f"{path}: graphs has {name[:40]!r}; the graphs are {', '.join(GRAPH_NAMES)}")
        file = _plain_name(g, "file")
        if not file.endswith(".onnx") or (listed and file not in listed):
            raise g.fail("file", "an .onnx file the manifest lists under files", file)
        for key in ("inputs", "outputs", *(("past", "present") if name == "decoder" else ())):
            if not all(isinstance(v, str) for v in g.array(key)):
                raise g.fail(key, "a list of names")
        want = DECODER_INPUTS + g.obj["past"] if name == "decoder" else VISION_INPUTS
        if g.obj["inputs"] != want:
            raise g.fail("inputs", f"the {name} graph's inputs {want[:4]}{'...' if len(want) > 4 else ''}",
                         g.obj["inputs"][:4])
    if "decoder" not in graphs.obj:
        raise CheckpointError(f"{path}: graphs has no 'decoder'")
    dec = graphs.sub("decoder")
    cache = dec.sub("cache")
    cache.integer("sequence_axis", lo=1, hi=2)
    cache.boolean("shared_buffer", False)
    shape = cache.array("shape", max_len=4)
    if not all(isinstance(v, str) or (isinstance(v, int) and not isinstance(v, bool) and 0 < v < 1 << 20)
               for v in shape):
        raise cache.fail("shape", "a list of axis names and sizes", shape)
    if len(dec.obj["past"]) != len(dec.obj["present"]):
        raise CheckpointError(f"{path}: the decoder's past and present lists differ in length")
    if top.text("default_vision", max_len=64) not in graphs.obj:
        raise top.fail("default_vision", "one of the graphs", top.obj["default_vision"])
    tensors = top.sub("tensors")
    for key in ("embed_tokens", "image_newline", "view_seperator"):
        _plain_name(tensors, key)
    sizes = top.sub("sizes", {})
    for name in sizes.obj:
        want = sizes.integer(name, lo=0)
        try:
            got = (root / plain_name(name, sizes.where)).stat().st_size
        except OSError:
            raise CheckpointError(f"{root}: {name} is missing (run `vl2edge verify {root}`)") from None
        if got != want:
            raise CheckpointError(f"{root}: {name} has {got:,} bytes but the manifest says {want:,} (a swapped or "
                                  f"truncated file? run `vl2edge verify {root}`)")
    return top.obj


def seal(root: Path) -> None:
    """Write SEAL: the manifest's sha256, so a hand-edited manifest is found (the export's last step)."""
    (root / SEAL).write_text(sha256(root / MANIFEST) + "\n")


def seal_problem(root: Path) -> str | None:
    """None when SEAL holds manifest.json's sha256; else what is wrong (an unsealed, older export included)."""
    if not (root / SEAL).exists():
        return f"{SEAL} is missing (an export made before 2026-12-07, or a damaged one)"
    try:
        recorded = schema.read_bounded(root / SEAL, SEAL, 200, CheckpointError).decode("ascii", "replace").strip()
    except CheckpointError as e:
        return str(e)
    if recorded != sha256(root / MANIFEST):
        return f"{MANIFEST} does not match {SEAL} (edited after the export?)"
    return None


def verify_files(root) -> list[str]:
    """Files of an export whose sha256 differs from manifest.json's, or that are missing (empty: all good)."""
    root = Path(root)
    path = root / MANIFEST
    raw = schema.read_bounded(path, str(path), MANIFEST_MAX, CheckpointError)
    files = schema.Fields(schema.loads(raw, str(path), CheckpointError), str(path), CheckpointError).sub("files")
    bad = []
    for name in files.obj:
        digest = files.text(name, max_len=64)
        try:
            ok = sha256(root / plain_name(name, files.where)) == digest
        except OSError:
            ok = False
        if not ok:
            bad.append(name)
    return bad
