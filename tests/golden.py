"""Access to the golden reference fixtures in tests/fixtures/ref/ (see make_lean_copy.py)."""

import json
from functools import cache
from pathlib import Path

import numpy as np

REF = Path(__file__).resolve().parent / "fixtures" / "ref"
VARIANTS = ("tiny", "small", "base")
CASES = ("square_384", "landscape_1024x768", "portrait_360x1000", "multi3_two_turns", "text_only")


def model_dir(variant: str) -> Path:
    return REF / variant / "model"


def conversation(case: str) -> tuple[list[dict], list[Path]]:
    """The case's conversation as passed to the reference, and its image files in placeholder order."""
    meta = json.loads((REF / "inputs" / case / "processor.json").read_text())
    conv = [{k: v for k, v in m.items() if k != "images"} for m in meta["conversation"]]
    images = [REF / "images" / n for m in meta["conversation"] for n in m.get("images", [])]
    return conv, images


@cache
def processor_outputs(case: str) -> dict[str, np.ndarray]:
    """The reference processor's tensors; `images` rebuilt from uint8 exactly as the fixture README says."""
    d = dict(np.load(REF / "inputs" / case / "processor.npz"))
    if "images_u8" in d:
        d["images"] = ((d["images_u8"].astype(np.float32) / np.float32(255)) - np.float32(0.5)) / np.float32(0.5)
    else:
        d["images"] = np.zeros((1, 1, 3, 384, 384), np.float32)
    return d


@cache
def expected(variant: str, case: str) -> dict[str, np.ndarray]:
    return dict(np.load(REF / variant / "cases" / case / "expected.npz"))


def expected_json(variant: str, case: str) -> dict:
    return json.loads((REF / variant / "cases" / case / "expected.json").read_text())


# Prepended to a subprocess script: makes `import torch` fail, to prove a code path needs no torch.
NO_TORCH = """
import sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
sys.meta_path.insert(0, NoTorch())
"""
