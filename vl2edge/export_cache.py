"""The fast CPU default: a float checkpoint run on a machine without a CUDA GPU goes through an int4-experts
ONNX export built once into a cache, so nobody has to know about `vl2edge export` to get the fast path.

    <cache>/<model>-int4-experts-<key>/      an ordinary export directory (see export/build.py)

`<cache>` is `$VL2EDGE_CACHE`, else a `vl2edge` folder beside the Hugging Face hub cache
(`~/.cache/huggingface/vl2edge`). `<key>` is a digest of what the export depends on: the source
directory (a hub snapshot's path holds its revision), its config.json and the names, sizes and
modification times of its weight files, the recipe and the vl2edge version; a changed checkpoint gets a
new entry. An entry is used only when it verifies (every file the manifest lists, at its recorded
size, and the sha256 of every file under 64 MiB); one that does not is rebuilt. Concurrent first runs
wait on a lock (`fcntl.flock`) and the export itself is written under a temporary name and renamed
into place (vl2edge/outputs.py), so a cache entry is either complete or absent.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import sys
from pathlib import Path

from .artifact import MANIFEST, is_onnx_dir, read_manifest, seal_problem, sha256
from .errors import InputError, VL2Error
from .outputs import open_lock
from .synthetic import GENERATED_NAME

RECIPE = "int4-experts"
SMALL_FILE = 64 * 2**20  # files below this are checked by sha256 on every use; larger ones by size


def cache_root() -> Path:
    env = os.environ.get("VL2EDGE_CACHE")
    if env:
        root = Path(env).expanduser()
        if root.exists() and not root.is_dir():
            raise InputError(f"VL2EDGE_CACHE={env} is a file, not a folder: point it at a folder for the export cache")
        return root
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE).expanduser().parent / "vl2edge"


def _model_name(src: Path) -> str:
    parts = src.parts
    name = parts[-3] if len(parts) >= 3 and parts[-2] == "snapshots" else src.name  # hub: models--org--name
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name)[:80] or "model"


def cache_key(src: Path) -> str:
    from . import __version__

    h = hashlib.sha256()
    h.update(f"{src.resolve()}\0{RECIPE}\0{__version__}\0".encode())
    h.update((src / "config.json").read_bytes())
    for f in sorted(src.iterdir()):
        if f.name.endswith((".safetensors", ".safetensors.index.json")) or f.name == GENERATED_NAME:
            st = f.stat()
            h.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return h.hexdigest()[:16]


def entry_for(src: Path) -> Path:
    return cache_root() / f"{_model_name(src)}-{RECIPE}-{cache_key(src)}"


def verify_entry(entry: Path) -> str | None:
    """None when the entry is complete and intact, else what is wrong."""
    if not is_onnx_dir(entry):
        return f"no {MANIFEST}"
    try:
        sealed = seal_problem(entry)  # a hand-edited manifest is rebuilt, not trusted
        if sealed is not None:
            return sealed
        manifest = read_manifest(entry)  # also checks every recorded file size
        for name, digest in manifest.get("files", {}).items():
            f = entry / name
            if not f.is_file():
                return f"{name} is missing"
            if f.stat().st_size < SMALL_FILE and sha256(f) != digest:
                return f"{name} does not match its sha256"
    except (VL2Error, OSError) as e:
        return str(e)
    return None


def cached_export(src: Path, progress: bool = True) -> Path:
    """The cached int4-experts export of the float checkpoint `src`, built (once) if needed. Whether it fits
    the machine is the caller's to check (vl2edge/fits.py: `pipeline.load` does, before the download)."""
    entry = entry_for(src)
    if verify_entry(entry) is None:
        return entry
    root = entry.parent
    root.mkdir(parents=True, exist_ok=True)
    with os.fdopen(open_lock(root / f".{entry.name}.lock"), "r+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"[vl2edge] waiting for another process that is exporting {src.name} into {entry}", file=sys.stderr)
            fcntl.flock(lock, fcntl.LOCK_EX)
        problem = verify_entry(entry)
        if problem is None:  # built by the process we waited for
            return entry
        from .export.build import export

        if entry.exists():
            print(f"[vl2edge] the cached export {entry} does not verify ({problem}); rebuilding it", file=sys.stderr)
        print(f"[vl2edge] first run on the CPU: exporting {src} to ONNX ({RECIPE}) into {entry}, once; later runs "
              "reuse it (--backend torch runs the PyTorch model instead)", file=sys.stderr)
        export(src, entry, RECIPE, progress=progress, overwrite=True, force=True)  # the caller checked the fit
    return entry
