"""Access to the golden reference fixtures in tests/fixtures/ref/ (see make_lean_copy.py)."""

import json
from contextlib import contextmanager
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


def model_args(case: str) -> list[np.ndarray]:
    """The reference processor's outputs in the order `VL2Model.logits` / `embed` take them:
    input_ids, attention_mask, images, images_seq_mask, images_spatial_crop."""
    d = processor_outputs(case)
    return [d[k] for k in ("input_ids", "attention_mask", "images", "images_seq_mask", "images_spatial_crop")]


class Recorder:
    """Wraps a decoder (torch or ONNX) to keep every step's logits."""

    def __init__(self, dec):
        self.dec, self.steps = dec, []

    def new_cache(self, b, n):
        return self.dec.new_cache(b, n)

    def prefill(self, e, cache, mask=None):
        self.steps.append(self.dec.prefill(e, cache, mask))
        return self.steps[-1]

    def decode(self, tok, cache):
        self.steps.append(self.dec.decode(tok, cache))
        return self.steps[-1]


@contextmanager
def routing(model):
    """Records each MoE layer's router output (topk_idx, topk_w) through forward hooks while active:
    yields {layer index: (idx [T, A], w [T, A])} of the last call."""
    from vl2edge.models.language import MoE

    captured: dict[int, tuple] = {}
    hooks = [layer.mlp.gate.register_forward_hook(lambda mod, a, out, i=i: captured.__setitem__(i, out))
             for i, layer in enumerate(model.language.model.layers) if isinstance(layer.mlp, MoE)]
    try:
        yield captured
    finally:
        for h in hooks:
            h.remove()


def cli_error(capsys, *args, one_line: bool = False) -> str:
    """Run `vl2edge ARGS...` expecting a user error: exit status 2 with a message and no traceback (with
    `one_line`, exactly one line); returns what it printed on stderr."""
    import pytest

    from vl2edge import cli

    with pytest.raises(SystemExit) as e:
        cli.main([str(a) for a in args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err and err.strip(), err
    assert not one_line or len(err.strip().splitlines()) == 1, err
    return err
