"""Timing pieces the benchmark scripts share (any backend with the decoder interface and `embed`)."""

from __future__ import annotations

import time

from vl2edge.generate import prefill


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


def decode_rate(model, tok, cache, n: int, device=None) -> float:
    """Tokens per second over n - 1 greedy decode steps after the first token."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n - 1):
        tok = model.decode(tok, cache).argmax(-1)
    sync(device)
    return (n - 1) / (time.perf_counter() - t0)
