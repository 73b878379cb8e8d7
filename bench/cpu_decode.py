"""CPU decode and time to first token: PyTorch fp32/bf16 against the ONNX Runtime int4/int8 exports.

    .venv/bin/python bench/cpu_decode.py [--model models/syn-deepseek-vl2-tiny] [--runs 3] [--new-tokens 32]

Full-size random-weight DeepSeek-VL2-Tiny (written once into models/, exported once with
`vl2edge export`). One run measures, each backend in its own process: TTFT for a 384x384 and a
1024x768 image (processor + vision + prefill + first token), decode tokens/s after the 384x384 prompt,
peak RSS; and, for the roofline, the machine's read bandwidth and the bytes each backend reads per
decoded token (weights touched per token + the KV cache at that context).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def read_bandwidth() -> dict:
    """GB/s (1e9 B/s) reading 1 GiB: numpy in 2 threads over halves, and torch.sum with 2 threads."""
    import numpy as np

    a = np.ones(2**28, np.float32)
    out = {}

    def numpy2():
        halves = [a[: len(a) // 2], a[len(a) // 2:]]
        ts = [threading.Thread(target=h.sum) for h in halves]
        t = time.perf_counter()
        for th in ts:
            th.start()
        for th in ts:
            th.join()
        return a.nbytes / (time.perf_counter() - t) / 1e9
    out["numpy_2threads"] = statistics.median(numpy2() for _ in range(7))
    try:
        import torch

        torch.set_num_threads(2)
        t32 = torch.from_numpy(a)

        def torch_sum():
            t = time.perf_counter()
            t32.sum()
            return a.nbytes / (time.perf_counter() - t) / 1e9
        out["torch_2threads"] = statistics.median(torch_sum() for _ in range(7))
    except ImportError:
        pass
    out["best"] = max(out.values())
    return {k: round(v, 1) for k, v in out.items()}


def bytes_per_token(config, ctx: int, float_bytes: int, specs: dict | None = None) -> int:
    """Bytes of weights one decoded token reads (active experts only) plus its KV cache at `ctx`."""
    from vl2edge.quant.format import QuantSpec

    lc, specs = config.language_config, specs or {}
    total = 0
    for name, shape in config.tensor_shapes().items():
        if not name.startswith("language.") or name == "language.model.embed_tokens.weight":
            continue
        spec = specs.get(name)
        n = QuantSpec(**{k: spec[k] for k in ("bits", "block_size", "symmetric")}).nbytes(*shape) if spec \
            else math.prod(shape) * float_bytes
        if ".mlp.experts." in name:
            n = n * lc.num_experts_per_tok / lc.n_routed_experts
        total += n
    total += lc.hidden_size * 4  # one embedding row
    if lc.use_mla:
        total += lc.num_hidden_layers * ctx * (lc.kv_lora_rank + lc.qk_rope_head_dim) * float_bytes
    else:
        total += lc.num_hidden_layers * 2 * lc.num_key_value_heads * ctx * lc.head_dim * float_bytes
    return int(total)


def worker(kind: str, path: str, option: str, runs: int, new_tokens: int) -> dict:
    from bench.common import decode_rate, first_token
    from vl2edge.processor import Processor
    from vl2edge.synthetic import sample_image

    t0 = time.perf_counter()
    if kind == "torch":
        from vl2edge.models.loading import load_model

        model = load_model(path, dtype=option, device="cpu").model
        config, specs, fbytes = model.config, None, 2 if option == "bfloat16" else 4
    else:
        from vl2edge.onnx_backend import OnnxModel

        model = OnnxModel(path, vision=option)
        config, specs, fbytes = model.config, model.manifest["quantization"], 4
    proc = Processor.from_pretrained(path)
    load_s = time.perf_counter() - t0
    row = {"load_s": round(load_s, 1)}
    conv = [{"role": "<|User|>", "content": "<image>\nDescribe this image."}, {"role": "<|Assistant|>", "content": ""}]
    for size in ((384, 384), (1024, 768)):
        image, ttft, rates = sample_image().resize(size), [], []
        for _ in range(runs):
            seconds, T, tok, cache = first_token(model, proc, conv, image, new_tokens)
            ttft.append(seconds)
            if size == (384, 384):
                rates.append(decode_rate(model, tok, cache, new_tokens))
        row[f"ttft_{size[0]}x{size[1]}_s"] = round(statistics.median(ttft), 2)
        row[f"ttft_first_{size[0]}x{size[1]}_s"] = round(ttft[0], 2)  # the first call of a fresh process
        row[f"prompt_tokens_{size[0]}x{size[1]}"] = T
        if rates:
            row["decode_tok_s"] = round(statistics.median(rates), 2)
            row["bytes_per_token"] = bytes_per_token(config, T + new_tokens // 2, fbytes, specs)
    row.update(stage_rates(kind, model, proc, conv, runs))
    row["peak_rss_GB"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, 2)
    return row


def stage_rates(kind: str, model, proc, conv, runs: int) -> dict:
    """Seconds per vision tile (tiles of a 1024x768 prompt, one batch) and prefill tokens/s of that prompt."""
    import numpy as np

    from vl2edge.generate import prefill
    from vl2edge.synthetic import sample_image

    inp = proc(conv, [sample_image().resize((1024, 768))])
    tiles = np.asarray(inp.images[0])
    if kind == "torch":  # the torch model takes tensors
        import torch

        tiles = torch.from_numpy(tiles)
    embeds = model.embed(inp.input_ids, inp.images, inp.images_seq_mask, inp.images_spatial_crop)
    vision, fill = [], []
    for _ in range(runs):
        t = time.perf_counter()
        model.encode_tiles(tiles)
        vision.append((time.perf_counter() - t) / len(tiles))
        T = inp.input_ids.shape[1]
        t = time.perf_counter()
        prefill(model, embeds, inp.attention_mask, model.new_cache(1, T))
        fill.append(T / (time.perf_counter() - t))
    return {"vision_s_per_tile": round(statistics.median(vision), 3), "tiles_1024x768": len(tiles),
            "prefill_tok_s": round(statistics.median(fill), 1)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(ROOT / "models" / "syn-deepseek-vl2-tiny"))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--worker", nargs=3, metavar=("KIND", "PATH", "OPTION"))
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(*a.worker, a.runs, a.new_tokens)))
        return
    src = Path(a.model)
    if not (src / "config.json").is_file():
        from vl2edge.synthetic import write_model

        write_model("deepseek-vl2-tiny", src, dtype="bfloat16", progress=True)
    exports = {}
    for recipe in ("int4-experts", "int8"):
        out = src.parent / f"{src.name}-onnx-{recipe}"
        if not (out / "manifest.json").is_file():
            subprocess.run([sys.executable, "-m", "vl2edge.export", "--model", str(src), "--out", str(out),
                            "--recipe", recipe], check=True, cwd=ROOT)
        exports[recipe] = out
    bw = read_bandwidth()
    variants = [("torch fp32", "torch", src, "float32"), ("torch bf16", "torch", src, "bfloat16"),
                ("onnx int4-experts", "onnx", exports["int4-experts"], "vision"),
                ("onnx int4-experts, int8 vision", "onnx", exports["int4-experts"], "vision_int8"),
                ("onnx int8", "onnx", exports["int8"], "vision")]
    rows = []
    for label, kind, path, option in variants:
        r = subprocess.run([sys.executable, __file__, "--worker", kind, str(path), option, "--runs", str(a.runs),
                            "--new-tokens", str(a.new_tokens)], capture_output=True, text=True, cwd=ROOT)
        if r.returncode:
            raise SystemExit(f"{label}: {r.stderr[-2000:]}")
        row = {"variant": label, **json.loads(r.stdout.strip().splitlines()[-1])}
        row["roofline_tok_s"] = round(bw["best"] * 1e9 / row["bytes_per_token"], 1)
        row["of_roofline"] = round(row["decode_tok_s"] / row["roofline_tok_s"], 2)
        rows.append(row)
    print(f"\nCPU, full-size random DeepSeek-VL2-Tiny, {time.strftime('%Y-%m-%d')}, read bandwidth {bw} GB/s")
    print("| variant | load s | TTFT 384² s (first call) | TTFT 1024x768 s (first call) | s/tile | prefill tok/s | "
          "decode tok/s | MB/token | roofline tok/s | of roofline | peak RSS GB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['load_s']} | {r['ttft_384x384_s']} ({r['ttft_first_384x384_s']}) | "
              f"{r['ttft_1024x768_s']} ({r['ttft_first_1024x768_s']}) | {r['vision_s_per_tile']} | "
              f"{r['prefill_tok_s']} | {r['decode_tok_s']} | {r['bytes_per_token'] / 1e6:.0f} | "
              f"{r['roofline_tok_s']} | {r['of_roofline']:.0%} | {r['peak_rss_GB']} |")
    out = ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "cpu_decode.json").write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "bandwidth_GBps": bw,
                                                     "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
