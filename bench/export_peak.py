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


SUB = [""]
DETAIL = {"vl2edge.export.decoder": ("load_part", "_run_layer", "prepare", "trace_piece", "check_session",
                                     "_run_layer_onnx"),
          "vl2edge.export.build": ("_front", "_embeddings", "export_vision", "export_vision_int8", "_verify_vision",
                                   "_verify_decoder")}


def _label_calls() -> None:
    """Wrap the export's main functions so the sampler also knows which one runs (`step · function`)."""
    import importlib

    for module_name, names in DETAIL.items():
        module = importlib.import_module(module_name)
        for name in names:
            fn = getattr(module, name)

            def labelled(*args, _fn=fn, _name=name, **kw):
                SUB[0] = _name
                try:
                    return _fn(*args, **kw)
                finally:
                    SUB[0] = ""
            setattr(module, name, labelled)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--recipe", default="int4-experts")
    ap.add_argument("--vision", default="auto")
    ap.add_argument("--detail", action="store_true", help="also split each step by the export function running")
    a = ap.parse_args()
    from vl2edge.export.build import export

    if a.detail:
        _label_calls()

    show = tqdm.tqdm.set_postfix_str

    def record(bar, s="", refresh=True):
        STEP[0] = s.split("[")[0].strip() or STEP[0]
        return show(bar, s, refresh)

    tqdm.tqdm.set_postfix_str = record
    peaks: dict[str, int] = {}
    done = threading.Event()

    def sample():
        while not done.is_set():
            key = f"{STEP[0]} · {SUB[0]}" if SUB[0] else STEP[0]
            peaks[key] = max(peaks.get(key, 0), rss())
            time.sleep(0.05)

    threading.Thread(target=sample, daemon=True).start()
    t0 = time.perf_counter()
    export(a.model, a.out, a.recipe, vision=a.vision, overwrite=True, force=True)
    done.set()
    secs = time.perf_counter() - t0
    merged: dict[str, int] = {}
    for step, peak in peaks.items():
        key = step.split(" layer ")[0] + step.partition(" · ")[1] + step.partition(" · ")[2] \
            if " layer " in step else step
        merged[key] = max(merged.get(key, 0), peak)
    for step, peak in merged.items():
        print(f"{peak / 1e9:6.2f} GB  {step}")
    print(f"ru_maxrss {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9:.2f} GB, {secs:.0f} s")


if __name__ == "__main__":
    main()
