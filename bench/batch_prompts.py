"""Issue 33's batch target: five prompts about every page of a document, as one `--prompts` job and as five jobs.

    .venv/bin/python bench/batch_prompts.py --model DIR [--pages 8] [--max-new-tokens 64] [--runs 1]

Writes a PDF of `--pages` Letter pages (1224x1584 px at 144 dpi, as `vl2edge batch` renders them) and five
invoice questions, then runs, each `vl2edge batch` in its own process timed end to end (start-up and model
load included; an untimed one-page job first), with the CLI's defaults otherwise (the batching engine, the
prefix cache):
  1. `--prompts FILE`: each page read once and asked the five prompts;
  2. the same five prompts as five jobs (`--prompt P`), one after the other.
Reported per run: wall seconds, pages/min (pages whose five answers are all in, per minute), answer tokens
(greedy, so both ways give the same answers: checked), and the ratio 1 over 2 measured in the same run.
Run it alone on a quiet machine; results to bench/out/batch_prompts.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import batch_job, make_pdf  # noqa: E402
from bench.prefix_cache import cpu_name  # noqa: E402

PROMPTS = ["What is the invoice number on the first line?", "What is the total on the last line?",
           "How many lines does the page have?", "Which page number is this?",
           "Transcribe the first line of the page."]
LETTER = (1224, 1584)  # 8.5 x 11 in at 144 dpi


def job(cmd: list[str], out: Path) -> tuple[float, dict]:
    """Run one `vl2edge batch` command: its wall seconds and its records keyed by (page, prompt)."""
    wall, records = batch_job(cmd, out)
    return wall, {(rec["page"], rec.get("prompt")): rec for rec in records}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--pages", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=1)
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        pdf, prompts = tmp_path / "invoices.pdf", tmp_path / "prompts.txt"
        make_pdf(pdf, a.pages, LETTER)
        prompts.write_text("\n".join(PROMPTS) + "\n")
        opts = ["--model", a.model, "--max-new-tokens", str(a.max_new_tokens), "--device", "cpu"]
        base = [sys.executable, "-m", "vl2edge", "batch", *opts, str(pdf)]
        warm = tmp_path / "warm.pdf"  # untimed: a checkpoint's export and the optimized-graph cache are made here
        make_pdf(warm, 1, LETTER)
        job([sys.executable, "-m", "vl2edge", "batch", *opts, str(warm), "--prompt", PROMPTS[0], "--out",
             str(tmp_path / "warm.jsonl")], tmp_path / "warm.jsonl")
        for run in range(a.runs):
            out = tmp_path / f"prompts-{run}.jsonl"
            once_s, once = job(base + ["--prompts", str(prompts), "--out", str(out)], out)
            apart_s, apart = 0.0, {}
            for i, p in enumerate(PROMPTS):
                out = tmp_path / f"job-{run}-{i}.jsonl"
                s, got = job(base + ["--prompt", p, "--out", str(out)], out)
                apart_s += s
                apart |= {(page, p): rec for (page, _), rec in got.items()}
            same = all(once[k]["answer"] == apart[k]["answer"] for k in apart) and once.keys() == apart.keys()
            tokens = sum(r["timings"]["new_tokens"] for r in once.values())
            row = {"prompts_file_s": round(once_s, 1), "five_jobs_s": round(apart_s, 1),
                   "prompts_file_pages_per_min": round(60 * a.pages / once_s, 2),
                   "five_jobs_pages_per_min": round(60 * a.pages / apart_s, 2),
                   "ratio": round(apart_s / once_s, 2), "answer_tokens": tokens, "same_answers": same}
            print(json.dumps(row), flush=True)
            rows.append(row)
    ratios = [r["ratio"] for r in rows]
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "cpu": cpu_name(), "model": a.model, "pages": a.pages,
              "prompts": len(PROMPTS), "max_new_tokens": a.max_new_tokens, "runs": rows,
              "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios)}
    print(json.dumps(result, indent=1))
    (ROOT / "bench" / "out").mkdir(parents=True, exist_ok=True)
    (ROOT / "bench" / "out" / "batch_prompts.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
