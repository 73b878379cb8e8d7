"""The semantic suite: how often each inference path answers the demo model's held-out tasks right.

    python -m vl2edge.demo_eval --model models/trained-tiny --per-task 100
    python -m vl2edge.demo_eval --model models/trained-tiny --paths torch-fp32,int4-experts --per-task 20

The trained demo model (`vl2edge.train_demo`) answers tasks whose right answers are known
(`vl2edge.demo_tasks`): exact numbers and boxes with IoU >= 0.5. Scored on held-out examples (seeds the
trainer never drew), every way of running the model gets a number that means something: the torch model
in float32 and bfloat16, the quantization recipes, the ONNX exports (float and int4-experts decoders,
float and int8 vision graphs), expert offloading with a quarter of the experts resident, and the
continuous-batching engine. These numbers, not random-weight logit agreement, are what quantization
choices are judged by (bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from . import demo_tasks
from .errors import InputError, VL2Error
from .outputs import refuse_link, write_file

HELDOUT_SEED = 7_000_000_000_000  # far from the training steps' seeds (seed * 1_000_003 + step)
MAX_NEW_TOKENS = 40                # a grounding answer is about 30 tokens
if TYPE_CHECKING:
    from .pipeline import Pipeline

PATHS = ("torch-fp32", "torch-bf16", "int8", "int4-experts", "int4", "onnx-float32", "onnx-int4-experts",
         "onnx-int4-experts-int8-vision", "offload-25", "batched")


def heldout(seed: int, per_task: int, tasks=demo_tasks.TASKS) -> list[demo_tasks.Example]:
    """`per_task` examples of each task, drawn from `seed` (task by task, so a task's examples do not
    depend on which other tasks are asked for)."""
    out = []
    for i, task in enumerate(demo_tasks.TASKS):
        rng = random.Random(seed * 16 + i)
        drawn = [demo_tasks.example(task, rng) for _ in range(per_task)]
        out += drawn if task in tasks else []
    return out


def answers(pipe, examples: list[demo_tasks.Example], concurrent: int = 1) -> list[str]:
    """Greedy answers, in order; `concurrent` threads at once (the batching engine joins them)."""
    def ask(ex: demo_tasks.Example) -> str:
        return pipe.chat([{"role": "user", "content": ex.prompt}], list(ex.images),
                         max_new_tokens=MAX_NEW_TOKENS).text

    if concurrent <= 1:
        return [ask(ex) for ex in examples]
    with ThreadPoolExecutor(concurrent) as pool:
        return list(pool.map(ask, examples))


def accuracy(examples: list[demo_tasks.Example], said: list[str]) -> dict[str, float]:
    """Share of right answers per task (`demo_tasks.score`)."""
    right: dict[str, list[bool]] = {}
    for ex, answer in zip(examples, said, strict=True):
        right.setdefault(ex.task, []).append(demo_tasks.score(ex, answer))
    return {task: sum(r) / len(r) for task, r in right.items()}


def _offloaded(model: Path, share: float):
    """The torch pipeline with `share` of each MoE layer's routed experts in device slots (on the CPU
    the slots and the store are both host memory: the bookkeeping and math are the GPU path's)."""
    from .models.loading import load_model
    from .models.offload import plan_placement
    from .pipeline import load

    plan = plan_placement(load_model(model, dtype="float32", device="cpu").model, 10**12, 4096)
    slots = max(1, int(share * plan.n_experts))
    budget = plan.non_expert + plan.kv_cache + plan.workspace + slots * plan.moe_layers * plan.expert_bytes
    return load(model, device="cpu", dtype="float32", backend="torch", gpu_memory=budget)


def open_path(model: Path, path: str, work: Path) -> tuple[Pipeline, int]:
    """A pipeline for one path of PATHS and how many answers to ask at once. ONNX paths export into
    `work` (once per recipe)."""
    from .pipeline import load

    if path in ("torch-fp32", "torch-bf16", "batched"):
        pipe = load(model, device="cpu", dtype="bfloat16" if path == "torch-bf16" else "float32", backend="torch")
        if path == "batched":
            pipe.start_batching(4)
            return pipe, 4
        return pipe, 1
    if path in ("int8", "int4-experts", "int4"):
        return load(model, device="cpu", backend="torch", quant=path), 1
    if path == "offload-25":
        return _offloaded(model, 0.25), 1
    if path.startswith("onnx-"):
        from .export.build import export

        recipe = "float32" if path == "onnx-float32" else "int4-experts"
        dst = work / f"onnx-{recipe}"
        if not dst.is_dir():
            export(model, dst, recipe=recipe, vision="float" if recipe == "float32" else "both", progress=False)
        return load(dst, vision="int8" if path.endswith("int8-vision") else "float"), 1
    raise ValueError(f"unknown path {path!r}; known: {', '.join(PATHS)}")


def run(model: Path, paths, per_task: int, seed: int = HELDOUT_SEED, tasks=demo_tasks.TASKS,
        log: Callable[[str], None] = print) -> dict[str, dict]:
    """Per path: its accuracy per task, its answers and the seconds it took."""
    examples = heldout(seed, per_task, tasks)
    out: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="vl2edge-semantic-") as work:
        for path in paths:
            t0 = time.perf_counter()
            pipe, concurrent = open_path(model, path, Path(work))
            said = answers(pipe, examples, concurrent)
            if concurrent > 1:
                pipe.start_batching(1)  # closes the engine and its thread
            out[path] = {"accuracy": accuracy(examples, said), "answers": said,
                         "seconds": round(time.perf_counter() - t0, 1)}
            log(f"{path:32s} {json.dumps(out[path]['accuracy'])}  {out[path]['seconds']} s")
    if "torch-fp32" in out:  # how often each path says exactly what float32 says, per task
        ref: list[str] = out["torch-fp32"]["answers"]
        for r in out.values():
            same: dict[str, list[bool]] = {}
            said_here: list[str] = r["answers"]
            for ex, a, b in zip(examples, said_here, ref, strict=True):
                same.setdefault(ex.task, []).append(a == b)
            r["same_as_fp32"] = {task: sum(v) / len(v) for task, v in same.items()}
    return out


def table(results: dict) -> str:
    """Markdown: per path, accuracy per task, and the share of answers identical to torch-fp32's (when run)."""
    tasks = list(next(iter(results.values()))["accuracy"])
    head = "| path | " + " | ".join(tasks) + " | same answer as fp32 (" + " / ".join(tasks) + ") | s |"
    rows = [head, "|" + "---|" * (len(tasks) + 3)]
    for path, r in results.items():
        same = r.get("same_as_fp32")
        agree = " / ".join(f"{same[t]:.0%}" for t in tasks) if same and path != "torch-fp32" else "-"
        rows.append(f"| {path} | " + " | ".join(f"{r['accuracy'][t]:.0%}" for t in tasks) + f" | {agree} | "
                    f"{r['seconds']} |")
    return "\n".join(rows)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m vl2edge.demo_eval", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=Path("models/trained-tiny"))
    ap.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated, of: {', '.join(PATHS)}")
    ap.add_argument("--per-task", type=int, default=100)
    ap.add_argument("--seed", type=int, default=HELDOUT_SEED)
    ap.add_argument("--json", type=Path, help="also write the results (answers included) here")
    a = ap.parse_args(argv)
    paths = [p.strip() for p in a.paths.split(",") if p.strip()]
    if not 1 <= a.per_task <= 10_000:
        ap.error(f"--per-task {a.per_task} must be in [1, 10000]")
    if not paths:
        ap.error(f"--paths names no path; known: {', '.join(PATHS)}")
    unknown = [p for p in paths if p not in PATHS]
    if unknown:
        print(f"error: unknown path(s) {', '.join(unknown)}; known: {', '.join(PATHS)}", file=sys.stderr)
        raise SystemExit(2)
    try:
        if a.json:  # before the evaluation, so a finished one is never lost to an unwritable path
            refuse_link(a.json)
            if not a.json.parent.is_dir() or not os.access(a.json.parent, os.W_OK):
                raise InputError(f"cannot write {a.json}: {a.json.parent} is not a writable folder")
        results = run(a.model, paths, a.per_task, a.seed)
        print(table(results))
    except VL2Error as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if a.json:
        try:
            write_file(a.json, (json.dumps(results, indent=2) + "\n").encode())
        except VL2Error as e:  # a disk that filled meanwhile: the results go to stdout instead
            print(json.dumps(results, indent=2))
            print(f"error: {e} (the results are printed above)", file=sys.stderr)
            raise SystemExit(2) from None


if __name__ == "__main__":
    main()
