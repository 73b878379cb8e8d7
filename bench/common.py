"""Timing pieces the benchmark scripts share (any backend with the decoder interface and `embed`)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import numpy as np

from vl2edge.generate import prefill

ROOT = Path(__file__).resolve().parents[1]


def make_pdf(path, pages: int, size: tuple[int, int] = (768, 1024)) -> None:
    """A PDF of `pages` invoice-like text pages, `size` pixels at 144 dpi (what `vl2edge batch` renders them
    back to; Letter: 1224x1584)."""
    from PIL import Image, ImageDraw

    h = size[1]
    images = []
    for i in range(pages):
        im = Image.new("RGB", size, "white")
        d = ImageDraw.Draw(im)
        for line in range((h - 60) // 32):
            text = f"Page {i + 1}, line {line + 1}: invoice 4{i}{line:02d} total {17 * i + line}.00"
            d.text((40, 30 + 32 * line), text, fill="black")
        images.append(im)
    images[0].save(path, save_all=True, append_images=images[1:], resolution=144)


def batch_job(cmd: list[str], out) -> tuple[float, list[dict]]:
    """Run one `vl2edge batch` command (from the repository root) that writes `out`: its wall seconds and the
    records it wrote; a failed command ends the benchmark with its error."""
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    return wall, [json.loads(line) for line in Path(out).read_text().splitlines()]


def sync(device=None) -> None:
    if device is not None and getattr(device, "type", device) == "cuda":
        import torch

        torch.cuda.synchronize()


def first_token(model, proc, conv, image, extra_tokens: int, device=None):
    """Processor + vision + prefill + first token: (seconds, prompt tokens, first token, cache)."""
    sync(device)
    t0 = time.perf_counter()
    inp = proc(conv, [image])
    embeds = model.embed(inp.input_ids, inp.images, inp.images_seq_mask, inp.images_spatial_crop)
    T = inp.input_ids.shape[1]
    cache = model.new_cache(1, T + extra_tokens)
    tok = prefill(model, embeds, inp.attention_mask, cache).argmax(-1)
    return time.perf_counter() - t0, T, tok, cache


def ttft_and_decode(backend, proc, new_tokens: int, runs: int, device=None) -> dict:
    """Medians over `runs` of TTFT for a 1024x768 image prompt and decode tok/s over `new_tokens` after it."""
    import statistics

    from vl2edge.synthetic import sample_image

    image = sample_image().resize((1024, 768))
    conv = [{"role": "user", "content": "<image>\nDescribe this image."}]
    ttft, rates, T = [], [], 0
    for _ in range(runs):
        seconds, T, tok, cache = first_token(backend, proc, conv, image, new_tokens, device)
        ttft.append(seconds)
        rates.append(decode_rate(backend, tok, cache, new_tokens, device))
    return {"ttft_s": round(statistics.median(ttft), 4), "decode_tok_s": round(statistics.median(rates), 1),
            "prompt_tokens": T}


def decode_rate(model, tok, cache, n: int, device=None) -> float:
    """Tokens per second over n - 1 greedy decode steps after the first token."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n - 1):
        tok = model.decode(tok, cache).argmax(-1)
    sync(device)
    return (n - 1) / (time.perf_counter() - t0)


class SkewedRouting:
    """Synthetic routing with the skew real MoE traffic shows: Zipf over experts (a random permutation of
    ranks), and each of the previous token's experts kept with probability `reuse`."""

    def __init__(self, n_experts: int, k: int, reuse: float = 0.6, zipf: float = 1.1, seed: int = 0):
        self.k, self.reuse, self.rng = k, reuse, np.random.default_rng(seed)
        p = 1.0 / np.arange(1, n_experts + 1) ** zipf
        self.p = p / p.sum()
        self.perm = self.rng.permutation(n_experts)
        self.prev: list[int] = []

    def next(self) -> list[int]:
        """The next token's k distinct experts."""
        keep = [e for e in self.prev if self.rng.random() < self.reuse]
        while len(keep) < self.k:
            e = int(self.perm[self.rng.choice(len(self.p), p=self.p)])
            if e not in keep:
                keep.append(e)
        self.prev = keep
        return keep
