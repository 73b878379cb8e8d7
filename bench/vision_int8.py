"""The int8 vision graph on a full-width SigLIP-SO400M tower: accuracy, speed, op profile, batch size.

    .venv/bin/python bench/vision_int8.py [--out bench/out/vision_int8] [--runs 5] [--rebuild]

Builds in memory the vision tower + projector of DeepSeek-VL2-Tiny (width 1152, 27 layers, 16 heads,
mlp 4304, patch 14, 384x384) with random weights, and writes three graphs into --out (reused when
present, unless --rebuild):

    float     vision.onnx           export/graphs.py:export_vision, the export's float graph
    dynamic   vision_dynamic.onnx   export/graphs.py:quantize_vision_dynamic, the previous int8 scheme
    static    vision_int8.onnx      export/vision_int8.py:export_vision_int8, the export's int8 graph,
                                    calibrated on the processor's tiles of the calibration pictures
                                    and tests/fixtures/ref/images

Then prints: features rel-L2 against float on tiles of pictures the calibration has not seen; seconds per
tile at batch 1 (median of --runs, the graphs interleaved in one process) with 1 and 2 threads; seconds
per tile at batch 1, 2, 4, 10; the top op types by time (onnxruntime profiler) of one 1-tile run. Timings
are only trustworthy on a quiet machine: the load average is printed before and after.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vl2edge.export.graphs import export_vision, quantize_vision_dynamic  # noqa: E402
from vl2edge.export.vision_int8 import calibration_images, calibration_tiles, export_vision_int8  # noqa: E402
from vl2edge.models.model import VL2Model  # noqa: E402
from vl2edge.presets import preset  # noqa: E402
from vl2edge.processor import Processor  # noqa: E402
from vl2edge.synthetic import sample_image  # noqa: E402

FIXTURE_IMAGES = ROOT / "tests" / "fixtures" / "ref" / "images"
PROCESSOR = ROOT / "tests" / "fixtures" / "ref" / "tiny" / "model"   # Tiny's tiling (any model's processor tiles alike)
HELD_OUT = ((400, 300), (720, 1280))                                 # pictures not among the calibration sizes
BATCHES = (1, 2, 4, 10)


def random_vision_model(seed: int = 0) -> VL2Model:
    """DeepSeek-VL2-Tiny with only the vision tower and projector materialised (the language model stays on
    the meta device), random weights initialised as bench/gpu.py:random_model does."""
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = VL2Model(preset("deepseek-vl2-tiny"))
    for part in (model.vision, model.projector):
        part.to_empty(device="cpu").requires_grad_(False).eval()
        for name, p in part.named_parameters():
            if name.endswith("weight") and p.dim() == 1:
                p.fill_(1.0)
            else:
                p.normal_(0, 1.0 / (p.shape[-1] if p.dim() > 1 else 1) ** 0.5)
    return model


def build(out: Path, rebuild: bool) -> dict[str, Path]:
    paths = {"float": out / "vision.onnx", "dynamic": out / "vision_dynamic.onnx", "static": out / "vision_int8.onnx"}
    if not rebuild and all(p.is_file() for p in paths.values()):
        return paths
    out.mkdir(parents=True, exist_ok=True)
    model = random_vision_model()
    t0 = time.perf_counter()
    export_vision(model, paths["float"])
    quantize_vision_dynamic(paths["float"], paths["dynamic"])
    t1 = time.perf_counter()
    tiles = calibration_tiles(Processor.from_pretrained(PROCESSOR), calibration_images(FIXTURE_IMAGES))
    entry = export_vision_int8(model, paths["static"], tiles)
    (out / "vision_int8.json").write_text(json.dumps(entry | {"build_s": round(time.perf_counter() - t1, 1)},
                                                     indent=1))
    print(f"built in {time.perf_counter() - t0:.0f} s; static: {entry['scheme']}", flush=True)
    return paths


def session(path: Path, threads: int, profile: bool = False):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if profile:
        so.enable_profiling = True
        so.profile_file_prefix = str(path.parent / f"profile-{path.stem}")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def run(s, tiles: np.ndarray) -> np.ndarray:
    return s.run(None, {"pixel_values": tiles})[0]


def speed(paths: dict[str, Path], tile: np.ndarray, threads: int, runs: int) -> dict[str, float]:
    """Seconds per 1-tile run, median over `runs`, the graphs interleaved (so load changes hit all alike)."""
    sessions = {k: session(p, threads) for k, p in paths.items()}
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for s in sessions.values():
        run(s, tile)  # warm-up
    for _ in range(runs):
        for k, s in sessions.items():
            times[k].append(_timed(s, tile))
    return {k: statistics.median(v) for k, v in times.items()}


def per_tile(path: Path, tiles: np.ndarray, threads: int, runs: int) -> dict[int, float]:
    s = session(path, threads)
    out = {}
    for b in BATCHES:
        batch = np.ascontiguousarray(np.resize(tiles, (b, *tiles.shape[1:])))   # [b, 3, S, S]
        run(s, batch)
        out[b] = statistics.median(_timed(s, batch) for _ in range(runs)) / b
    return out


def _timed(s, tiles: np.ndarray) -> float:
    t0 = time.perf_counter()
    run(s, tiles)
    return time.perf_counter() - t0


def op_profile(path: Path, tile: np.ndarray, threads: int, top: int = 10) -> dict:
    """The last of three runs: seconds in all nodes, and the `top` op types as (op type, seconds, nodes)."""
    s = session(path, threads, profile=True)
    for _ in range(3):
        run(s, tile)
    events = json.loads(Path(s.end_profiling()).read_text())
    last = [e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"][-1]
    dur: collections.Counter = collections.Counter()
    count: collections.Counter = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and \
                last["ts"] <= e["ts"] <= last["ts"] + last["dur"]:
            dur[e["args"]["op_name"]] += e["dur"] / 1e6
            count[e["args"]["op_name"]] += 1
    return {"total": sum(dur.values()), "ops": [(op, d, count[op]) for op, d in dur.most_common(top)]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "vision_int8"))
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--rebuild", action="store_true")
    a = ap.parse_args()
    out = Path(a.out)
    paths = build(out, a.rebuild)
    proc = Processor.from_pretrained(PROCESSOR)
    held = calibration_tiles(proc, [sample_image(w, h) for w, h in HELD_OUT])
    load0 = os.getloadavg()
    ref = run(session(paths["float"], 2), held)
    res: dict = {"held_out_tiles": len(held), "load_before": load0}
    res["rel_l2"] = {k: float(np.linalg.norm(run(session(paths[k], 2), held) - ref) / np.linalg.norm(ref))
                     for k in ("dynamic", "static")}
    res["speed"] = {t: speed(paths, held[:1], t, a.runs) for t in (1, 2)}
    res["per_tile"] = {k: per_tile(paths[k], held, 2, a.runs) for k in ("static", "float")}
    res["profile"] = {k: op_profile(paths[k], held[:1], 2) for k in ("static", "float")}
    res["load_after"] = os.getloadavg()
    (out / "results.json").write_text(json.dumps(res, indent=1))

    print(f"\nfull-width SigLIP-SO400M tower + projector (random weights), {time.strftime('%Y-%m-%d %H:%M')}, "
          f"load average {load0[0]:.2f} before, {res['load_after'][0]:.2f} after")
    print(f"features rel-L2 vs float on {len(held)} held-out tiles: dynamic {res['rel_l2']['dynamic']:.4f}, "
          f"static {res['rel_l2']['static']:.4f}")
    print("\n| threads | float s/tile | dynamic int8 s/tile | static int8 s/tile | float/static | dynamic/static |")
    print("|---|---|---|---|---|---|")
    for t, s in res["speed"].items():
        print(f"| {t} | {s['float']:.3f} | {s['dynamic']:.3f} | {s['static']:.3f} | {s['float'] / s['static']:.2f} | "
              f"{s['dynamic'] / s['static']:.2f} |")
    print("\n| graph (2 threads) | " + " | ".join(f"batch {b} s/tile" for b in BATCHES) + " |")
    print("|---|" + "---|" * len(BATCHES))
    for k, row in res["per_tile"].items():
        print(f"| {k} | " + " | ".join(f"{row[b]:.3f}" for b in BATCHES) + " |")
    for k, prof in res["profile"].items():
        print(f"\ntop op types, {k} (2 threads, 1 tile, {prof['total']:.3f} s in nodes): " + ", ".join(
            f"{op} {d:.3f} s ({100 * d / prof['total']:.0f} %, {n})" for op, d, n in prof["ops"]))


if __name__ == "__main__":
    main()
