"""The GPU benchmark: resident and offloaded decode, graph replay, TTFT, hit rates — one script for the lent GPU.

    python bench/gpu.py [--models tiny,small,base] [--new-tokens 32] [--deadline-s 330] [--out bench/out/gpu.json]
    python bench/gpu.py --smoke          # the same code paths on the CPU with the 3-layer test models

Models are built on the machine itself with random weights in memory (full-size DeepSeek-VL2 Tiny,
Small, Base; nothing large travels and no 55 GB file has to be written inside the time budget), in
bf16. For each model it measures time to first token for a 1024x768 image and decode tokens/s for:

  eager decode        the PyTorch model's own decode (host-side routing, growing cache): the baseline
  static / graph      the static decode step (vl2edge/models/decode_step.py) run eagerly, and replayed
                      as a CUDA graph (what `vl2edge run` does on CUDA; `--no-graph` is the eager one)
  int4-experts        Tiny with packed experts: eager (dequantized per call) and graph (Triton kernel)
  offload 50/25/12.5  that share of each layer's experts in GPU slots, graph-replayed: the step reads
                      residents through the slot table and the rest in place from pinned CPU memory;
                      the hot set follows routing frequency + recency (`lfru`), and LRU at 25 %
  naive               on-demand copy of every needed expert, no cache (the baseline offloading beats)
  cpu-experts         all routed experts computed on the CPU, the rest on the GPU (eager decode)

plus hit rate, bytes copied and stall time. Random weights route nearly uniformly, the pessimistic
case for a cache; `replay` rows re-run offloading with routing replaced by skewed synthetic traces (Zipf
over experts, 60 % of each token's experts reused from the previous token) and are labelled as such.
Each model gets an equal share of the time left before `--deadline-s`; a row (or offload re-plan) expected to
end past its share (it takes as long as the last one) is skipped and listed, so the script ends inside the budget.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import SkewedRouting, ttft_and_decode  # noqa: E402
from vl2edge.models.decode_step import StaticDecoder  # noqa: E402
from vl2edge.models.experts import DenseExperts  # noqa: E402
from vl2edge.models.language import MoEGate  # noqa: E402
from vl2edge.models.model import VL2Model  # noqa: E402
from vl2edge.models.offload import CostModel, OffloadedExperts, offload, offload_stats, plan_placement  # noqa: E402
from vl2edge.models.swap import swap_modules  # noqa: E402
from vl2edge.presets import preset  # noqa: E402
from vl2edge.processor import Processor  # noqa: E402
from vl2edge.quant.modules import QuantExperts  # noqa: E402
from vl2edge.quant.recipes import Recipe  # noqa: E402
from vl2edge.synthetic import write_tokenizer  # noqa: E402


def random_model(name: str, dtype, seed: int = 0) -> VL2Model:
    """A full-size model with random weights, built on the CPU without a checkpoint file."""
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = VL2Model(preset(name))
    state = {}
    for pname, p in model.state_dict().items():
        t = torch.empty(p.shape, dtype=dtype)
        if pname.endswith("weight") and p.dim() == 1:
            t.fill_(1.0)
        else:
            fan_in = p.shape[-1] if p.dim() > 1 else 1
            t.normal_(0, (2.0 if ".gate." in pname and p.dim() == 2 else 1.0) / fan_in ** 0.5)
        state[pname] = t
    model.load_state_dict(state, assign=True)
    return model.requires_grad_(False).eval()


class CopyOnDemand(OffloadedExperts):
    """The naive baseline: every use copies the expert again (no cache, no prefetch)."""

    def acquire(self, e: int, keep: set[int]) -> int | None:
        if e in self.lru:
            self.free.append(self.evict(e))
        return super().acquire(e, keep)


class TraceGate(torch.nn.Module):
    """Replaces a router with skewed synthetic routing (bench.common.SkewedRouting)."""

    def __init__(self, gate, reuse: float = 0.6, zipf: float = 1.1, seed: int = 0):
        super().__init__()
        self.gate, self.k = gate, gate.c.num_experts_per_tok
        self.routing = SkewedRouting(gate.weight.shape[0], self.k, reuse, zipf, seed)
        self.weight = gate.weight

    def forward(self, x):
        idx = torch.tensor([self.routing.next() for _ in range(x.shape[0])], device=x.device)
        return idx, torch.full(idx.shape, 1.0 / self.k, device=x.device)


def quantized_experts(model: VL2Model, recipe: str = "int4-experts") -> VL2Model:
    """Swap each MoE layer's dense experts for packed ones (the recipe's expert spec)."""
    spec = Recipe(recipe).spec("language.model.layers.1.mlp.experts.0.gate_proj.weight")
    swap_modules(model, lambda name, m: QuantExperts.from_dense(m, spec) if isinstance(m, DenseExperts) else None)
    return model


class Budget:
    """Skips work that would end past a deadline, expecting each piece to take as long as the last one."""

    def __init__(self, deadline: float):
        self.deadline, self.last = deadline, 0.0

    def allows(self) -> bool:
        return time.perf_counter() + self.last <= self.deadline

    @contextmanager
    def timed(self):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.last = time.perf_counter() - t0


def run_model(name: str, args, device, dtype, proc, deadline: float) -> list[dict]:
    rows = []
    budget = Budget(deadline)

    def skipped(label) -> bool:
        if budget.allows():
            return False
        print(json.dumps({"model": name, "setting": label, "skipped": "would end past this model's share of "
                          "--deadline-s"}), flush=True)
        return True

    def row(label, backend, model, **extra):
        if skipped(label):
            return
        with budget.timed():
            measure(label, backend, model, **extra)

    def measure(label, backend, model, **extra):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        r = {"model": name, "setting": label, **ttft_and_decode(backend, proc, args.new_tokens, args.runs, device),
             **extra}
        if device.type == "cuda":
            r["peak_gpu_GB"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
        if any(isinstance(m, OffloadedExperts) for m in model.modules()):
            r["offload"] = offload_stats(model)
        print(json.dumps(r), flush=True)
        rows.append(r)

    graph = device.type == "cuda"  # CUDA graphs need CUDA; the smoke run takes the eager static step
    step_label = "graph" if graph else "static step"
    model = random_model(name, dtype)
    c = model.config.language_config
    E, k = c.n_routed_experts, c.num_experts_per_tok
    model.to(device)
    row("resident bf16, eager decode", model, model)
    row("resident bf16, static step", StaticDecoder(model, graph=False), model)
    if graph:
        row("resident bf16, graph", StaticDecoder(model, graph=True), model)
    model.to("cpu")
    if name in ("deepseek-vl2-tiny", "test-mha"):
        q = quantized_experts(random_model(name, dtype)).to(device)
        for m in q.modules():
            if isinstance(m, QuantExperts):
                m.prepare(dtype, "dequant" if device.type == "cuda" else "auto")
        row("resident int4-experts, eager decode", q, q)
        if device.type == "cuda":
            row("resident int4-experts, graph", StaticDecoder(q, graph=True), q)
        del q
    budget_slots = plan_placement(model, 16 * 2**30, 4096).slots if name == "deepseek-vl2" and \
        device.type == "cuda" else None

    def setting(label, slots, cost=None, prefetch=True, kind=OffloadedExperts, static=True, policy="lfru", **extra):
        """Re-plan every layer with `slots` slots (the CPU stores are built once, then reused). Replayed traces
        draw routing on the host each step, which a captured graph would freeze: those run the step eagerly."""
        if skipped(label):  # before the re-plan, which copies every layer's slots
            return
        with budget.timed():
            model.to("cpu")
            offload(model, device, slots, cost or CostModel(enabled=device.type == "cuda"), prefetch=prefetch,
                    kind=kind, policy=policy)
            traced = any(isinstance(m, TraceGate) for m in model.modules())
            backend = StaticDecoder(model, graph=graph and not traced) if static else model
            measure(label, backend, model, slots=slots, policy=policy if static else "lru (eager)", **extra)

    # the rows the targets are judged by first (a deadline cuts the rest): 25 % resident against naive
    quarter = max(1, round(0.25 * E))
    if budget_slots is not None:
        setting(f"{step_label}, offload, 16 GiB budget ({budget_slots}/{E} slots)", budget_slots)
    setting(f"{step_label}, offload 25.0% of experts", quarter)
    setting("naive (copy on demand, no cache)", k, cost=CostModel(enabled=False), prefetch=False, kind=CopyOnDemand,
            static=False)
    for frac in (1.0, 0.5, 0.125):
        setting(f"{step_label}, offload {frac:.1%} of experts", max(1, round(frac * E)))
    setting(f"{step_label}, offload 25.0% of experts, LRU", quarter, policy="lru")
    setting("offload 25.0% of experts, eager decode (prefetch, LRU)", quarter, static=False)
    setting("cpu-experts (all routed experts computed on the CPU)", 0, cost=CostModel(enabled=False), static=False)
    # the traces are not predictable from hidden states: no prefetch
    swap_modules(model, lambda n, m: TraceGate(m) if isinstance(m, MoEGate) else None)
    for frac in (0.5, 0.25, 0.125):
        setting(f"replay (synthetic skewed routing), static step, offload {frac:.1%} of experts",
                max(1, round(frac * E)), prefetch=False)
    setting("replay, static step, offload 25.0% of experts, LRU", quarter, prefetch=False, policy="lru")
    swap_modules(model, lambda n, m: m.gate if isinstance(m, TraceGate) else None)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="deepseek-vl2-tiny,deepseek-vl2-small,deepseek-vl2")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="CPU dry run with the 3-layer test models")
    ap.add_argument("--deadline-s", type=float, default=330.0,
                    help="skip the rows that would start after this many seconds (the device budget)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "gpu.json"))
    args = ap.parse_args()
    if args.smoke:
        args.models, args.new_tokens, args.runs = "test-mha,test-mla,test-mla-noaux", 4, 1
        device = torch.device("cpu")
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --smoke for a CPU dry run")
        device = torch.device("cuda")
    tok_dir = Path("/tmp/vl2edge-bench-tokenizer")
    tok_dir.mkdir(parents=True, exist_ok=True)
    write_tokenizer(tok_dir)
    from vl2edge.config import OFFICIAL_RESOLUTIONS
    from vl2edge.synthetic import PROCESSOR_CONFIG

    (tok_dir / "processor_config.json").write_text(json.dumps({**PROCESSOR_CONFIG,
                                                               "candidate_resolutions": OFFICIAL_RESOLUTIONS}))
    proc = Processor.from_pretrained(tok_dir)
    rows = []
    deadline = time.perf_counter() + args.deadline_s
    names = args.models.split(",")
    for i, name in enumerate(names):  # each model gets an equal share of the time left: Small and Base get rows
        share = time.perf_counter() + (deadline - time.perf_counter()) / (len(names) - i)
        rows += run_model(name, args, device, torch.bfloat16, proc, share)
    machine = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "machine": machine, "rows": rows},
                                         indent=2))
    print(f"\n{machine}, {time.strftime('%Y-%m-%d')}, 1024x768 image, bf16, random weights")
    print("| model | setting | TTFT s | decode tok/s | hit rate | prefetch acc. | copied GB | stall s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        o = r.get("offload") or {}
        hr = "-" if o.get("hit_rate") is None else f"{o['hit_rate']:.0%}"
        pa = "-" if o.get("prefetch_accuracy") is None else f"{o['prefetch_accuracy']:.0%}"
        print(f"| {r['model']} | {r['setting']} | {r['ttft_s']} | {r['decode_tok_s']} | {hr} | {pa} | "
              f"{o.get('bytes_copied', 0) / 1e9:.2f} | {o.get('stall_s', 0):.3f} |")


if __name__ == "__main__":
    main()
