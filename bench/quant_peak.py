"""Peak RAM of `vl2edge quantize` on Base-sized tensors, without 80 GB of disk.

    .venv/bin/python bench/quant_peak.py [--layers 2] [--out /tmp/quant-peak]

The converter streams tensor by tensor in row chunks, so its peak is set by the largest tensors, not
by the model size. This writes a random checkpoint with DeepSeek-VL2 (Base)'s exact tensor shapes —
the 129280x2560 embedding and lm_head, 72 experts of 1536x2560 per MoE layer, the 12288-wide dense
FFN, the full vision tower — but only `--layers` decoder layers, converts it with each recipe and
reports time and peak RSS of each conversion (separate processes).
"""

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main():
    from vl2edge.presets import preset
    from vl2edge.synthetic import write_model
    from vl2edge.weights import disk_size

    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--out", default="/tmp/quant-peak")
    a = ap.parse_args()
    out = Path(a.out)
    src = out / "src"
    cfg = preset("deepseek-vl2").replace(language_config={"num_hidden_layers": a.layers})
    write_model(cfg, src, dtype="bfloat16", progress=True)
    rows = []
    for recipe in ("int8", "int4-experts"):
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-c", "import resource, sys; from vl2edge.cli import main; "
                            "main(['quantize', *sys.argv[1:]]); "
                            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)",
                            str(src), str(out / recipe), "--recipe", recipe], capture_output=True, text=True,
                           cwd=ROOT, check=True)
        rows.append({"recipe": recipe, "source_GB": round(disk_size(src) / 1e9, 2),
                     "output_GB": round(disk_size(out / recipe) / 1e9, 2),
                     "seconds": round(time.perf_counter() - t0, 1),
                     "peak_rss_GB": round(int(r.stdout.split()[-1]) * 1024 / 1e9, 2)})
        shutil.rmtree(out / recipe)
    shutil.rmtree(src)
    print(f"\nBase-shaped tensors, {a.layers} decoder layers, {time.strftime('%Y-%m-%d')}")
    print("| recipe | source GB | output GB | time s | peak RSS GB |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['recipe']} | {r['source_GB']} | {r['output_GB']} | {r['seconds']} | {r['peak_rss_GB']} |")
    (ROOT / "bench" / "out").mkdir(parents=True, exist_ok=True)
    (ROOT / "bench" / "out" / "quant_peak.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
