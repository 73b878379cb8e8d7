"""The ONNX artifact directory's manifest: its format tag, file name and checksums (no torch).

Written by `vl2edge.export.build`, read by `vl2edge.onnx_backend`; one copy of both constants and of
the sha256 loop. The directory layout is described in export/build.py.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

FORMAT = "vl2edge.onnx.v1"
MANIFEST = "manifest.json"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def is_onnx_dir(path) -> bool:
    f = Path(path) / MANIFEST
    if not f.is_file():
        return False
    try:
        return json.loads(f.read_text()).get("format") == FORMAT
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def verify_files(root) -> list[str]:
    """Files of an export whose sha256 differs from manifest.json's, or that are missing (empty: all good)."""
    root = Path(root)
    bad = []
    for name, digest in json.loads((root / MANIFEST).read_text()).get("files", {}).items():
        try:
            ok = sha256(root / name) == digest
        except OSError:
            ok = False
        if not ok:
            bad.append(name)
    return bad
