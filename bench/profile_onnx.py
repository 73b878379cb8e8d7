"""Where an exported graph's time goes: onnxruntime's profiler over a decoder prefill (or a vision run),
summed per op type and per node, printed as a table and written as JSON.

    python bench/profile_onnx.py EXPORT_DIR --tokens 438 1432 [--threads 2] [--runs 2]
    python bench/profile_onnx.py EXPORT_DIR --vision vision_int8 --tiles 2

The first run of each size is a warm-up (not profiled); the next `--runs` are summed and averaged.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from vl2edge.artifact import read_manifest


def kernel_events(trace: Path) -> list[dict]:
    """The profiler's per-node kernel events (name, op_name, provider, dur in µs)."""
    return [ev for ev in json.loads(trace.read_text())
            if ev.get("cat") == "Node" and ev["name"].endswith("_kernel_time")]


def summarise(trace: Path) -> tuple[dict, dict]:
    by_op, by_node = defaultdict(float), defaultdict(float)
    for ev in kernel_events(trace):
        by_op[ev["args"]["op_name"]] += ev["dur"] / 1e6
        by_node[ev["name"][:-len("_kernel_time")]] += ev["dur"] / 1e6
    return dict(by_op), dict(by_node)


def session(path: Path, threads: int, profile_dir: str | None, providers: tuple[str, ...] = ("CPUExecutionProvider",)):
    import onnxruntime as ort

    o = ort.SessionOptions()
    o.intra_op_num_threads = threads
    o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if profile_dir:
        o.enable_profiling = True
        o.profile_file_prefix = os.path.join(profile_dir, "p")
    return ort.InferenceSession(str(path), o, providers=list(providers))


def decoder_feeds(root: Path, T: int) -> dict:
    m = read_manifest(root)
    io = m["graphs"]["decoder"]
    D = m["dims"]["hidden_size"]
    shape = list(io["cache"]["shape"])
    shape[0], shape[io["cache"]["sequence_axis"]] = 1, 0
    rng = np.random.default_rng(0)
    feeds = {"inputs_embeds": (rng.standard_normal((1, T, D)) * 0.02).astype(np.float32),
             "attention_mask": np.ones((1, T), np.int64)}
    feeds |= {n: np.zeros([int(s) for s in shape], np.float32) for n in io["past"]}
    return feeds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("export", type=Path)
    ap.add_argument("--tokens", type=int, nargs="*", default=[438, 1432])
    ap.add_argument("--vision", default=None, help="profile this vision graph instead of the decoder")
    ap.add_argument("--tiles", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    m = read_manifest(a.export)
    name = a.vision or "decoder"
    sizes = [a.tiles] if a.vision else a.tokens
    report = {}
    for size in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            s = session(a.export / m["graphs"][name]["file"], a.threads, tmp)
            if a.vision:
                S = m["dims"]["image_size"]
                feeds = {"pixel_values": np.random.default_rng(0).standard_normal((size, 3, S, S)).astype(np.float32)}
            else:
                feeds = decoder_feeds(a.export, size)
            s.run(None, feeds)  # warm-up
            wall = []
            for _ in range(a.runs):
                t = time.perf_counter()
                s.run(None, feeds)
                wall.append(time.perf_counter() - t)
            by_op, by_node = summarise(Path(s.end_profiling()))
        # the warm-up is in the trace too: scale the sums to one profiled run
        scale = 1 / (a.runs + 1)
        by_op = {k: v * scale for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])}
        by_node = dict(sorted(((k, v * scale) for k, v in by_node.items()), key=lambda kv: -kv[1])[:a.top])
        total = sum(by_op.values())
        print(f"\n{name} at {size} {'tiles' if a.vision else 'tokens'}: wall median {float(np.median(wall)):.3f} s "
              f"(runs {', '.join(f'{w:.3f}' for w in wall)}), kernels {total:.3f} s per run (incl. warm-up share)")
        for k, v in list(by_op.items())[:a.top]:
            print(f"  {k:28s} {v:7.3f} s  {100 * v / total:5.1f} %")
        print("  top nodes:")
        for k, v in by_node.items():
            print(f"    {k[:60]:60s} {v:7.3f} s")
        report[str(size)] = {"wall_s": wall, "by_op_s": by_op, "top_nodes_s": by_node}
    if a.json:
        a.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
