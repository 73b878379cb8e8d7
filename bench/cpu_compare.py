"""The official DeepSeek-VL2 code against vl2edge on the CPU, on one checkpoint, in one run.

    python bench/cpu_compare.py --ckpt models/syn-tiny --ref-python /tmp/vl2ref/venv/bin/python \
        [--ref-src /tmp/vl2ref/src] [--proj-model DIR] [--reps 2] [--new 32] [--sizes 384x384,1024x768,letter]

Every measurement is its own fresh process (what a CLI user gets: the first call of a process), sides
alternating A B A B. A process loads the model, answers one image prompt with one new token (TTFT, for
one image size), then a text prompt with 1 and with N+1 new tokens (decode tok/s = N / (t(N+1) - t(1)))
and reports its peak RSS. `letter` is a 144-dpi US Letter page (1224x1584, ten tiles), the document
case. vl2edge runs what `vl2edge run --model CKPT` runs on a CPU (the cached int4-experts ONNX export;
build it once beforehand, or pass an export as --proj-model; --proj-vision float,int8 measures each vision
graph as a side of its own). Prints medians, the spread (min-max) and the ratios vl2edge/official.
Only a quiet machine gives numbers worth reporting.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZES = {"384x384": (384, 384), "1024x768": (1024, 768), "letter": (1224, 1584)}

# One measurement, run by either side's interpreter: argv = side model width height new_tokens [vision graph].
CHILD = r'''
import json, os, resource, sys, time
side, model, w, h, new = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
vision = sys.argv[6] if len(sys.argv) > 6 and sys.argv[6] != "-" else None
from PIL import Image, ImageDraw
page = Image.new("RGB", (w, h), "white")
draw = ImageDraw.Draw(page)
for y in range(40, h - 40, 28):  # a page of ruled text-like strokes
    for x in range(40, w - 120, 90):
        draw.rectangle([x, y, x + 60 + (x * y) % 25, y + 10], fill=(20, 20, 20))
ASK = [{"role": "<|User|>", "content": "<image>\nTranscribe this page."}, {"role": "<|Assistant|>", "content": ""}]
TALK = [{"role": "<|User|>", "content": "Write a long story about a lighthouse keeper."},
        {"role": "<|Assistant|>", "content": ""}]
t0 = time.perf_counter()
if side == "official":
    import torch
    from deepseek_vl2.models import DeepseekVLV2ForCausalLM, DeepseekVLV2Processor
    torch.set_num_threads(os.cpu_count())
    processor = DeepseekVLV2Processor.from_pretrained(model)
    net = DeepseekVLV2ForCausalLM.from_pretrained(model, torch_dtype=torch.float32).eval()
    tok = processor.tokenizer

    def answer(conversation, images, k):
        with torch.no_grad():
            inputs = processor(conversations=conversation, images=images, force_batchify=True, system_prompt="")
            embeds = net.prepare_inputs_embeds(input_ids=inputs.input_ids, images=inputs.images.float(),
                                               images_seq_mask=inputs.images_seq_mask,
                                               images_spatial_crop=inputs.images_spatial_crop)
            out = net.language.generate(inputs_embeds=embeds, attention_mask=inputs.attention_mask,
                                        pad_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                                        eos_token_id=tok.eos_token_id, max_new_tokens=k, min_new_tokens=k,
                                        do_sample=False, use_cache=True)
        return out.shape[1]
else:
    import vl2edge
    from vl2edge.generate import generate
    pipe = vl2edge.load(model, vision=vision)

    def answer(conversation, images, k):  # exactly k tokens, as min_new_tokens makes the official side do
        inputs = pipe.processor(conversation, images)
        embeds = pipe.backend.embed(inputs.input_ids, inputs.images, inputs.images_seq_mask,
                                    inputs.images_spatial_crop)
        return sum(1 for _ in generate(pipe.backend, embeds, inputs.attention_mask, max_new_tokens=k, eos_id=None))
load_s = time.perf_counter() - t0
t0 = time.perf_counter(); answer(ASK, [page], 1); ttft = time.perf_counter() - t0
t0 = time.perf_counter(); answer(TALK, [], 1); one = time.perf_counter() - t0
t0 = time.perf_counter(); n = answer(TALK, [], new + 1); many = time.perf_counter() - t0
assert n == new + 1, n
print("RESULT " + json.dumps({"load_s": load_s, "ttft_s": ttft, "decode_tok_s": new / max(many - one, 1e-9),
                              "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
'''


def measure(python: str, side: str, model: str, size: tuple[int, int], new: int, env: dict,
            vision: str | None = None) -> dict:
    r = subprocess.run([python, "-c", CHILD, side, model, str(size[0]), str(size[1]), str(new), vision or "-"],
                       capture_output=True, text=True, env=env, cwd=ROOT)
    line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
    if r.returncode or line is None:
        raise SystemExit(f"{side} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="float checkpoint in the official layout")
    ap.add_argument("--ref-python", required=True, help="python of the official code's venv")
    ap.add_argument("--ref-src", default=os.environ.get("VL2REF_SRC", "/tmp/vl2ref/src"),
                    help="the official sources (deepseek-ai/DeepSeek-VL2 at ef9f91e)")
    ap.add_argument("--proj-python", default=sys.executable)
    ap.add_argument("--proj-model", default=None, help="what vl2edge loads (default: --ckpt, i.e. the CPU default)")
    ap.add_argument("--proj-vision", default="default",
                    help="vl2edge's vision graphs to measure, comma-separated: default (the export's own choice), "
                         "float, int8; each is a side of its own")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--sizes", default="384x384,1024x768,letter")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "cpu_compare.json"))
    a = ap.parse_args()
    sides = {"official": (a.ref_python, a.ckpt, {**os.environ, "PYTHONPATH": a.ref_src}, None)}
    for v in a.proj_vision.split(","):
        name = "vl2edge" if v == "default" else f"vl2edge {v} vision"
        sides[name] = (a.proj_python, a.proj_model or a.ckpt, dict(os.environ), None if v == "default" else v)
    rows: dict[tuple[str, str], list[dict]] = {}
    for size in a.sizes.split(","):
        for rep in range(a.reps):
            for side, (python, model, env, vision) in sides.items():  # A B A B
                r = measure(python, "official" if side == "official" else "vl2edge", model, SIZES[size], a.new, env,
                            vision)
                rows.setdefault((side, size), []).append(r)
                print(json.dumps({"side": side, "size": size, "rep": rep, **r}), flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps([{"side": s, "size": z, "runs": v} for (s, z), v in rows.items()], indent=1))
    print("\n| size | side | TTFT s | decode tok/s | peak RSS GiB | load s |")
    print("|---|---|---|---|---|---|")
    for (side, size), runs in rows.items():
        print(f"| {size} | {side} | " + " | ".join(summary([r[k] for r in runs]) for k in
                                                  ("ttft_s", "decode_tok_s", "peak_rss_gb", "load_s")) + " |")
    print("\n| size | side | TTFT official/vl2edge | decode vl2edge/official | RSS vl2edge/official |")
    print("|---|---|---|---|---|")

    def med(runs, k):
        return statistics.median(r[k] for r in runs)
    for size in a.sizes.split(","):
        o = rows["official", size]
        for side in (s for s in sides if s != "official"):
            v = rows[side, size]
            print(f"| {size} | {side} | {med(o, 'ttft_s') / med(v, 'ttft_s'):.2f}x | "
                  f"{med(v, 'decode_tok_s') / med(o, 'decode_tok_s'):.2f}x | "
                  f"{med(v, 'peak_rss_gb') / med(o, 'peak_rss_gb'):.2f} |")


if __name__ == "__main__":
    main()
