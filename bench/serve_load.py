"""Load test of `vl2edge serve`: N concurrent clients for a while against the demo model.

    .venv/bin/python bench/serve_load.py [--model models/demo-tiny] [--clients 32] [--duration 300]

Starts the server in its own process, runs the clients as threads (httpx), a third of the requests
with an image as a data URL and a quarter streamed; reports failures, latency percentiles,
throughput, and the server's resident memory over the run (sampled each second from /proc).
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(ROOT / "models" / "demo-tiny"))
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--duration", type=float, default=300)
    ap.add_argument("--max-tokens", type=int, default=16)
    a = ap.parse_args()
    if not (Path(a.model) / "config.json").is_file():
        from vl2edge.synthetic import write_model

        write_model("test-mha", a.model)
    from vl2edge.synthetic import sample_image

    buf = io.BytesIO()
    sample_image(320, 240).save(buf, "PNG")
    image_url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "vl2edge", "serve", "--model", a.model, "--port", str(port),
                               "--max-queue", str(2 * a.clients), "--device", "cpu"], cwd=ROOT,
                              stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    rss, lat, errors, stop = [], [], [], threading.Event()

    def sample():
        while not stop.is_set():
            rss.append(rss_mb(server.pid))
            time.sleep(1)

    def client(i):
        rng = random.Random(i)
        with httpx.Client(base_url=base, timeout=120) as c:
            while not stop.is_set():
                content = [{"type": "text", "text": f"Question {rng.randrange(1000)}: what is shown?"}]
                if rng.random() < 1 / 3:
                    content.insert(0, {"type": "image_url", "image_url": {"url": image_url}})
                body = {"messages": [{"role": "user", "content": content}], "max_tokens": a.max_tokens,
                        "temperature": rng.choice([0.0, 0.7]), "stream": rng.random() < 0.25}
                t = time.perf_counter()
                try:
                    if body["stream"]:
                        with c.stream("POST", "/v1/chat/completions", json=body) as r:
                            lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
                            ok = r.status_code == 200 and lines and lines[-1] == "data: [DONE]" and \
                                not any('"error"' in ln for ln in lines)
                    else:
                        r = c.post("/v1/chat/completions", json=body)
                        ok = r.status_code == 200 and r.json()["usage"]["completion_tokens"] > 0
                    if ok:
                        lat.append(time.perf_counter() - t)
                    else:
                        errors.append(f"status {r.status_code}")
                except httpx.HTTPError as e:
                    errors.append(repr(e))

    threads = [threading.Thread(target=sample)] + [threading.Thread(target=client, args=(i,))
                                                   for i in range(a.clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(a.duration)
    stop.set()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    server.terminate()
    server.wait(timeout=30)
    q = statistics.quantiles(lat, n=100) if len(lat) > 2 else [float("nan")] * 99
    warm = rss[min(len(rss) - 1, 10):]
    out = {"date": time.strftime("%Y-%m-%d"), "clients": a.clients, "duration_s": round(wall, 1),
           "requests_ok": len(lat), "failed": len(errors), "errors": errors[:10],
           "throughput_rps": round(len(lat) / wall, 2), "latency_s": {"p50": round(q[49], 3), "p90": round(q[89], 3),
                                                                     "p99": round(q[98], 3), "max": round(max(lat), 3)},
           "server_rss_MB": {"after_10s": round(warm[0], 1), "max": round(max(rss), 1), "end": round(rss[-1], 1)}}
    print(json.dumps(out, indent=2))
    (ROOT / "bench" / "out").mkdir(parents=True, exist_ok=True)
    (ROOT / "bench" / "out" / "serve_load.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
