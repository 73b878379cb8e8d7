"""Where an export's peak resident memory is: the export in this process, RSS sampled every 50 ms against
the step its progress bar shows; prints the peak of each step (GB) and the whole run's ru_maxrss.

    .venv/bin/python bench/export_peak.py --model /work/fullsize/deepseek-vl2-tiny --out /tmp/tiny-onnx
"""

from __future__ import annotations

import argparse
import resource
import threading
import time
from pathlib import Path

import tqdm

STEP = ["start"]


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--recipe", default="int4-experts")
    ap.add_argument("--vision", default="auto")
    a = ap.parse_args()
    from vl2edge.export.build import export

    show = tqdm.tqdm.set_postfix_str

    def record(bar, s="", refresh=True):
        STEP[0] = s.split("[")[0].strip() or STEP[0]
        return show(bar, s, refresh)

    tqdm.tqdm.set_postfix_str = record
    peaks: dict[str, int] = {}
    done = threading.Event()

    def sample():
        while not done.is_set():
            peaks[STEP[0]] = max(peaks.get(STEP[0], 0), rss())
            time.sleep(0.05)

    threading.Thread(target=sample, daemon=True).start()
    t0 = time.perf_counter()
    export(a.model, a.out, a.recipe, vision=a.vision, overwrite=True, force=True)
    done.set()
    secs = time.perf_counter() - t0
    merged: dict[str, int] = {}
    for step, peak in peaks.items():
        key = step.split(" layer ")[0] if " layer " in step else step
        merged[key] = max(merged.get(key, 0), peak)
    for step, peak in merged.items():
        print(f"{peak / 1e9:6.2f} GB  {step}")
    print(f"ru_maxrss {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9:.2f} GB, {secs:.0f} s")


if __name__ == "__main__":
    main()
