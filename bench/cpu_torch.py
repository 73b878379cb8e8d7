"""PyTorch backend on the CPU: time to first token for a 384x384 image, decode tokens/s, peak RSS.

    .venv/bin/python bench/cpu_torch.py [--model models/syn-deepseek-vl2-tiny] [--runs 3] [--new-tokens 32]
    .venv/bin/python bench/cpu_torch.py --dtypes bfloat16 --static     # + the static decode step, same process

Uses a full-size random-weight DeepSeek-VL2-Tiny in bf16 (written once into models/ if missing). Each
dtype runs in its own process so peak RSS is its own. Medians over --runs. Random weights never
stop early: eos is ignored so every run decodes --new-tokens tokens. `--static` also times, in the same
process and after the same prompt, the static decode step (vl2edge/models/decode_step.py) run eagerly
and compiled with `torch.compile(fullgraph=True)` (inductor): is it worth taking on the CPU too?
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def static_rates(model, inp, tok, runs: int, new_tokens: int) -> dict:
    """Decode tok/s of the static step, eager and compiled, after the prompt `inp` (runs x new_tokens each)."""
    import torch

    from bench.common import decode_rate
    from vl2edge.models.decode_step import DecodeStep, StaticDecoder

    dec = StaticDecoder(model, graph=False)
    T = inp.input_ids.shape[1]
    big = dec.new_cache(1, T + (2 * runs + 1) * new_tokens + 1)
    embeds = model.embed(inp.input_ids, inp.images, inp.images_seq_mask, inp.images_spatial_crop)
    dec.prefill(embeds, big, inp.attention_mask)
    eager_static = [decode_rate(dec, tok, big, new_tokens) for _ in range(runs)]
    step = DecodeStep(model.language, big)
    compiled = torch.compile(step.run, fullgraph=True)

    def one(t):
        step.cursor.fill_(big.length)
        out = compiled(torch.tensor([[int(t[0])]]))
        big.commit(1)
        return out.float().numpy().argmax(-1)

    with torch.no_grad():
        t0 = time.perf_counter()
        tok = one(tok)
        compile_s = time.perf_counter() - t0
        rates = []
        for _ in range(runs):
            t0 = time.perf_counter()
            for _ in range(new_tokens - 1):
                tok = one(tok)
            rates.append((new_tokens - 1) / (time.perf_counter() - t0))
    return {"static_tok_s": round(statistics.median(eager_static), 2),
            "compiled_tok_s": round(statistics.median(rates), 2), "compile_s": round(compile_s, 1)}


def worker(model_dir: str, dtype: str, runs: int, new_tokens: int, static: bool = False) -> dict:
    import torch

    from bench.common import decode_rate, first_token
    from vl2edge.models.loading import load_model
    from vl2edge.processor import Processor
    from vl2edge.synthetic import sample_image

    t0 = time.perf_counter()
    model = load_model(model_dir, dtype=dtype, device="cpu").model
    proc = Processor.from_pretrained(model_dir)
    load_s = time.perf_counter() - t0
    image = sample_image().resize((384, 384))
    conv = [{"role": "<|User|>", "content": "<image>\nDescribe this image."}, {"role": "<|Assistant|>", "content": ""}]
    ttft, vision, tok_s = [], [], []
    for _ in range(runs):
        t0 = time.perf_counter()
        inp = proc(conv, [image])
        model.embed(inp.input_ids, inp.images, inp.images_seq_mask, inp.images_spatial_crop)
        vision.append(time.perf_counter() - t0)
        seconds, T, tok, cache = first_token(model, proc, conv, image, new_tokens)
        ttft.append(seconds)
        tok_s.append(decode_rate(model, tok, cache, new_tokens))
    extra = static_rates(model, inp, tok, runs, new_tokens) if static else {}
    return {**extra, "dtype": dtype, "load_s": round(load_s, 1), "prompt_tokens": T,
            "ttft_s": round(statistics.median(ttft), 3), "vision_s": round(statistics.median(vision), 3),
            "decode_tok_s": round(statistics.median(tok_s), 2), "runs": runs, "new_tokens": new_tokens,
            "threads": torch.get_num_threads(),
            "peak_rss_GB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, 2),
            "all_ttft_s": [round(x, 3) for x in ttft], "all_tok_s": [round(x, 2) for x in tok_s]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(ROOT / "models" / "syn-deepseek-vl2-tiny"))
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--worker", metavar="DTYPE")
    ap.add_argument("--static", action="store_true", help="also time the static decode step, eager and compiled")
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.model, a.worker, a.runs, a.new_tokens, a.static)))
        return
    if not (Path(a.model) / "config.json").is_file():
        from vl2edge.synthetic import write_model

        write_model("deepseek-vl2-tiny", a.model, dtype="bfloat16", progress=True)
    rows = []
    for dtype in a.dtypes.split(","):
        r = subprocess.run([sys.executable, __file__, "--model", a.model, "--worker", dtype, "--runs", str(a.runs),
                            "--new-tokens", str(a.new_tokens), *(["--static"] if a.static else [])],
                           capture_output=True, text=True, check=True)
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
    machine = platform.processor() or platform.machine()
    print(f"\nPyTorch CPU, full-size random DeepSeek-VL2-Tiny, 384x384 image, {machine}, {time.strftime('%Y-%m-%d')}")
    print("| dtype | load s | prompt tok | TTFT s (median) | of which vision+embed s | decode tok/s (median) | "
          "peak RSS GB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['dtype']} | {r['load_s']} | {r['prompt_tokens']} | {r['ttft_s']} | {r['vision_s']} | "
              f"{r['decode_tok_s']} | {r['peak_rss_GB']} |")
    for r in rows:
        if "static_tok_s" in r:
            print(f"{r['dtype']}: decode tok/s eager {r['decode_tok_s']}, static step {r['static_tok_s']}, "
                  f"static step compiled {r['compiled_tok_s']} (compile {r['compile_s']} s)")
    out = ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "cpu_torch.json").write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
