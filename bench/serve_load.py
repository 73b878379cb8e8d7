"""Load test of `vl2edge serve`: throughput and latency at several client counts, batched and not, in one run.

    .venv/bin/python bench/serve_load.py [--model models/syn-tiny-onnx] [--clients 1,4,8,32] [--max-batch 1,8]
                                         [--duration 40] [--max-tokens 32] [--image-share 0]

For each `--max-batch` value the server starts in its own process (`vl2edge serve --max-batch N`); for each
client count, that many client threads (httpx) send requests back to back for `--duration` seconds after
a warm-up request; the requests in flight then finish and count, and the wall time runs until they have.
Requests: a short question (random, so prompts differ in length), `--max-tokens` new
tokens, greedy or temperature 0.7, a quarter streamed, `--image-share` of them with a 320x240 picture as a
data URL. Reported per cell: requests, failures, throughput (requests/s and generated tokens/s), latency
p50/p99, and the server's resident memory (sampled each second from /proc). Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_server(model: str, max_batch: int, clients: int) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "vl2edge", "serve", "--model", model, "--port", str(port),
                               "--max-queue", str(2 * clients), "--device", "cpu", "--max-batch", str(max_batch)],
                              cwd=ROOT, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    for _ in range(1200):
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return server, base
        except httpx.HTTPError:
            time.sleep(0.1)
    server.kill()
    raise SystemExit(f"the server (--max-batch {max_batch}) did not come up")


def run_cell(base: str, clients: int, duration: float, max_tokens: int, image_share: float, image_url: str,
             pid: int) -> dict:
    lat, tokens, errors, rss, stop = [], [], [], [], threading.Event()

    def sample():
        while not stop.is_set():
            rss.append(rss_mb(pid))
            time.sleep(1)

    def client(i):
        rng = random.Random(i)
        with httpx.Client(base_url=base, timeout=600) as c:
            while not stop.is_set():
                words = " ".join(rng.choice(["what", "is", "shown", "here", "please", "describe", "the", "page"])
                                 for _ in range(rng.randrange(3, 20)))
                content = [{"type": "text", "text": f"Question {rng.randrange(1000)}: {words}?"}]
                if rng.random() < image_share:
                    content.insert(0, {"type": "image_url", "image_url": {"url": image_url}})
                body = {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
                        "temperature": rng.choice([0.0, 0.7]), "stream": rng.random() < 0.25}
                if body["stream"]:
                    body["stream_options"] = {"include_usage": True}
                t = time.perf_counter()
                try:
                    if body["stream"]:
                        with c.stream("POST", "/v1/chat/completions", json=body) as r:
                            lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
                        ok = r.status_code == 200 and lines and lines[-1] == "data: [DONE]" and \
                            not any('"error"' in ln for ln in lines)
                        n = json.loads(lines[-2][6:])["usage"]["completion_tokens"] if ok else 0
                    else:
                        r = c.post("/v1/chat/completions", json=body)
                        ok = r.status_code == 200
                        n = r.json()["usage"]["completion_tokens"] if ok else 0
                    if ok:
                        lat.append(time.perf_counter() - t)
                        tokens.append(n)
                    else:
                        errors.append(f"status {r.status_code}")
                except httpx.HTTPError as e:
                    errors.append(repr(e))

    threads = [threading.Thread(target=sample)] + [threading.Thread(target=client, args=(i,))
                                                   for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(duration)
    stop.set()  # no new requests; the ones in flight finish and count (wall includes them)
    for t in threads[1:]:
        t.join()
    wall = time.perf_counter() - t0
    threads[0].join()
    q = statistics.quantiles(lat, n=100, method="inclusive") if len(lat) > 2 else [float("nan")] * 99
    return {"clients": clients, "requests_ok": len(lat), "failed": len(errors), "errors": errors[:5],
            "throughput_rps": round(len(lat) / wall, 3), "tokens_per_s": round(sum(tokens) / wall, 1),
            "latency_s": {"p50": round(q[49], 2), "p99": round(q[98], 2), "max": round(max(lat, default=0), 2)},
            "server_rss_MB_max": round(max(rss, default=float("nan")), 1)}


def main():
    ap = argparse.ArgumentParser()
    default = ROOT / "models" / "syn-tiny-onnx"
    ap.add_argument("--model", default=str(default if default.is_dir() else ROOT / "models" / "demo-tiny"))
    ap.add_argument("--clients", default="1,4,8,32")
    ap.add_argument("--max-batch", default="1,8")
    ap.add_argument("--duration", type=float, default=40)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--image-share", type=float, default=0.0)
    a = ap.parse_args()
    if not (Path(a.model) / "config.json").is_file():
        from vl2edge.synthetic import write_model

        write_model("test-mha", a.model)
    from vl2edge.synthetic import sample_image

    buf = io.BytesIO()
    sample_image(320, 240).save(buf, "PNG")
    image_url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    clients = [int(c) for c in a.clients.split(",")]
    cells = []
    for max_batch in (int(b) for b in a.max_batch.split(",")):
        server, base = start_server(a.model, max_batch, max(clients))
        try:
            httpx.post(base + "/v1/chat/completions", timeout=600,  # warm-up: first-run costs out of the numbers
                       json={"messages": [{"role": "user", "content": "warm up"}], "max_tokens": 4})
            for n in clients:
                cell = {"max_batch": max_batch, **run_cell(base, n, a.duration, a.max_tokens, a.image_share,
                                                           image_url, server.pid)}
                cells.append(cell)
                print(json.dumps(cell), flush=True)
        finally:
            server.terminate()
            server.wait(timeout=60)
    out = {"date": time.strftime("%Y-%m-%d %H:%M"), "model": a.model, "duration_s": a.duration,
           "max_tokens": a.max_tokens, "image_share": a.image_share, "cells": cells}
    print("\n| max-batch | clients | requests | failed | req/s | tokens/s | p50 s | p99 s | server RSS max MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for c in cells:
        print(f"| {c['max_batch']} | {c['clients']} | {c['requests_ok']} | {c['failed']} | {c['throughput_rps']} | "
              f"{c['tokens_per_s']} | {c['latency_s']['p50']} | {c['latency_s']['p99']} | {c['server_rss_MB_max']} |")
    (ROOT / "bench" / "out").mkdir(parents=True, exist_ok=True)
    (ROOT / "bench" / "out" / "serve_load.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
