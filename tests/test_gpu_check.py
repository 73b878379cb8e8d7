"""`bench/gpu_check.sh --cpu`: the device check's dry run, every step on the CPU, as CI runs it.

What the GPU machine will run must not first break there: the script's steps (the CUDA tests' selection,
a sample of the Triton kernels under the interpreter, bench/gpu.py's code paths on the 3-layer models,
onnxruntime placement and timings) run here, and their outputs hold the rows the GPU report is made of.
"""

import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PATH": f"{Path(os.sys.executable).parent}:{os.environ['PATH']}",
           "PYTHON": os.sys.executable}
    r = subprocess.run(["bash", "bench/gpu_check.sh", "--cpu"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    table = r.stdout[r.stdout.rindex("| step | exit |"):]
    for step in ("pytest_gpu", "kernels", "bench", "onnx_cuda"):
        assert f"| {step} | 0 |" in table, table
    rows = json.loads((tmp_path / "gpu.json").read_text())["rows"]
    settings = {(row["model"], row["setting"]) for row in rows}
    for model in ("test-mha", "test-mla", "test-mla-noaux"):
        for setting in ("resident bf16, eager decode", "resident bf16, static step",
                        "static step, offload 12.5% of experts", "static step, offload 25.0% of experts, LRU",
                        "naive (copy on demand, no cache)",
                        "replay (synthetic skewed routing), static step, offload 25.0% of experts",
                        "cpu-experts (all routed experts computed on the CPU)"):
            assert (model, setting) in settings, setting
    assert ("test-mha", "resident int4-experts, eager decode") in settings
    naive = [row for row in rows if row["setting"].startswith("naive")]
    assert all(row["offload"]["hits"] == 0 and row["offload"]["misses"] > 0 for row in naive)
    static = [row for row in rows if "static step, offload 25.0%" in row["setting"]]
    assert all(row["offload"]["hits"] > 0 and row["offload"]["bytes_copied"] > 0 for row in static)
    assert all(row["decode_tok_s"] > 0 and row["ttft_s"] > 0 for row in rows)
    onnx = json.loads((tmp_path / "onnx_cuda.json").read_text())
    assert set(onnx["placement"]["kernels_per_provider"]) == {"CPUExecutionProvider"}
    assert onnx["onnx"]["decode_tok_s"] > 0 and onnx["torch"]["decode_tok_s"] > 0


def test_the_bench_budget_skips_what_would_end_past_the_deadline():
    import sys
    import time

    sys.path.insert(0, str(ROOT / "bench"))
    from gpu import Budget

    budget = Budget(time.perf_counter() + 1.0)
    assert budget.allows()  # nothing measured yet: the first piece runs
    with budget.timed():
        time.sleep(0.05)
    assert budget.allows()  # 0.05 s done, 0.05 s more fits well before the deadline
    with budget.timed():
        time.sleep(0.6)
    assert not budget.allows()  # another 0.6 s would end past it
