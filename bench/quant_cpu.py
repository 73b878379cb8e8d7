"""Quantized checkpoints on the CPU (PyTorch backend): size, conversion cost, TTFT, decode tokens/s, peak RSS.

    .venv/bin/python bench/quant_cpu.py [--model models/syn-deepseek-vl2-tiny] [--runs 3] [--new-tokens 32]

One run compares the bf16 full-size random DeepSeek-VL2-Tiny with its `int8` and `int4-experts`
conversions (written next to it by `vl2edge quantize`, timed, peak RSS of the conversion recorded).
Each model runs in its own process (bench/cpu_torch.py's worker), so peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def convert(src: Path, recipe: str) -> dict:
    dst = src.parent / f"{src.name}-{recipe}"
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", "import resource, sys; from vl2edge.cli import main; "
                        "main(['quantize', *sys.argv[1:]]); print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)",
                        str(src), str(dst), "--recipe", recipe], capture_output=True, text=True, cwd=ROOT)
    if r.returncode:
        raise SystemExit(r.stderr)
    return {"dir": str(dst), "convert_s": round(time.perf_counter() - t0, 1),
            "convert_peak_rss_GB": round(int(r.stdout.split()[-1]) * 1024 / 1e9, 2)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(ROOT / "models" / "syn-deepseek-vl2-tiny"))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=32)
    a = ap.parse_args()
    from vl2edge.weights import disk_size

    src = Path(a.model)
    if not (src / "config.json").is_file():
        from vl2edge.synthetic import write_model

        write_model("deepseek-vl2-tiny", src, dtype="bfloat16", progress=True)
    variants = [("bf16", {"dir": str(src)}, "bfloat16")]
    for recipe in ("int8", "int4-experts"):
        variants.append((recipe, convert(src, recipe), "bfloat16"))
    variants.append(("int4-experts (fp32 compute)", variants[-1][1], "float32"))
    rows = []
    for label, info, dtype in variants:
        r = subprocess.run([sys.executable, str(ROOT / "bench" / "cpu_torch.py"), "--model", info["dir"], "--worker",
                            dtype, "--runs", str(a.runs), "--new-tokens", str(a.new_tokens)],
                           capture_output=True, text=True, check=True)
        row = json.loads(r.stdout.strip().splitlines()[-1])
        rows.append({"variant": label, "checkpoint_GB": round(disk_size(info["dir"]) / 1e9, 2), **info, **row})
    print(f"\nPyTorch CPU, full-size random DeepSeek-VL2-Tiny, 384x384 image, {time.strftime('%Y-%m-%d')}")
    print("| variant | compute dtype | checkpoint GB | convert s (peak RSS GB) | load s | TTFT s | decode tok/s | "
          "peak RSS GB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        conv = f"{r['convert_s']} ({r['convert_peak_rss_GB']})" if "convert_s" in r else "-"
        print(f"| {r['variant']} | {r['dtype']} | {r['checkpoint_GB']} | {conv} | {r['load_s']} | {r['ttft_s']} | "
              f"{r['decode_tok_s']} | {r['peak_rss_GB']} |")
    out = ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "quant_cpu.json").write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
