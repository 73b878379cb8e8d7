"""Write a full-size random-weight checkpoint and report time, throughput and peak RSS.

    .venv/bin/python bench/synthetic_write.py --preset deepseek-vl2 --out /tmp/syn-base [--keep]

The issue budget: the full Base (27.5B parameters, bf16, ~55 GB) streams to disk in under 4 GB of RAM.
"""

import argparse
import json
import platform
import resource
import shutil
import time
from pathlib import Path

from vl2edge import synthetic
from vl2edge.presets import PRESETS
from vl2edge.weights import disk_size


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="deepseek-vl2", choices=PRESETS)
    ap.add_argument("--out", required=True)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--keep", action="store_true", help="keep the written checkpoint")
    a = ap.parse_args()
    t0 = time.perf_counter()
    synthetic.write_model(a.preset, a.out, dtype=a.dtype, progress=True)
    secs = time.perf_counter() - t0
    size = disk_size(a.out)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    row = {"preset": a.preset, "dtype": a.dtype, "bytes": size, "seconds": round(secs, 1),
           "MB_per_s": round(size / secs / 1e6, 1), "peak_rss_GB": round(peak / 1e9, 3),
           "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
           "date": time.strftime("%Y-%m-%d")}
    print(f"| {a.preset} | {a.dtype} | {size / 1e9:.2f} GB | {secs:.0f} s | {row['MB_per_s']} MB/s | "
          f"{row['peak_rss_GB']} GB |")
    Path("bench/out").mkdir(parents=True, exist_ok=True)
    Path(f"bench/out/synthetic_write_{a.preset}.json").write_text(json.dumps(row, indent=2))
    if not a.keep:
        shutil.rmtree(a.out)


if __name__ == "__main__":
    main()
