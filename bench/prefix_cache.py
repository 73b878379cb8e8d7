"""Issue 33's first-token targets: a follow-up question, and the same picture in a new conversation.

    .venv/bin/python bench/prefix_cache.py --model DIR [--runs 3] [--size 1024x768] [--json out.json]

DIR: an ONNX export (or a checkpoint: the CPU default exports it into the cache first). In one process, on
one generated page picture (`vl2edge.synthetic.sample_image`, resized), with the pipeline `vl2edge run`
uses, each run measures (greedy, the first token's time as `Result.timings["ttft_s"]`):

- `first`: the first question about a fresh page (a new picture each run, so nothing is cached);
- `follow_up`: the next turn of that conversation, with the prefix cache (its `cached_tokens` reported);
- `follow_up_uncached`: the same turn on a second pipeline with `prefix_cache=0` (today's cost);
- `new_conversation`: another question about the same picture in a new conversation, with the cache;
- `text_only`: that question's text without the picture (the target: new_conversation <= text_only + 0.3 s).

Reported: medians, min and max over `--runs`, and the machine (`lscpu` model name). Run it alone.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return "unknown"
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--size", default="1024x768")
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()

    from PIL import ImageOps

    from vl2edge.pipeline import load
    from vl2edge.synthetic import sample_image

    w, h = (int(v) for v in a.size.split("x"))
    cached, plain = load(a.model), load(a.model, prefix_cache=0)
    times: dict[str, list[float]] = {k: [] for k in ("first", "follow_up", "follow_up_uncached", "new_conversation",
                                                     "text_only")}
    hits: dict[str, list[int]] = {"follow_up": [], "new_conversation": []}
    prompt_tokens = 0
    for run in range(a.runs + 1):  # run 0 warms the sessions up and is not counted
        page = sample_image().resize((w, h))
        page = ImageOps.mirror(page) if run % 2 else page
        page.putpixel((run, 0), (run % 256, 0, 0))  # a new picture each run: nothing cached before `first`
        ask = [{"role": "user", "content": "<image>\nDescribe this page."}]
        r1 = cached.chat(ask, [page], max_new_tokens=a.new_tokens)
        turn = ask + [{"role": "assistant", "content": r1.text}, {"role": "user", "content": "What is its title?"}]
        r2 = cached.chat(turn, [page], max_new_tokens=a.new_tokens)
        r2u = plain.chat(turn, [page], max_new_tokens=a.new_tokens)
        other = [{"role": "user", "content": "<image>\nWhich colours does it use?"}]
        r3 = cached.chat(other, [page], max_new_tokens=a.new_tokens)
        r4 = cached.chat([{"role": "user", "content": "Which colours does it use?"}], [], max_new_tokens=a.new_tokens)
        if r2.token_ids != r2u.token_ids:
            raise SystemExit("the follow-up's answer changed with the cache: " + repr((r2.text, r2u.text)))
        if run == 0:
            continue
        prompt_tokens = r1.prompt_tokens
        for k, r in (("first", r1), ("follow_up", r2), ("follow_up_uncached", r2u), ("new_conversation", r3),
                     ("text_only", r4)):
            times[k].append(r.timings["ttft_s"])
        hits["follow_up"].append(r2.cached_tokens)
        hits["new_conversation"].append(r3.cached_tokens)
    report = {"machine": cpu_name(), "model": a.model, "size": a.size, "runs": a.runs, "prompt_tokens": prompt_tokens,
              "ttft_s": {k: {"median": round(statistics.median(v), 3), "min": round(min(v), 3), "max": round(max(v), 3)}
                         for k, v in times.items()},
              "cached_tokens": {k: statistics.median(v) for k, v in hits.items()},
              "prefix_cache": cached.prefix_cache.stats() if cached.prefix_cache else None}
    print(json.dumps(report, indent=2))
    if a.json:
        a.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
