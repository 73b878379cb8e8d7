"""Full-size variants on this machine, as a user runs them: write the random checkpoint, `vl2edge export`
(int4-experts), then `vl2edge run` on a 384x384 and a 1024x768 picture; each step a process of its own
under /usr/bin/time (wall time and peak RSS), every row appended to bench/out/full_size.jsonl. Steps whose
output exists are skipped, so a killed run resumes.

    .venv/bin/python bench/full_size.py --preset deepseek-vl2-tiny --root /work/fullsize [--runs 3]
    .venv/bin/python bench/full_size.py --preset deepseek-vl2-small --root /work/fullsize --torch
    .venv/bin/python bench/full_size.py --preset deepseek-vl2 --root /work/fullsize --generated

Decode is set against the bandwidth roofline: the bytes the export reads per token (`vl2edge.info.sizes`
per_token of the recipe) over this machine's quiet read bandwidth (--bandwidth GB/s, measured apart).
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VL2EDGE = [str(ROOT / ".venv/bin/vl2edge")]
PY = str(ROOT / ".venv/bin/python")
OUT = ROOT / "bench/out/full_size.jsonl"


def timed(cmd: list[str], log: Path) -> dict:
    """Run `cmd` under /usr/bin/time -v: its wall seconds, peak RSS (GB) and exit status; output to `log`."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.call(["/usr/bin/time", "-v", *cmd], stdout=f, stderr=subprocess.STDOUT)
    text = log.read_text(errors="replace")
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    return {"rc": rc, "seconds": round(time.perf_counter() - t0, 1),
            "peak_rss_GB": round(int(peak[1]) * 1024 / 1e9, 2) if peak else None}


def row(**kw) -> None:
    kw |= {"date": time.strftime("%Y-%m-%d %H:%M"), "cpu": cpu_name()}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with open(OUT, "a") as f:
        f.write(json.dumps(kw) + "\n")
    print(json.dumps(kw), flush=True)


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return re.search(r"Model name:\s*(.+)", out)[1].strip()
    except (OSError, TypeError):
        return platform.processor()


def answer(model: Path, image: Path, log: Path, extra: list[str]) -> dict:
    r = timed([*VL2EDGE, "run", "--model", str(model), "--image", str(image), "--prompt", "Describe this image.",
               "--max-new-tokens", "32", "--json", *extra], log)
    text = log.read_text(errors="replace")
    start = text.find("{\n")
    if r["rc"] == 0 and start >= 0:
        res = json.loads(text[start:text.rindex("}") + 1])
        t = res["timings"]
        r |= {"prompt_tokens": res["prompt_tokens"], "ttft_s": t.get("ttft_s"), "decode_tok_s": t.get("decode_tok_s")}
    return r


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", required=True)
    ap.add_argument("--root", type=Path, required=True)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--torch", action="store_true", help="also `--backend torch --quant int4-experts`")
    ap.add_argument("--bandwidth", type=float, default=None, help="quiet read bandwidth, GB/s")
    ap.add_argument("--generated", action="store_true",
                    help="a generated checkpoint (values made when read; Base's 55 GB need not fit the disk)")
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from vl2edge.info import sizes
    from vl2edge.presets import preset
    from vl2edge.synthetic import sample_image

    ck, onnx = a.root / a.preset, a.root / f"{a.preset}-onnx"
    a.root.mkdir(parents=True, exist_ok=True)
    logs = a.root / "logs"
    logs.mkdir(exist_ok=True)
    images = {}
    for w, h in ((384, 384), (1024, 768)):
        images[f"{w}x{h}"] = p = a.root / f"image-{w}x{h}.png"
        if not p.exists():
            sample_image(w, h).save(p)
    if not (ck / "config.json").exists():
        r = timed([PY, "-m", "vl2edge.synthetic", "--preset", a.preset, "--out", str(ck), "--dtype", "bfloat16",
                   *(["--generated"] if a.generated else [])],
                  logs / "write.log")
        row(preset=a.preset, step="write checkpoint", **r)
    if not (onnx / "manifest.json").exists():
        r = timed([*VL2EDGE, "export", "--model", str(ck), "--out", str(onnx), "--overwrite"], logs / "export.log")
        row(preset=a.preset, step="export int4-experts", **r)
    per_token = sizes(preset(a.preset), "int4-experts", 4)["per_token"]
    for name, image in images.items():
        for i in range(a.runs):
            r = answer(onnx, image, logs / f"run-{name}-{i}.log", [])
            if a.bandwidth and r.get("decode_tok_s"):
                r["roofline_share"] = round(r["decode_tok_s"] * per_token / (a.bandwidth * 1e9), 3)
            row(preset=a.preset, step=f"run onnx {name}", run=i, per_token_GB=round(per_token / 1e9, 2), **r)
    if a.torch:
        for name, image in images.items():
            r = answer(ck, image, logs / f"torch-{name}.log", ["--backend", "torch", "--quant", "int4-experts"])
            row(preset=a.preset, step=f"run torch int4-experts {name}", **r)


if __name__ == "__main__":
    main()
