"""Pages per minute of `vl2edge batch` over a folder of rendered PDF pages: unbatched, batched, and on Ray.

    .venv/bin/python bench/batch_throughput.py [--model models/syn-tiny-onnx] [--pages 8] [--max-new-tokens 64]
                                               [--max-batch 8] [--actors 2]

Writes a PDF of `--pages` text pages (768x1024 px at 144 dpi, what `batch` renders them back to: 7 tiles
each), then runs the same job three ways, each `vl2edge batch` in its own process, timed end to end
(start-up and model load included, reported apart from the steady rate):
  1. `--max-batch 1`: one page at a time;  2. `--max-batch N`: the engine;  3. `--ray --actors A`: Ray Data
  on a Ray instance started by the job (each actor: 1 CPU, 1 thread, its own engine).
Also prints the per-page cost split (vision + prefill = time to first token, decode) from the records'
timings, which is the cost model for N machines: pages/min ~ N x 60 / (seconds per page on one machine),
plus a fixed Ray start-up. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import batch_job, make_pdf  # noqa: E402


def run(cmd: list[str], out: Path) -> dict:
    wall, records = batch_job(cmd, out)
    t = [r["timings"] for r in records if "timings" in r]
    return {"pages": len(records), "wall_s": round(wall, 1), "pages_per_min": round(60 * len(records) / wall, 2),
            "ttft_s_median": round(statistics.median(x["ttft_s"] for x in t), 2),
            "decode_s_median": round(statistics.median(x["total_s"] - x["ttft_s"] for x in t), 2),
            "answer_s_median": round(statistics.median(x["total_s"] for x in t), 2)}


def main():
    ap = argparse.ArgumentParser()
    default = ROOT / "models" / "syn-tiny-onnx"
    ap.add_argument("--model", default=str(default if default.is_dir() else ROOT / "models" / "demo-tiny"))
    ap.add_argument("--pages", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--actors", type=int, default=2)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "pages"
        folder.mkdir()
        make_pdf(folder / "doc.pdf", a.pages)
        base = [sys.executable, "-m", "vl2edge", "batch", "--model", a.model, str(folder), "--prompt",
                "Transcribe the text.", "--max-new-tokens", str(a.max_new_tokens), "--device", "cpu"]
        load = subprocess.run([sys.executable, "-c", f"import time, vl2edge; t = time.perf_counter(); "
                               f"vl2edge.load({a.model!r}, device='cpu'); print(time.perf_counter() - t)"],
                              cwd=ROOT, capture_output=True, text=True)
        rows = {"load_s": round(float(load.stdout.strip().splitlines()[-1]), 1)}
        modes = {"unbatched (--max-batch 1)": ["--max-batch", "1"],
                 f"batched (--max-batch {a.max_batch})": ["--max-batch", str(a.max_batch)],
                 f"Ray, {a.actors} actors (--max-batch {a.max_batch} each)":
                     ["--ray", "--actors", str(a.actors), "--cpus-per-actor", "1", "--max-batch", str(a.max_batch)]}
        for name, extra in modes.items():
            out = Path(tmp) / f"{len(rows)}.jsonl"
            rows[name] = run(base + ["--out", str(out)] + extra, out)
            print(name, json.dumps(rows[name]), flush=True)
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "model": a.model, "pages": a.pages,
              "max_new_tokens": a.max_new_tokens, **rows}
    print(json.dumps(result, indent=2))
    (ROOT / "bench" / "out").mkdir(parents=True, exist_ok=True)
    (ROOT / "bench" / "out" / "batch_throughput.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
