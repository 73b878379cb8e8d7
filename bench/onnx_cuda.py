"""onnxruntime's CUDA execution provider on an export, beside the torch path: node placement, TTFT, decode.

    python bench/onnx_cuda.py [--export DIR --checkpoint DIR] [--provider cuda|cpu] [--out bench/out/onnx_cuda.json]

Without `--export` it writes the 3-layer test model and exports it (int4-experts, seconds): a full-size
export takes minutes that the device budget does not have. It reports which decoder nodes the provider
took and which fell back to the CPU (onnxruntime's profiler names each kernel's provider), then TTFT for a
1024x768 image and decode tok/s through `OnnxModel`, and the same through the PyTorch model (the static
decoder, graph-replayed on CUDA). Where onnxruntime has no CUDA provider (the device machine's image has
the CPU build, and onnxruntime-gpu's wheel is larger than a device call can carry) it says so and exits 0;
`--provider cpu` runs every step on the CPU provider instead (the dry run `bench/gpu_check.sh --cpu` makes).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import ttft_and_decode  # noqa: E402
from bench.profile_onnx import decoder_feeds, kernel_events, session  # noqa: E402
from vl2edge.artifact import read_manifest  # noqa: E402

PROVIDERS = {"cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}


def build(tmp: Path) -> tuple[Path, Path]:
    """The 3-layer test checkpoint and its int4-experts export, through the user's commands."""
    ckpt, export = tmp / "ckpt", tmp / "onnx"
    for cmd in (["-m", "vl2edge.synthetic", "--preset", "test-mha", "--out", str(ckpt)],
                ["-m", "vl2edge", "export", "--model", str(ckpt), "--out", str(export), "--recipe", "int4-experts"]):
        subprocess.run([sys.executable, *cmd], check=True, cwd=ROOT)
    return ckpt, export


def placement(export: Path, provider: str) -> dict:
    """Decoder prefill (64 tokens) under the profiler: kernels per provider, op types that left `provider`."""
    with tempfile.TemporaryDirectory() as tmp:
        graph = export / read_manifest(export)["graphs"]["decoder"]["file"]
        s = session(graph, 4, tmp, (provider, "CPUExecutionProvider"))
        s.run(None, decoder_feeds(export, 64))
        events = kernel_events(Path(s.end_profiling()))
    per = Counter(ev["args"].get("provider", "?") for ev in events)
    fell = Counter(ev["args"]["op_name"] for ev in events if ev["args"].get("provider") != provider)
    return {"kernels_per_provider": dict(per), "op_types_not_on_provider": dict(fell)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--export", type=Path)
    ap.add_argument("--checkpoint", type=Path, help="the float checkpoint the export came from (torch side)")
    ap.add_argument("--provider", choices=sorted(PROVIDERS), default="cuda")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "onnx_cuda.json")
    a = ap.parse_args()
    import onnxruntime as ort
    import torch

    provider = PROVIDERS[a.provider]
    if provider not in ort.get_available_providers():
        why = (f"onnxruntime {ort.__version__} here has no {provider} (available: "
               f"{', '.join(ort.get_available_providers())}); install onnxruntime-gpu to measure it")
        print(f"skipped: {why}")
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps({"skipped": why}))
        return
    from vl2edge.models.decode_step import StaticDecoder
    from vl2edge.models.loading import load_model
    from vl2edge.onnx_backend import OnnxModel
    from vl2edge.processor import Processor

    with tempfile.TemporaryDirectory() as tmp:
        ckpt, export = (a.checkpoint, a.export) if a.export else build(Path(tmp))
        report: dict = {"provider": provider, "export": str(export), "placement": placement(export, provider)}
        device = torch.device(a.provider)
        ort_model = OnnxModel(export, device=a.provider)
        report["onnx"] = ttft_and_decode(ort_model, Processor.from_pretrained(export), 32, 3, device)
        if ckpt is not None:
            model = load_model(ckpt, dtype="bfloat16" if a.provider == "cuda" else "float32", device=a.provider).model
            torch_side = StaticDecoder(model, graph=a.provider == "cuda")
            report["torch"] = ttft_and_decode(torch_side, Processor.from_pretrained(ckpt), 32, 3, device)
    print(json.dumps(report, indent=1))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
