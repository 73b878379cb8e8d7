#!/usr/bin/env bash
# The one device check (issue 13): the CUDA tests, then the GPU benchmark, then a short table.
#
#   bench/gpu_check.sh          on a CUDA machine: ends inside 8 minutes on one H200
#   bench/gpu_check.sh --cpu    the same steps on the CPU (Triton interpreter, 3-layer models): CI runs it
#
# Steps: (1) `pytest -m gpu` — bf16 GPU logits against the fp32 reference, offloaded == resident, graph
# replay == eager, on the fixtures (tests/test_gpu.py) — and the Triton kernels against dequantize-then-matmul,
# compiled for real on a GPU (tests/test_triton_kernels.py, interpreted on the CPU); (2) bench/gpu.py
# (full-size random Tiny/Small/Base on a GPU, `--smoke` on the CPU); (3) onnxruntime's CUDA execution
# provider, when `onnxruntime-gpu` is importable. Logs and JSON go to $OUT (the device tool's folder) or
# bench/out. The exit status is that of the first failing step; later steps run anyway.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
LOGS=${OUT:-bench/out}
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c 'import vl2edge.quant, vl2edge.export' 2>/dev/null; then
    # a bare checkout (the device machine): install it editable, offline, without dependencies, so that
    # pyproject's package-dir (quant/ -> vl2edge.quant, export/ -> vl2edge.export) applies
    echo "vl2edge is not installed for $PY: pip install --no-deps -e ."
    "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 2
fi
status=0
summary=()

step() {  # step NAME COMMAND...: run, log, keep the first failure's status
    local name=$1; shift
    local t0=$SECONDS
    "$@" 2>&1 | tee "$LOGS/$name.log"
    local rc=${PIPESTATUS[0]}
    [ "$rc" -ne 0 ] && [ "$status" -eq 0 ] && status=$rc
    summary+=("$name|$rc|$((SECONDS - t0))|$(grep -E '^[0-9]+ (passed|failed)|passed|failed|skipped' "$LOGS/$name.log" | tail -1)")
}

if [ "${1:-}" = "--cpu" ]; then
    export TRITON_INTERPRET=1
    step pytest_gpu "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py
    # a sample of the kernel tests (the whole file runs in the default test suite)
    step kernels "$PY" -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py -k "offloaded or tiny"
    step bench "$PY" bench/gpu.py --smoke --out "$LOGS/gpu.json"
else
    "$PY" -c 'import torch; assert torch.cuda.is_available(), "no CUDA device (use --cpu)"' || exit 2
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    # pytest-xdist (in the device image) compiles the Triton variants in parallel processes
    par=$("$PY" -c 'import xdist' 2>/dev/null && echo "-n 4" || true)
    step pytest_gpu timeout 150 "$PY" -m pytest -q -p no:cacheprovider $par -m gpu tests/test_gpu.py
    step kernels timeout 120 "$PY" -m pytest -q -p no:cacheprovider $par tests/test_triton_kernels.py
    step bench timeout 230 "$PY" bench/gpu.py --deadline-s 190 --runs 2 --out "$LOGS/gpu.json"
fi
step onnx_cuda "$PY" bench/onnx_cuda.py --provider "$([ "${1:-}" = --cpu ] && echo cpu || echo cuda)" \
    --out "$LOGS/onnx_cuda.json"

echo
echo "| step | exit | seconds | result |"
echo "|---|---|---|---|"
for row in "${summary[@]}"; do
    IFS='|' read -r name rc secs result <<<"$row"
    echo "| $name | $rc | $secs | ${result:-} |"
done
[ -f "$LOGS/gpu.json" ] && "$PY" - "$LOGS/gpu.json" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
print(f"\n{d['machine']}, {d['date']}: decode tok/s (TTFT s)")
for r in d["rows"]:
    o = r.get("offload") or {}
    hr = "" if o.get("hit_rate") is None else f", hit rate {o['hit_rate']:.0%}"
    print(f"  {r['model']:>20} | {r['setting']:<60} | {r['decode_tok_s']:>7} ({r['ttft_s']}){hr}")
EOF
exit $status
